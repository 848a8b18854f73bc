"""Reconstruction decoders: autoencoders trained on normal embeddings or feature maps.

- `mlp`: symmetric MLP over the clip embedding (the seed's baseline and its PANNs/AST decoders).
- `unet`: the seed's fully connected U-Net over the embedding, with skip concatenations.
- `cnn`: a convolutional decoder that reconstructs the 128 x 64 log-mel image from an encoder's
  feature map (or, for the from-scratch `conv` encoder, from the image itself through a learnt
  convolutional stem); its per-time-frequency error is the alarm evidence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monitor.errors import UsageError

IMAGE_SHAPE = (128, 64)  # (mel bands, pooled frames): the cnn decoder's target
MAP_GRID = (8, 8)  # feature maps are average-pooled to at most this grid before storage


class MLPAutoencoder(nn.Module):
    """Symmetric MLP autoencoder: dims [in, h1, ..., bottleneck] mirrored back to `in`, ReLU."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        if len(dims) < 2:
            raise UsageError(f"an MLP autoencoder needs at least 2 widths, got {list(dims)}")
        self.dims = [int(d) for d in dims]
        enc: list[nn.Module] = []
        for a, b in zip(self.dims[:-1], self.dims[1:]):
            enc += [nn.Linear(a, b), nn.ReLU()]
        dec: list[nn.Module] = []
        rev = self.dims[::-1]
        for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
            dec.append(nn.Linear(a, b))
            if i < len(rev) - 2:  # linear output: standardised inputs are not non-negative
                dec.append(nn.ReLU())
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # (batch, in) -> (batch, bottleneck) -> (batch, in)
        return self.decoder(self.encoder(z))


def default_mlp_dims(input_dim: int) -> list[int]:
    """The seed's widths: 8192 -> ... -> 256 for the log-mel image, 768 -> 256 for AST,
    2048 -> 1024 -> 512 -> 256 for PANNs."""
    if input_dim == 8192:
        return [8192, 4096, 2048, 1024, 512, 256]
    if input_dim >= 2048:
        return [input_dim, 1024, 512, 256]
    if input_dim >= 1024:
        return [input_dim, 512, 256]
    return [input_dim, max(32, min(256, input_dim // 2))]


def default_unet_dims(input_dim: int) -> list[int]:
    """The seed's U-Net for AST is 768 -> 1024 -> 512, bottleneck 128; other widths scale."""
    def r8(x: float) -> int:
        return max(8, int(round(x / 8)) * 8)

    return [input_dim, min(r8(input_dim * 4 / 3), 2048), min(r8(input_dim * 2 / 3), 1024),
            min(r8(input_dim / 6), 256)]


class UNetAutoencoder(nn.Module):
    """Fully connected U-Net: dims [in, h1, h2, bottleneck].

    encoder in -> h1 -> h2, bottleneck h2 -> b -> h2, decoder [h2 + h2] -> h1, [h1 + h1] -> in.
    """

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        if len(dims) != 4:
            raise UsageError(f"the unet decoder takes 4 widths [in, h1, h2, bottleneck], got {list(dims)}")
        d, h1, h2, b = (int(x) for x in dims)
        self.dims = [d, h1, h2, b]
        self.enc1 = nn.Sequential(nn.Linear(d, h1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Linear(h1, h2), nn.ReLU())
        self.bottleneck = nn.Sequential(nn.Linear(h2, b), nn.ReLU(), nn.Linear(b, h2), nn.ReLU())
        self.dec2 = nn.Sequential(nn.Linear(2 * h2, h1), nn.ReLU())
        self.dec1 = nn.Linear(2 * h1, d)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(z)  # (batch, h1)
        e2 = self.enc2(e1)  # (batch, h2)
        mid = self.bottleneck(e2)  # (batch, h2)
        d2 = self.dec2(torch.cat([mid, e2], dim=1))  # (batch, h1)
        return self.dec1(torch.cat([d2, e1], dim=1))  # (batch, in)


def _up_block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


def _down_block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class CnnDecoder(nn.Module):
    """Feature map (batch, C, f, t) -> log-mel image (batch, 128, 64).

    A pretrained encoder's map is pooled to (8, 4) and projected with a 1x1 conv; the mel image
    itself (the from-scratch `conv` autoencoder) goes through a learnt strided stem instead.
    Either way the bottleneck is (width, 8, 4) and 4 upsampling blocks reach 128 x 64. There
    are no skips from the stem: in an autoencoder they would let anomalies through untouched.
    """

    def __init__(self, in_channels: int, in_hw: Sequence[int], width: int = 64):
        super().__init__()
        self.in_channels, self.in_hw, self.width = int(in_channels), tuple(int(x) for x in in_hw), width
        self.from_image = self.in_hw == IMAGE_SHAPE
        chans = [width // 4, width // 2, width, width, width]  # at 128x64, 64x32, 32x16, 16x8, 8x4
        if self.from_image:
            self.stem = nn.Sequential(*[_down_block(c_in, c_out) for c_in, c_out in
                                        zip([in_channels, *chans[1:4]], chans[1:])])
        else:
            self.stem = nn.Sequential(nn.AdaptiveAvgPool2d((8, 4)), nn.Conv2d(in_channels, width, 1),
                                      nn.BatchNorm2d(width), nn.ReLU())
        self.ups = nn.Sequential(*[_up_block(chans[i], chans[i - 1]) for i in (4, 3, 2, 1)])
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.stem(fmap)  # (batch, width, 8, 4)
        return self.head(self.ups(x))[:, 0]  # (batch, 128, 64)


DECODERS = {"mlp": MLPAutoencoder, "unet": UNetAutoencoder, "cnn": CnnDecoder}
VECTOR_DECODERS = ("mlp", "unet")


def pool_map(fmap: torch.Tensor) -> torch.Tensor:
    """Shrink a feature map to at most MAP_GRID before it is stored or cached; the mel image
    (1 x 128 x 64, the `conv` encoder's map) is kept whole."""
    if fmap.shape[1] == 1:
        return fmap
    f, t = fmap.shape[-2:]
    return nn.functional.adaptive_avg_pool2d(fmap, (min(f, MAP_GRID[0]), min(t, MAP_GRID[1])))
