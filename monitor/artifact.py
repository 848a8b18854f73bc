"""Model artifacts: a directory with `manifest.json` and `model.safetensors`. No pickles.

The manifest says what the model is (encoder, scorers, front end, threshold, statistics, where
the training data came from); the safetensors file holds every tensor. Loading checks the
format version, every manifest entry, the tensor file's hash, that no tensor holds NaN, and
names the file and the problem. Saving writes a complete artifact into a temporary sibling
directory and swaps it into place, so the old model survives a crash or a signal mid-save.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import monitor
from monitor.errors import ArtifactError, UsageError
from monitor.manifest import FORMAT, FORMAT_VERSION, WRITTEN_BY_SAVE, Manifest

MANIFEST = "manifest.json"
TENSORS = "model.safetensors"


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: Manifest
    tensors: dict[str, torch.Tensor]


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


MODEL_FILES = (MANIFEST, TENSORS, MANIFEST + ".tmp")  # what a model directory may hold
MAX_MANIFEST_BYTES = 16 << 20
_STAGING = ".partial-"


def check_model_dir(out: str | Path) -> None:
    """`out` may be replaced by a new model: absent, an empty directory or a model directory.

    A directory holding anything else (a data set, a home directory) is refused: replacing it
    would delete those files."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory; choose a model directory")
    try:
        others = sorted(p.name for p in out.iterdir() if p.name not in MODEL_FILES)
    except OSError as exc:
        raise UsageError(f"{out}: cannot list it ({exc.strerror or exc})") from None
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UsageError(f"{out}: holds files that are not part of a harken model ({shown}); "
                         "choose an empty or new directory for the model")


def save_artifact(out_dir: str | Path, manifest: Manifest | Mapping,
                  tensors: dict[str, torch.Tensor], *,
                  verify: Callable[[Path], object] | None = None) -> Path:
    """Write the artifact into a temporary sibling directory, check it, then move it into place.

    `manifest` is a Manifest (its format version, harken version, creation time and tensor
    hash are written afresh) or a mapping of the other keys, as `harken train` builds it.

    The old model at `out_dir` stays complete and loadable until the new one is: a crash or a
    signal at any point leaves either the old model or the new one, never a mixture.
    `verify(staging_dir)` runs on the complete new artifact before it replaces the old one.
    """
    out = Path(out_dir)
    check_model_dir(out)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{parent}: cannot create the model's directory ({exc.strerror or exc})") from None
    _remove_stale_staging(parent, out.name)
    staging = parent / f".{out.name}{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        tensor_path = staging / TENSORS
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tensor_path))
        _fsync(tensor_path)
        given = manifest
        if isinstance(manifest, Manifest):  # stamped afresh below
            given = {k: v for k, v in manifest.items() if k not in WRITTEN_BY_SAVE}
        full = Manifest.from_json({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "harken_version": monitor.__version__,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **given,
            "tensors_sha256": sha256_file(tensor_path),
        }, out / MANIFEST, saving=True)
        check_tensors(tensors, out / TENSORS, saving=True)
        (staging / MANIFEST).write_text(json.dumps(full.to_json(), indent=2, allow_nan=False)
                                        + "\n")
        _fsync(staging / MANIFEST)
        _fsync(staging)
        if verify is not None:
            verify(staging)
        _move_into_place(staging, out)
    except (OSError, SafetensorError) as exc:  # a full disk, a read-only mount, a quota
        shutil.rmtree(staging, ignore_errors=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"{out}: cannot save the model ({why}); the previous model there, "
                         "if any, is unchanged") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_staging(parent: Path, name: str) -> None:
    """Staging directories of saves that were killed (their process is gone)."""
    for p in parent.glob(f".{glob.escape(name)}{_STAGING}*"):
        pid = p.name[len(name) + 1 + len(_STAGING):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(staging, out)  # rename(2) replaces an empty directory atomically
    elif _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old model
    else:
        # No atomic exchange here (not Linux, or the file system lacks it): a crash between
        # the two renames leaves the old model complete under the `.old-` name.
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(out.absolute().parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically with Linux renameat2(RENAME_EXCHANGE); False when the
    system cannot (the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_tensors(tensors: dict[str, torch.Tensor], where: Path, *, saving: bool = False) -> None:
    """No NaN or infinity in any floating-point tensor: they would make every score NaN."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            if saving:
                raise ArtifactError(f"refusing to save a model whose tensor {name!r} has {n_bad} "
                                    "NaN or infinite values (training diverged?)")
            raise ArtifactError(f"{where}: tensor {name!r} has {n_bad} NaN or infinite values; "
                                "the model is corrupted, retrain it")


def load_artifact(path: str | Path) -> Artifact:
    root = Path(path)
    if root.is_file() and root.name == MANIFEST:
        root = root.parent
    manifest_path = root / MANIFEST
    if not root.exists():
        olds = sorted(root.absolute().parent.glob(f".{glob.escape(root.name)}.old-*"))
        if olds:
            raise ArtifactError(f"{root}: model directory does not exist; a save into it was "
                                f"interrupted and the previous model is complete at {olds[-1]}: "
                                f"move it back to {root}")
        raise ArtifactError(f"{root}: model directory does not exist (train one with `harken train`)")
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: missing; {root} is not a harken model directory")
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{manifest_path}: over {MAX_MANIFEST_BYTES >> 20} MB; not a "
                                "harken model manifest")
        raw = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    except RecursionError:
        raise ArtifactError(f"{manifest_path}: nested too deeply; not a harken model manifest") from None
    except OSError as exc:
        raise ArtifactError(f"{manifest_path}: cannot read it ({exc.strerror or exc})") from None
    manifest = Manifest.from_json(raw, manifest_path)
    tensor_path = root / TENSORS
    if not tensor_path.is_file():
        raise ArtifactError(f"{tensor_path}: missing")
    digest = sha256_file(tensor_path)
    if digest != manifest.tensors_sha256:
        raise ArtifactError(
            f"{tensor_path}: sha256 {digest[:12]}... does not match the manifest "
            f"({manifest.tensors_sha256[:12]}...); the file is corrupted or was replaced"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{tensor_path}: unreadable safetensors file ({exc})") from None
    check_tensors(tensors, tensor_path)
    if "calibration" in manifest:  # models trained before calibration have none
        from monitor.calibration import calibration_problem

        why = calibration_problem(manifest["calibration"], tensors)
        if why is not None:
            raise ArtifactError(f"{manifest_path}: {why}")
    return Artifact(root, manifest, tensors)
