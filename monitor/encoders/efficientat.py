"""`efficientat`: EfficientAT's MobileNetV3 "mn04" AudioSet tagger as a frozen encoder.

Schmid et al., "Efficient Large-Scale Audio Tagging via Transformer-to-CNN Knowledge
Distillation" (ICASSP 2023); weights `mn04_as_mAP_432.pt` (MIT). The network is written here so
the published state_dict loads with strict=True: MobileNetV3-Large at width 0.4, one input
channel, channel squeeze-excitation, an MLP head with 527 AudioSet outputs.

Input is harken's canonical 16 kHz mono; the front end resamples to the 32 kHz the network was
trained at, on the model's device, for the whole batch at once.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torchaudio
from torch import nn

from monitor.audio import SAMPLE_RATE_HZ
from monitor.encoders.base import Embedding, PretrainedEncoder
from monitor.errors import UsageError
from monitor.logs import get_logger
from monitor.weights.store import KNOWN, file_sha256, locate
from monitor.weights.checkpoints import load_strict, read_torch_checkpoint

MODEL_RATE_HZ = 32_000
WIDTH_MULT = 0.4
N_CLASSES = 527
EMBEDDINGS = {"pooled384": 384, "hidden512": 512, "both": 384 + 512}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10 % below `value`
    (the MobileNet rule the checkpoint's widths were built with)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual block, channel counts before the width multiplier."""

    in_ch: int
    kernel: int
    expanded_ch: int
    out_ch: int
    use_se: bool
    hardswish: bool
    stride: int

    def scaled(self, width: float) -> BlockConfig:
        return BlockConfig(make_divisible(self.in_ch * width), self.kernel,
                           make_divisible(self.expanded_ch * width),
                           make_divisible(self.out_ch * width), self.use_se, self.hardswish,
                           self.stride)


# MobileNetV3-Large (Howard et al. 2019, table 1): in, kernel, expanded, out, SE, hardswish, stride.
MOBILENET_V3_LARGE = tuple(BlockConfig(*row) for row in (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
))


# --------------------------------------------------------------------------- front end


class EfficientATFrontEnd(nn.Module):
    """(batch, samples) at `input_rate_hz` -> (batch, 1, 128, frames) normalised log-mel.

    EfficientAT's eval-mode preprocessing: 32 kHz, pre-emphasis, STFT (n_fft 1024, symmetric
    Hann window of 800, hop 320, centred), power, 128 Kaldi mel banks 0-15 kHz, log(x + 1e-5),
    then (x + 4.5) / 5. 10 s give 1000 frames.
    """

    def __init__(self, input_rate_hz: int = SAMPLE_RATE_HZ, n_mels: int = 128, n_fft: int = 1024,
                 win_length: int = 800, hop_length: int = 320, f_min_hz: float = 0.0,
                 f_max_hz: float = 15_000.0):
        super().__init__()
        self.input_rate_hz = int(input_rate_hz)
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = hop_length
        # y[n] = x[n] - 0.97 x[n-1] as a valid convolution: one sample shorter, like the reference.
        self.register_buffer("preemphasis", torch.tensor([[[-0.97, 1.0]]]), persistent=False)
        self.register_buffer("window", torch.hann_window(win_length, periodic=False),
                             persistent=False)
        banks, _ = torchaudio.compliance.kaldi.get_mel_banks(
            n_mels, n_fft, float(MODEL_RATE_HZ), f_min_hz, f_max_hz, 100.0, -500.0, 1.0)
        # Kaldi banks cover n_fft/2 bins; the Nyquist bin gets weight 0.
        self.register_buffer("mel_banks", nn.functional.pad(banks, (0, 1)), persistent=False)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        if waves.ndim != 2:
            raise UsageError(f"efficientat expects (batch, samples) audio, got shape {tuple(waves.shape)}")
        # The front end stays in float32 under autocast: log of bf16 power spectra loses the floor.
        with torch.autocast(waves.device.type, enabled=False):
            x = waves.float()
            if self.input_rate_hz != MODEL_RATE_HZ:
                x = torchaudio.functional.resample(x, self.input_rate_hz, MODEL_RATE_HZ)
            # A slice, not conv1d: the same arithmetic, about 8x faster on the CPU.
            x = x[:, 1:] + self.preemphasis[0, 0, 0] * x[:, :-1]  # (batch, n - 1)
            spec = torch.stft(x, self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                              window=self.window, center=True, normalized=False,
                              return_complex=True)
            power = spec.real.square() + spec.imag.square()  # (batch, n_fft/2 + 1, frames)
            mel = torch.matmul(self.mel_banks, power)  # (batch, 128, frames)
            mel = (mel + 1e-5).log()
            return ((mel + 4.5) / 5.0).unsqueeze(1)  # (batch, 1, 128, frames)


# --------------------------------------------------------------------------- network


class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + optional activation; children 0, 1, 2 as in the checkpoint."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = None):
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, eps=0.001, momentum=0.01),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel SE: mean over (freq, time) -> fc1 -> ReLU -> fc2 -> sigmoid -> rescale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, squeeze)
        self.fc2 = nn.Linear(squeeze, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, C, F, T) -> (batch, C) -> (batch, C, 1, 1)
        s = x.mean(dim=(2, 3))
        # EfficientAT's SqueezeExcitation uses nn.Sigmoid here (not MobileNetV3's hard-sigmoid);
        # the weights were trained with it.
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class ConcurrentSE(nn.Module):
    """EfficientAT wraps its SE layers in a list (it can squeeze several axes at once); mn04 uses
    only the channel axis, so this is one layer and the max-aggregation is the identity."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.conc_se_layers = nn.ModuleList([SqueezeExcitation(channels, squeeze)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conc_se_layers[0](x)


class InvertedResidual(nn.Module):
    """Expand (1x1, skipped when the width does not change) -> depthwise -> [SE] -> project."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        act = nn.Hardswish if cfg.hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if cfg.expanded_ch != cfg.in_ch:
            layers.append(ConvBNAct(cfg.in_ch, cfg.expanded_ch, 1, activation=act))
        layers.append(ConvBNAct(cfg.expanded_ch, cfg.expanded_ch, cfg.kernel, cfg.stride,
                                groups=cfg.expanded_ch, activation=act))
        if cfg.use_se:
            layers.append(ConcurrentSE(cfg.expanded_ch, make_divisible(cfg.expanded_ch // 4)))
        layers.append(ConvBNAct(cfg.expanded_ch, cfg.out_ch, 1))
        self.block = nn.Sequential(*layers)
        self.residual = cfg.stride == 1 and cfg.in_ch == cfg.out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class EfficientATNet(nn.Module):
    """MobileNetV3-Large x0.4 on a (batch, 1, 128, frames) log-mel; 993,485 parameters."""

    def __init__(self, width: float = WIDTH_MULT, n_classes: int = N_CLASSES, dropout: float = 0.2):
        super().__init__()
        blocks = [b.scaled(width) for b in MOBILENET_V3_LARGE]
        layers: list[nn.Module] = [ConvBNAct(1, blocks[0].in_ch, 3, 2, activation=nn.Hardswish)]
        layers += [InvertedResidual(b) for b in blocks]
        last = 6 * blocks[-1].out_ch
        layers.append(ConvBNAct(blocks[-1].out_ch, last, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        hidden = make_divisible(1280 * width)
        # Indices 2 and 5 are the checkpoint's `classifier.2` / `classifier.5`.
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(last, hidden), nn.Hardswish(),
            nn.Dropout(dropout), nn.Linear(hidden, n_classes))
        self.map_channels = last
        self.hidden_dim = hidden

    def forward(self, spec: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.features(spec)  # (batch, 384, 4, 32) for 128 x 1000
        pooled = fmap.mean(dim=(2, 3))  # (batch, 384)
        hidden = self.classifier[3](self.classifier[2](pooled))  # (batch, 512)
        logits = self.classifier[5](self.classifier[4](hidden))  # (batch, 527)
        return {"map": fmap, "pooled": pooled, "hidden": hidden, "logits": logits}


# --------------------------------------------------------------------------- encoder


class EfficientATEncoder(PretrainedEncoder):
    """The harken encoder: 16 kHz waves -> clip embedding + last feature map (+ AudioSet tags)."""

    name = "efficientat"

    def __init__(self, net: EfficientATNet, embedding: str = "pooled384",
                 weights: str | None = None, weights_sha256: str | None = None):
        super().__init__(weights, weights_sha256)
        if embedding not in EMBEDDINGS:
            raise UsageError(f"efficientat embedding must be one of {', '.join(EMBEDDINGS)}, "
                             f"got {embedding!r}")
        self.front = EfficientATFrontEnd(input_rate_hz=SAMPLE_RATE_HZ)
        # channels_last: the depthwise/pointwise convolutions run about 15 % faster on the CPU
        # (and suit cuDNN's half-precision kernels); the values are the same.
        self.net = net.to(memory_format=torch.channels_last)
        self.embedding = embedding
        self.embedding_dim = EMBEDDINGS[embedding]
        self.freeze()

    def forward(self, waves: torch.Tensor) -> Embedding:
        out = self.net(self.front(waves).contiguous(memory_format=torch.channels_last))
        if self.embedding == "pooled384":
            vector = out["pooled"]
        elif self.embedding == "hidden512":
            vector = out["hidden"]
        else:
            vector = torch.cat([out["pooled"], out["hidden"]], dim=1)  # (batch, 896)
        return Embedding(vector=vector, feature_map=out["map"])

    def tag(self, waves: torch.Tensor) -> torch.Tensor:
        """(batch, samples) 16 kHz -> (batch, 527) AudioSet probabilities (see audioset_labels)."""
        return torch.sigmoid(self.net(self.front(waves))["logits"])

    def spec_params(self) -> dict:
        return {"embedding": self.embedding}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict from a torch checkpoint, without executing any pickled code."""
    state = read_torch_checkpoint(path, "EfficientAT")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: not an EfficientAT state_dict (expected a dict of tensors)")
    return state


def load_weights_into(net: EfficientATNet, state: dict[str, torch.Tensor], path: Path) -> None:
    """strict load, with the first mismatch named instead of torch's multi-line report."""
    load_strict(net, state, path, "EfficientAT mn04")


def load_efficientat(weights: str | Path | None = None, device: str | torch.device = "cpu",
                     embedding: str = "pooled384",
                     expected_sha256: str | None = None) -> EfficientATEncoder:
    """Build the encoder from a local mn04 checkpoint (default: the weights directory's).

    `weights=None` is kept as None in `spec()`, so an artifact finds the weights in whatever
    weights directory the machine that loads it has; the sha256 pins which weights they must be.
    """
    if embedding not in EMBEDDINGS:
        raise UsageError(f"efficientat embedding must be one of {', '.join(EMBEDDINGS)}, "
                         f"got {embedding!r}")
    path = locate("efficientat", weights)
    if not path.is_file():
        raise UsageError(f"{path}: efficientat weights must be a file, not a directory")
    digest = file_sha256(path)
    if expected_sha256 and digest != expected_sha256:
        raise UsageError(f"{path}: efficientat weights sha256 {digest[:12]}... differ from the "
                         f"{expected_sha256[:12]}... the model was trained with; install those "
                         f"weights or retrain")
    net = EfficientATNet()
    load_weights_into(net, read_state_dict(path), path)
    log = get_logger(stage="encoder")
    if digest != KNOWN["efficientat"].sha256:
        log.warning("weights_unpublished", encoder="efficientat", path=str(path), sha256=digest)
    enc = EfficientATEncoder(net, embedding, str(weights) if weights else None, digest)
    enc = enc.to(torch.device(device)).eval()
    log.info("encoder_loaded", encoder="efficientat", path=str(path), embedding=embedding,
             device=str(device))
    return enc


def audioset_labels() -> list[str]:
    """The 527 AudioSet display names in the network's output order (0 Speech, 137 Music)."""
    text = resources.files("monitor").joinpath("data/class_labels_indices.csv").read_text("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    labels = [row["display_name"] for row in sorted(rows, key=lambda r: int(r["index"]))]
    if len(labels) != N_CLASSES:
        raise RuntimeError(f"class_labels_indices.csv has {len(labels)} labels, expected {N_CLASSES}")
    return labels
