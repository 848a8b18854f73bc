"""Model artifacts: a directory with `manifest.json` and `model.safetensors`. No pickles.

The manifest says what the model is (encoder, scorers, front end, threshold, statistics, where
the training data came from); the safetensors file holds every tensor. Loading checks the
format version, the tensor file's hash and every shape, and names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import monitor
from monitor.errors import ArtifactError

FORMAT = "harken-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "model.safetensors"


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor]


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def save_artifact(out_dir: str | Path, manifest: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write atomically-enough: tensors first, then the manifest that points at their hash."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensor_path = out / TENSORS
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tensor_path))
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "harken_version": monitor.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **manifest,
        "tensors_sha256": sha256_file(tensor_path),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out / MANIFEST)
    return out


def load_artifact(path: str | Path) -> Artifact:
    root = Path(path)
    if root.is_file() and root.name == MANIFEST:
        root = root.parent
    manifest_path = root / MANIFEST
    if not root.exists():
        raise ArtifactError(f"{root}: model directory does not exist (train one with `harken train`)")
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: missing; {root} is not a harken model directory")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: not a harken model manifest (format != {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{manifest_path}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format_version {version} is newer than this harken supports "
            f"({FORMAT_VERSION}); upgrade harken"
        )
    for key in ("encoder", "scorers", "threshold", "sample_rate_hz", "window_s", "tensors_sha256"):
        if key not in manifest:
            raise ArtifactError(f"{manifest_path}: required key {key!r} is missing")
    tensor_path = root / TENSORS
    if not tensor_path.is_file():
        raise ArtifactError(f"{tensor_path}: missing")
    digest = sha256_file(tensor_path)
    if digest != manifest["tensors_sha256"]:
        raise ArtifactError(
            f"{tensor_path}: sha256 {digest[:12]}... does not match the manifest "
            f"({str(manifest['tensors_sha256'])[:12]}...); the file is corrupted or was replaced"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{tensor_path}: unreadable safetensors file ({exc})") from None
    return Artifact(root, manifest, tensors)
