"""Where pretrained encoder weights live on a machine, and how a missing file is reported.

harken never downloads at run time: training, evaluation and the daemon load only local files.
`harken weights fetch` (on a connected machine) or `harken weights import` put them in the
weights directory; this module finds them there.

Weights directory, first match wins: $HARKEN_WEIGHTS_DIR, $CACHE_DIRECTORY/weights (systemd's
CacheDirectory=), $XDG_CACHE_HOME/harken/weights, ~/.cache/harken/weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from monitor.errors import UsageError


@dataclass(frozen=True)
class KnownWeights:
    """One encoder's default weights: what they are and how they are stored."""

    encoder: str
    name: str  # the directory or file name under the weights directory
    kind: str  # "hf-dir" (config.json + model.safetensors) | "file" (a single checkpoint)
    source: str  # where `harken weights fetch` gets them
    size_bytes: int | None = None
    sha256: str | None = None  # of the file (kind "file") when published


# The explicit table of every encoder's default weights.
KNOWN: dict[str, KnownWeights] = {
    "ast": KnownWeights("ast", "ast-finetuned-audioset-10-10-0.4593", "hf-dir",
                        "hf:MIT/ast-finetuned-audioset-10-10-0.4593"),
    "wav2vec2": KnownWeights("wav2vec2", "wav2vec2-base", "hf-dir", "hf:facebook/wav2vec2-base"),
    "resnet50": KnownWeights("resnet50", "resnet-50", "hf-dir", "hf:microsoft/resnet-50"),
    "panns": KnownWeights("panns", "Cnn14_16k_mAP=0.438.pth", "file",
                          "https://zenodo.org/record/3987831/files/Cnn14_16k_mAP%3D0.438.pth"),
    "efficientat": KnownWeights("efficientat", "mn04_as_mAP_432.pt", "file",
                                "https://github.com/fschmid56/EfficientAT/releases/download/"
                                "v0.0.1/mn04_as_mAP_432.pt", 4_066_513,
                                "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"),
}


def weights_dir() -> Path:
    if os.environ.get("HARKEN_WEIGHTS_DIR"):
        return Path(os.environ["HARKEN_WEIGHTS_DIR"])
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0]) / "weights"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "harken" / "weights"


def default_path(encoder: str) -> Path:
    return weights_dir() / KNOWN[encoder].name


def locate(encoder: str, explicit: str | Path | None = None) -> Path:
    """The weights to load for `encoder`: the explicit path when given, else the default one.

    Raises UsageError naming the encoder, the path looked in and the command that fixes it.
    """
    path = Path(explicit).expanduser() if explicit else default_path(encoder)
    if path.exists():
        return path
    how = (f"copy them here with `harken weights import {encoder} PATH`, or run "
           f"`harken weights fetch {encoder}` on a machine with internet access and copy "
           f"{weights_dir()} over")
    raise UsageError(f"{encoder} weights not found at {path}; {how}")
