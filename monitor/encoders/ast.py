"""`ast`: the Audio Spectrogram Transformer (Gong et al., Interspeech 2021) as a frozen encoder.

transformers' `ASTModel` on local weights (default MIT/ast-finetuned-audioset-10-10-0.4593).
Its input is the Kaldi filterbank AST was trained on, computed here for the whole batch on the
model's device (`KaldiFbank`); `tests/monitor/test_zoo.py` checks it against transformers'
per-clip `ASTFeatureExtractor`. Outputs: the pooled clip embedding (mean of the CLS and
distillation tokens, `hidden_size` wide) and the patch-token grid as the feature map.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from monitor.audio import SAMPLE_RATE_HZ
from monitor.encoders.base import Embedding, PretrainedEncoder
from monitor.errors import UsageError
from monitor.logs import get_logger
from monitor.weights.store import check_pinned_sha256, locate, weights_sha256
from monitor.weights.checkpoints import load_hf_model, read_preprocessor_config

# AudioSet statistics of AST's filterbank; inputs are normalised as (x - mean) / (2 * std).
FBANK_MEAN = -4.2677393
FBANK_STD = 4.5689974


class KaldiFbank(nn.Module):
    """Batched `torchaudio.compliance.kaldi.fbank` with AST's settings: 25 ms Hanning window,
    10 ms shift, no dither, DC offset removed, pre-emphasis 0.97, power spectrum over a 512-point
    FFT, Kaldi mel banks (20 Hz to Nyquist), natural log floored at float32 epsilon.

    (batch, samples) 16 kHz -> (batch, frames, n_mels); frames = 1 + (samples - 400) // 160
    (Kaldi's snip_edges).
    """

    def __init__(self, n_mels: int = 128, sample_rate_hz: int = SAMPLE_RATE_HZ,
                 frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                 preemphasis: float = 0.97, low_freq_hz: float = 20.0):
        super().__init__()
        from torchaudio.compliance import kaldi

        self.window_size = int(sample_rate_hz * frame_length_ms / 1000)  # 400
        self.window_shift = int(sample_rate_hz * frame_shift_ms / 1000)  # 160
        self.n_fft = 1 << (self.window_size - 1).bit_length()  # 512
        self.preemphasis = preemphasis
        self.n_mels = n_mels
        banks, _ = kaldi.get_mel_banks(n_mels, self.n_fft, float(sample_rate_hz), low_freq_hz, 0.0,
                                       100.0, -500.0, 1.0)
        # Kaldi's banks stop one bin short of Nyquist: (n_mels, n_fft // 2) -> (n_mels, n_fft // 2 + 1)
        self.register_buffer("mel_banks", nn.functional.pad(banks.float(), (0, 1)), persistent=False)
        self.register_buffer("window", torch.hann_window(self.window_size, periodic=False),
                             persistent=False)

    def n_frames(self, n_samples: int) -> int:
        return 1 + (n_samples - self.window_size) // self.window_shift

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        if waves.ndim != 2 or waves.shape[1] < self.window_size:
            raise UsageError(f"ast expects (batch, samples) audio of at least {self.window_size} "
                             f"samples, got shape {tuple(waves.shape)}")
        # Filterbanks feed a log: keep them in float32 even inside a bf16/fp16 autocast region.
        with torch.autocast(waves.device.type, enabled=False):
            frames = waves.float().unfold(1, self.window_size, self.window_shift)  # (batch, frames, 400)
            frames = frames - frames.mean(dim=-1, keepdim=True)
            previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # Kaldi: x[-1] = x[0]
            frames = (frames - self.preemphasis * previous) * self.window
            power = torch.fft.rfft(frames, n=self.n_fft).abs().pow(2)  # (batch, frames, 257)
            mel = power @ self.mel_banks.T  # (batch, frames, n_mels)
            return mel.clamp_min(torch.finfo(torch.float32).eps).log()


class ASTEncoder(PretrainedEncoder):
    """16 kHz waves -> pooled AST embedding + (batch, hidden, freq_patches, time_patches) map."""

    name = "ast"

    def __init__(self, model, weights: str | None = None, weights_sha256: str | None = None,
                 fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD):
        super().__init__(weights, weights_sha256)
        cfg = model.config
        self.model = model
        self.fbank = KaldiFbank(cfg.num_mel_bins)
        self.max_frames = int(cfg.max_length)
        self.fbank_mean = float(fbank_mean)
        self.fbank_std = float(fbank_std)
        self.embedding_dim = int(cfg.hidden_size)
        self.patch_size = int(cfg.patch_size)
        self.time_stride = int(cfg.time_stride)
        self.grid = model.embeddings.get_shape(cfg)  # (freq_patches, time_patches)
        self.freeze()

    def input_values(self, waves: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, max_length, n_mels): what ASTFeatureExtractor returns."""
        fbank = self.fbank(waves)  # (batch, frames, n_mels)
        missing = self.max_frames - fbank.shape[1]
        # Zero-pad (before normalising, as the feature extractor does) or crop to max_length frames.
        fbank = nn.functional.pad(fbank, (0, 0, 0, missing)) if missing > 0 else fbank[:, : self.max_frames]
        return (fbank - self.fbank_mean) / (2.0 * self.fbank_std)

    def forward(self, waves: torch.Tensor) -> Embedding:
        out = self.model(input_values=self.input_values(waves))
        tokens = out.last_hidden_state[:, 2:]  # (batch, f * t, hidden): CLS and distillation first
        f, t = self.grid
        # Patches are numbered frequency-major (conv output flattened from (f, t)).
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, f, t)  # (batch, hidden, f, t)
        return Embedding(vector=out.pooler_output, feature_map=fmap)

    def attention_rollout(self, waves: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, freq_patches, time_patches) attention rollout (Abnar &
        Zuidema 2020) from the CLS and distillation tokens to the patches, scaled to max 1 per
        clip; time patches that cover only padding are cropped.

        Attention probabilities are recomputed from each layer's input with its own q/k
        projections, so the fast sdpa path used for embeddings stays as it is."""
        inputs: list[torch.Tensor] = []

        def keep_input(module, args, kwargs):
            inputs.append(args[0] if args else kwargs["hidden_states"])

        hooks = [layer.attention.register_forward_pre_hook(keep_input, with_kwargs=True)
                 for layer in self.model.layers]
        try:
            with torch.no_grad():
                self.model(input_values=self.input_values(waves))
        finally:
            for h in hooks:
                h.remove()
        rollout = None
        for layer, h in zip(self.model.layers, inputs):
            att = layer.attention
            b, n, _ = h.shape
            q = att.q_proj(h).view(b, n, -1, att.head_dim).transpose(1, 2)  # (batch, heads, n, d)
            k = att.k_proj(h).view(b, n, -1, att.head_dim).transpose(1, 2)
            probs = torch.softmax((q @ k.transpose(-1, -2)).float() * att.scaling, dim=-1).mean(1)
            # The residual path: half identity, renormalised rows (the rollout paper's recipe).
            a = 0.5 * probs + 0.5 * torch.eye(n, device=h.device)
            a = a / a.sum(dim=-1, keepdim=True)  # (batch, n, n)
            rollout = a if rollout is None else a @ rollout
        f, t = self.grid
        cls_to_patches = rollout[:, :2, 2:].mean(dim=1).reshape(-1, f, t)  # (batch, f, t)
        real = self.fbank.n_frames(waves.shape[1])
        t_real = max(1, min(t, math.ceil((real - self.patch_size) / self.time_stride) + 1))
        out = cls_to_patches[:, :, :t_real]
        return out / out.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)

    def spec_params(self) -> dict:
        return {"fbank_mean": self.fbank_mean, "fbank_std": self.fbank_std}


def build_ast(spec: dict, device: torch.device) -> ASTEncoder:
    """From local weights only (an HF directory); sdpa attention where transformers has it."""
    from transformers import ASTModel

    path = locate("ast", spec.get("weights"))
    model = load_hf_model(ASTModel, "ast", path, "audio-spectrogram-transformer",
                          attn_implementation="sdpa")
    digest = weights_sha256(path)
    check_pinned_sha256("ast", path, digest, spec.get("weights_sha256"))
    pre = read_preprocessor_config(path)
    _check_rate(path, pre)
    enc = ASTEncoder(model, str(spec["weights"]) if spec.get("weights") else None, digest,
                     fbank_mean=float(spec.get("fbank_mean", pre.get("mean", FBANK_MEAN))),
                     fbank_std=float(spec.get("fbank_std", pre.get("std", FBANK_STD))))
    get_logger(stage="encoder").info("encoder_loaded", encoder="ast", path=str(path),
                                     dim=enc.embedding_dim, device=str(device))
    return enc.to(device)


def _check_rate(path: Path, pre: dict) -> None:
    rate = pre.get("sampling_rate", SAMPLE_RATE_HZ)
    if int(rate) != SAMPLE_RATE_HZ:
        raise UsageError(f"{path / 'preprocessor_config.json'}: model expects {rate} Hz audio but "
                         f"harken feeds {SAMPLE_RATE_HZ} Hz")
