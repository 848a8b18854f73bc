"""The explicit encoder registry: name -> builder(spec, device)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from monitor.encoders.base import Encoder
from monitor.errors import UsageError


def _build_mel(spec: dict, device: torch.device) -> Encoder:
    from monitor.encoders.mel import build_mel

    return build_mel(spec, device)


def _build_efficientat(spec: dict, device: torch.device) -> Encoder:
    from monitor.encoders.efficientat import load_efficientat

    return load_efficientat(
        spec.get("weights"), device=device, embedding=spec.get("embedding", "pooled384")
    ).eval()


# Lazy builders keep `import monitor` cheap and avoid importing optional model code up front.
ENCODERS: dict[str, Callable[[dict, torch.device], Encoder]] = {
    "mel": _build_mel,
    "conv": _build_mel,  # the mel image, encoded by the cnn decoder's learnt stem
    "efficientat": _build_efficientat,
}


def build_encoder(spec: dict, device: torch.device) -> Encoder:
    name = spec.get("name")
    if name not in ENCODERS:
        raise UsageError(f"unknown encoder {name!r}; available: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name](spec, device)
