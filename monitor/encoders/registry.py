"""The explicit encoder registry: name -> builder(spec, device)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from monitor.encoders.base import Encoder
from monitor.errors import UsageError


def _build_mel(spec: dict, device: torch.device) -> Encoder:
    from monitor.encoders.mel import build_mel

    return build_mel(spec, device)


def _build_stats(spec: dict, device: torch.device) -> Encoder:
    from monitor.encoders.stats import build_stats

    return build_stats(spec, device)


def _build_efficientat(spec: dict, device: torch.device) -> Encoder:
    from monitor.encoders.efficientat import load_efficientat

    return load_efficientat(
        spec.get("weights"), device=device, embedding=spec.get("embedding", "pooled384"),
        expected_sha256=spec.get("weights_sha256"),
    ).eval()


def _build_ast(spec: dict, device: torch.device) -> Encoder:
    from monitor.encoders.ast import build_ast

    return build_ast(spec, device)


def _build_panns(spec: dict, device: torch.device) -> Encoder:
    from monitor.encoders.panns import build_panns

    return build_panns(spec, device)


def _build_wav2vec2(spec: dict, device: torch.device) -> Encoder:
    from monitor.encoders.wav2vec2 import build_wav2vec2

    return build_wav2vec2(spec, device)


def _build_resnet50(spec: dict, device: torch.device) -> Encoder:
    from monitor.encoders.resnet50 import build_resnet50

    return build_resnet50(spec, device)


# Lazy builders keep `import monitor` cheap and avoid importing optional model code up front.
ENCODERS: dict[str, Callable[[dict, torch.device], Encoder]] = {
    "stats": _build_stats,  # the default: no weights, per-band log-mel statistics
    "mel": _build_mel,
    "conv": _build_mel,  # the mel image, encoded by the cnn decoder's learnt stem
    "efficientat": _build_efficientat,
    "ast": _build_ast,
    "panns": _build_panns,
    "wav2vec2": _build_wav2vec2,
    "resnet50": _build_resnet50,
}

# Encoders whose weights come from the weights store (`monitor/weights/store.py`; the others
# have none or learn their own).
PRETRAINED = ("efficientat", "ast", "panns", "wav2vec2", "resnet50")


def build_encoder(spec: dict, device: torch.device) -> Encoder:
    name = spec.get("name")
    if name not in ENCODERS:
        raise UsageError(f"unknown encoder {name!r}; available: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name](spec, device)
