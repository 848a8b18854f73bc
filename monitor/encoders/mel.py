"""`mel`: the seed's log-mel image, the input of its MLP autoencoder baseline.

No weights: the clip's log-mel (128 bands x 1001 frames) is average-pooled over time to a
128 x 64 image and flattened to 8192 values.
"""

from __future__ import annotations

import torch
from torch import nn

from monitor.audio import LogMel, MelParams
from monitor.encoders.base import Embedding


class MelImageEncoder(nn.Module):
    """`mel`; registered a second time as `conv`, the from-scratch convolutional autoencoder's
    input: same image, which the cnn decoder's learnt stem then encodes."""

    vector_is_image = True  # the embedding is the (n_mels, image_frames) image, flattened

    def __init__(self, params: MelParams = MelParams(), image_frames: int = 64, name: str = "mel"):
        super().__init__()
        self.name = name
        self.params = params
        self.image_frames = image_frames
        self.log_mel = LogMel(params)
        self.embedding_dim = params.n_mels * image_frames

    def image(self, waves: torch.Tensor) -> torch.Tensor:
        # (batch, samples) -> (batch, n_mels, frames) -> (batch, n_mels, image_frames)
        mel = self.log_mel(waves)
        return nn.functional.adaptive_avg_pool1d(mel, self.image_frames)

    def forward(self, waves: torch.Tensor) -> Embedding:
        img = self.image(waves)
        return Embedding(vector=img.flatten(1), feature_map=img.unsqueeze(1))

    def spec(self) -> dict:
        return {"name": self.name, "image_frames": self.image_frames, "mel": self.params.to_json()}


def build_mel(spec: dict, device: torch.device) -> MelImageEncoder:
    params = MelParams(**spec.get("mel", {}))
    enc = MelImageEncoder(params, int(spec.get("image_frames", 64)), name=spec.get("name", "mel"))
    return enc.to(device).eval()
