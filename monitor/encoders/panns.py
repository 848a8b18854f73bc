"""`panns`: CNN14 from PANNs (Kong et al., 2020) as a frozen encoder.

The layers come from `panns_inference.models` (its ConvBlock, and torchlibrosa's STFT and
log-mel front end), assembled here with CNN14's exact module names so a published PANNs
checkpoint (`{'model': state_dict}`) loads with strict=True. The widths and the front end are
read from the checkpoint: `Cnn14_16k_mAP=0.438.pth` (16 kHz: window 512, hop 160, 64 mel bins,
50-8000 Hz; the default) and `Cnn14_mAP=0.431.pth` (32 kHz: window 1024, hop 320, 50-14000 Hz,
fed by resampling on the device) both work. Outputs: fc1's 2048-wide embedding and the last
convolutional feature map.

`panns_inference/__init__.py` imports its `config.py`, which runs `wget` for AudioSet labels into
~/panns_data when they are missing. harken never runs that: `panns_models()` loads the package's
`models.py` under a private package name whose `__init__` is never executed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torchaudio
from torch import nn

from monitor.audio import SAMPLE_RATE_HZ
from monitor.encoders.base import Embedding, PretrainedEncoder
from monitor.errors import UsageError
from monitor.logs import get_logger
from monitor.weights.store import check_pinned_sha256, file_sha256, locate
from monitor.weights.checkpoints import load_strict, read_torch_checkpoint

_PRIVATE_PACKAGE = "_harken_panns_inference"
WIDTHS = (64, 128, 256, 512, 1024, 2048)
N_CLASSES = 527

# The two published front ends, keyed by STFT window: (rate, hop, fmin, fmax).
FRONT_ENDS = {512: (16_000, 160, 50, 8_000), 1024: (32_000, 320, 50, 14_000)}


def panns_models() -> types.ModuleType:
    """`panns_inference.models`, imported without running `panns_inference/__init__.py`."""
    name = f"{_PRIVATE_PACKAGE}.models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("panns_inference")  # locates, does not execute
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the panns encoder needs the panns-inference package "
                         "(pip install panns-inference)")
    package = types.ModuleType(_PRIVATE_PACKAGE)
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = _PRIVATE_PACKAGE
    sys.modules[_PRIVATE_PACKAGE] = package
    return importlib.import_module(name)


class Cnn14Net(nn.Module):
    """CNN14 with PANNs' module names; widths are parameters so tests can build a tiny one.

    Dropout and SpecAugment (training only) are left out: the encoder is always in eval mode,
    where they are the identity.
    """

    def __init__(self, sample_rate_hz: int = 16_000, window_size: int = 512, hop_size: int = 160,
                 mel_bins: int = 64, fmin: int = 50, fmax: int = 8_000,
                 classes_num: int = N_CLASSES, widths: tuple[int, ...] = WIDTHS,
                 embedding_dim: int = 2048):
        super().__init__()
        m = panns_models()
        from torchlibrosa.stft import LogmelFilterBank, Spectrogram

        self.sample_rate_hz = sample_rate_hz
        self.front_end = {"sample_rate_hz": sample_rate_hz, "window_size": window_size,
                          "hop_size": hop_size, "mel_bins": mel_bins, "fmin": fmin, "fmax": fmax}
        self.widths = tuple(int(w) for w in widths)
        self.spectrogram_extractor = Spectrogram(
            n_fft=window_size, hop_length=hop_size, win_length=window_size, window="hann",
            center=True, pad_mode="reflect", freeze_parameters=True)
        self.logmel_extractor = LogmelFilterBank(
            sr=sample_rate_hz, n_fft=window_size, n_mels=mel_bins, fmin=fmin, fmax=fmax, ref=1.0,
            amin=1e-10, top_db=None, freeze_parameters=True)
        self.bn0 = nn.BatchNorm2d(mel_bins)
        channels = (1, *self.widths)
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", m.ConvBlock(channels[i], channels[i + 1]))
        self.fc1 = nn.Linear(self.widths[-1], embedding_dim, bias=True)
        self.fc_audioset = nn.Linear(embedding_dim, classes_num, bias=True)
        m.init_bn(self.bn0)
        m.init_layer(self.fc1)
        m.init_layer(self.fc_audioset)

    def forward(self, waves: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.spectrogram_extractor(waves)  # (batch, 1, frames, window // 2 + 1)
        x = self.logmel_extractor(x)  # (batch, 1, frames, mel_bins)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        for i in range(1, 6):
            x = getattr(self, f"conv_block{i}")(x, pool_size=(2, 2), pool_type="avg")
        fmap = self.conv_block6(x, pool_size=(1, 1), pool_type="avg")  # (batch, C, frames/32, mel/32)
        x = fmap.mean(dim=3)  # (batch, C, frames/32)
        x = x.amax(dim=2) + x.mean(dim=2)  # (batch, C)
        embedding = torch.relu(self.fc1(x))  # (batch, embedding_dim)
        return {"embedding": embedding, "map": fmap,
                "clipwise_output": torch.sigmoid(self.fc_audioset(embedding))}


def shapes_from_state(state: dict[str, torch.Tensor], path: Path) -> dict:
    """Cnn14Net arguments that fit a checkpoint: widths and front end from tensor shapes."""
    try:
        n_fft = int(state["spectrogram_extractor.stft.conv_real.weight"].shape[-1])
        widths = tuple(int(state[f"conv_block{i}.conv1.weight"].shape[0]) for i in range(1, 7))
        mel_bins = int(state["bn0.weight"].shape[0])
        embedding_dim, classes = (int(state["fc1.weight"].shape[0]),
                                  int(state["fc_audioset.weight"].shape[0]))
    except KeyError as exc:
        raise UsageError(f"{path}: not a PANNs CNN14 checkpoint (no {exc.args[0]})") from None
    if n_fft not in FRONT_ENDS:
        raise UsageError(f"{path}: CNN14 with a {n_fft}-point STFT; harken knows the 16 kHz (512) "
                         f"and 32 kHz (1024) checkpoints")
    rate, hop, fmin, fmax = FRONT_ENDS[n_fft]
    return {"sample_rate_hz": rate, "window_size": n_fft, "hop_size": hop, "mel_bins": mel_bins,
            "fmin": fmin, "fmax": fmax, "classes_num": classes, "widths": widths,
            "embedding_dim": embedding_dim}


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict of a PANNs checkpoint, loaded with weights_only=True (no pickled code)."""
    ckpt = read_torch_checkpoint(path, "PANNs")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: not a PANNs checkpoint (expected {{'model': state_dict}})")
    return state


class PannsEncoder(PretrainedEncoder):
    """16 kHz waves -> CNN14 embedding (batch, 2048) + last conv map (batch, C, freq, time)."""

    name = "panns"

    def __init__(self, net: Cnn14Net, weights: str | None = None,
                 weights_sha256: str | None = None):
        super().__init__(weights, weights_sha256)
        self.net = net
        self.embedding_dim = int(net.fc1.out_features)
        self.freeze()

    def forward(self, waves: torch.Tensor) -> Embedding:
        if waves.ndim != 2:
            raise UsageError(f"panns expects (batch, samples) audio, got shape {tuple(waves.shape)}")
        if self.net.sample_rate_hz != SAMPLE_RATE_HZ:  # the 32 kHz checkpoint
            waves = torchaudio.functional.resample(waves, SAMPLE_RATE_HZ, self.net.sample_rate_hz)
        out = self.net(waves)
        # PANNs maps are (time, freq); harken's are (freq, time).
        return Embedding(vector=out["embedding"], feature_map=out["map"].transpose(2, 3))

    def spec_params(self) -> dict:
        return {"front_end": self.net.front_end}


def build_panns(spec: dict, device: torch.device) -> PannsEncoder:
    path = locate("panns", spec.get("weights"))
    if not path.is_file():
        raise UsageError(f"{path}: panns weights are a single .pth checkpoint, not a directory")
    digest = file_sha256(path)
    check_pinned_sha256("panns", path, digest, spec.get("weights_sha256"))
    state = read_checkpoint(path)
    net = Cnn14Net(**shapes_from_state(state, path))
    load_strict(net, state, path, "CNN14")
    enc = PannsEncoder(net, str(spec["weights"]) if spec.get("weights") else None, digest)
    get_logger(stage="encoder").info("encoder_loaded", encoder="panns", path=str(path),
                                     rate_hz=net.sample_rate_hz, device=str(device))
    return enc.to(device)
