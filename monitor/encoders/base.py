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
    # True when the embedding is the flattened (n_mels, frames) log-mel image itself, so that a
    # reconstruction error over it is an error map (read with getattr: False when absent)
    vector_is_image: bool

    def __call__(self, waves: torch.Tensor) -> Embedding:  # waves: (batch, samples)
        ...

    def spec(self) -> dict:
        """JSON-able description stored in the artifact manifest (name, weights, hash, params)."""
        ...


class PretrainedEncoder(torch.nn.Module):
    """What every pretrained encoder shares: where its weights came from (recorded in the
    artifact, checked on load) and being frozen unless fine-tuning asks otherwise.

    Subclasses set `name`, build their network, call `self.freeze()` last, and list their own
    parameters in `spec_params()`.
    """

    name: str

    def __init__(self, weights: str | None = None, weights_sha256: str | None = None):
        super().__init__()
        self.weights = weights  # None: the weights directory's default file, found at load time
        self.weights_sha256 = weights_sha256

    def freeze(self) -> None:
        self.eval()
        self.requires_grad_(False)

    def spec_params(self) -> dict:
        return {}

    def spec(self) -> dict:
        return {"name": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                **self.spec_params()}
