"""What every encoder returns, and the interface the scorers rely on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Embedding:
    """One batch of encoder output."""

    vector: torch.Tensor  # (batch, dim) clip embedding
    feature_map: torch.Tensor | None = None  # (batch, channels, freq, time) where the model has one


class Encoder(Protocol):
    """A frozen feature extractor. Input is always 16 kHz mono float32 on the encoder's device.

    Encoders resample internally when their network wants another rate (EfficientAT: 32 kHz),
    so every caller feeds harken's canonical audio.
    """

    name: str
    embedding_dim: int

    def __call__(self, waves: torch.Tensor) -> Embedding:  # waves: (batch, samples)
        ...

    def spec(self) -> dict:
        """JSON-able description stored in the artifact manifest (name, weights, hash, params)."""
        ...
