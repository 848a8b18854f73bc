"""`resnet50`: an ImageNet ResNet-50 looking at the log-mel as a picture.

transformers' `ResNetModel` on local weights (default microsoft/resnet-50). harken's log-mel
(`monitor.audio.LogMel`, 128 bands) of each clip is scaled to [0, 1] by its own min and max,
resized to image_size x image_size, repeated over the three colour channels and normalised
with the ImageNet mean and std the network was trained with. Outputs: the pooled 2048-wide
embedding and the last stage's feature map (batch, 2048, 7, 7) for 224 x 224.
"""

from __future__ import annotations

import torch
from torch import nn

from monitor.audio import LogMel, MelParams
from monitor.encoders.base import Embedding, PretrainedEncoder
from monitor.errors import UsageError
from monitor.logs import get_logger
from monitor.weights.store import check_pinned_sha256, locate, weights_sha256
from monitor.weights.checkpoints import load_hf_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNet50Encoder(PretrainedEncoder):
    name = "resnet50"

    def __init__(self, model, weights: str | None = None, weights_sha256: str | None = None,
                 image_size: int = 224):
        super().__init__(weights, weights_sha256)
        if image_size < 32:
            raise UsageError(f"resnet50 image_size must be >= 32, got {image_size}")
        self.model = model
        self.image_size = int(image_size)
        self.log_mel = LogMel(MelParams())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.embedding_dim = int(model.config.hidden_sizes[-1])
        self.freeze()

    def pixels(self, waves: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, 3, image_size, image_size) ImageNet-normalised pixels."""
        if waves.ndim != 2:
            raise UsageError(f"resnet50 expects (batch, samples) audio, got shape {tuple(waves.shape)}")
        mel = self.log_mel(waves.float())  # (batch, 128, frames)
        lo = mel.amin(dim=(1, 2), keepdim=True)
        hi = mel.amax(dim=(1, 2), keepdim=True)
        img = ((mel - lo) / (hi - lo).clamp_min(1e-6)).unsqueeze(1)  # (batch, 1, 128, frames) in [0, 1]
        img = nn.functional.interpolate(img, size=(self.image_size, self.image_size),
                                        mode="bilinear", align_corners=False)
        return (img.expand(-1, 3, -1, -1) - self.mean) / self.std  # (batch, 3, H, W)

    def forward(self, waves: torch.Tensor) -> Embedding:
        out = self.model(pixel_values=self.pixels(waves))
        # last_hidden_state: (batch, 2048, H/32, W/32), rows = mel bands, columns = time
        return Embedding(vector=out.pooler_output.flatten(1), feature_map=out.last_hidden_state)

    def spec_params(self) -> dict:
        return {"image_size": self.image_size, "mel": MelParams().to_json()}


def build_resnet50(spec: dict, device: torch.device) -> ResNet50Encoder:
    from transformers import ResNetModel

    path = locate("resnet50", spec.get("weights"))
    model = load_hf_model(ResNetModel, "resnet50", path, "resnet")
    digest = weights_sha256(path)
    check_pinned_sha256("resnet50", path, digest, spec.get("weights_sha256"))
    enc = ResNet50Encoder(model, str(spec["weights"]) if spec.get("weights") else None, digest,
                          image_size=int(spec.get("image_size", 224)))
    get_logger(stage="encoder").info("encoder_loaded", encoder="resnet50", path=str(path),
                                     dim=enc.embedding_dim, device=str(device))
    return enc.to(device)
