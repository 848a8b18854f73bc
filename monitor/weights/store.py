"""Where pretrained encoder weights live on a machine, what they are, and whether they are
intact: the runtime side of weights (no network code, no encoder imports).

harken never downloads at run time: training, evaluation and the daemon load only local files.
`harken weights fetch` (on a connected machine) or `harken weights import` (both in
`train/weights.py`) put them in the weights directory; this module finds and verifies them.

Weights directory, first match wins: $HARKEN_WEIGHTS_DIR, $CACHE_DIRECTORY/weights (systemd's
CacheDirectory=), $XDG_CACHE_HOME/harken/weights, ~/.cache/harken/weights.

Imported or fetched weights get a sidecar `<name>.harken.json` with the sha256 of every file,
which `harken weights verify` rechecks; encoders also record the weights' sha256 in the model
artifact, so a model never runs on weights other than those it was trained with.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from monitor.artifact import sha256_file
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


# --------------------------------------------------------------------------- hashes and sidecars

SIDECAR_SUFFIX = ".harken.json"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # preferred first


def file_sha256(path: str | Path) -> str:
    return sha256_file(Path(path))



def hf_weights_file(directory: Path) -> Path:
    """The weights file of a Hugging Face model directory (safetensors preferred)."""
    for name in HF_WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise UsageError(f"{directory}: no {' or '.join(HF_WEIGHT_FILES)} in this model directory")


def weights_sha256(path: Path) -> str:
    """sha256 of what an encoder loads: the checkpoint file, or an HF directory's weights file."""
    return file_sha256(hf_weights_file(path) if path.is_dir() else path)


def check_pinned_sha256(encoder: str, path: Path, digest: str, pinned: str | None) -> None:
    """An artifact pins the weights it was trained with; other weights would give other embeddings."""
    if pinned and digest != pinned:
        raise UsageError(f"{path}: {encoder} weights sha256 {digest[:12]}... differ from the "
                         f"{pinned[:12]}... the model was trained with; install those weights or "
                         f"retrain")


def sidecar_path(target: Path) -> Path:
    """`<weights file or directory>.harken.json`, next to it in the weights directory."""
    return target.parent / (target.name + SIDECAR_SUFFIX)


def _files_of(target: Path) -> dict[str, Path]:
    if target.is_file():
        return {target.name: target}
    return {str(p.relative_to(target)): p for p in sorted(target.rglob("*")) if p.is_file()}


def write_sidecar(encoder: str, target: Path, source: str) -> dict:
    """Record the sha256 of every file of `target` so `harken weights verify` can recheck them."""
    files = {rel: {"sha256": file_sha256(p), "size_bytes": p.stat().st_size}
             for rel, p in _files_of(target).items()}
    record = {"encoder": encoder, "name": target.name, "source": source, "files": files,
              "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = sidecar_path(target).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, sidecar_path(target))
    return record


@dataclass(frozen=True)
class WeightsStatus:
    """What `harken weights list / verify` report for one encoder."""

    encoder: str
    path: Path | None  # None: the encoder needs no weights
    present: bool
    size_bytes: int | None
    check: str  # ok | mismatch | unknown (no reference hash) | absent | none needed
    problems: tuple[str, ...] = ()  # one line per bad file, naming it

    def to_json(self) -> dict:
        return {"encoder": self.encoder, "path": str(self.path) if self.path else None,
                "present": self.present, "size_bytes": self.size_bytes, "sha256": self.check,
                "problems": list(self.problems)}


def _size(target: Path) -> int:
    return sum(p.stat().st_size for p in _files_of(target).values())


def check_weights(encoder: str) -> WeightsStatus:
    """Compare the weights in the weights directory with their sidecar, else KNOWN's sha256."""
    if encoder not in KNOWN:
        return WeightsStatus(encoder, None, True, None, "none needed")
    target = default_path(encoder)
    if not target.exists():
        return WeightsStatus(encoder, target, False, None, "absent")
    size = _size(target)
    side = sidecar_path(target)
    expected: dict[str, str] = {}
    if side.is_file():
        try:
            expected = {rel: v["sha256"] for rel, v in json.loads(side.read_text())["files"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            return WeightsStatus(encoder, target, True, size, "mismatch",
                                 (f"{side}: unreadable sidecar ({exc})",))
    elif KNOWN[encoder].sha256 and target.is_file():
        expected = {target.name: KNOWN[encoder].sha256}
    if not expected:
        return WeightsStatus(encoder, target, True, size, "unknown")
    problems = []
    present = _files_of(target)
    for rel, digest in expected.items():
        path = present.get(rel)
        if path is None:
            problems.append(f"{target / rel if target.is_dir() else target}: missing")
        elif file_sha256(path) != digest:
            problems.append(f"{path}: sha256 differs from the recorded {digest[:12]}... (corrupted "
                            f"or replaced)")
    return WeightsStatus(encoder, target, True, size, "mismatch" if problems else "ok",
                         tuple(problems))
