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
import math
import os
import reprlib
import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import monitor
from monitor.errors import ArtifactError, UsageError

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


MODEL_FILES = (MANIFEST, TENSORS, MANIFEST + ".tmp")  # what a model directory may hold
MAX_MANIFEST_BYTES = 16 << 20
MAX_WINDOW_S = 600.0
FUSION_METHODS = ("mean", "max")
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


def save_artifact(out_dir: str | Path, manifest: dict, tensors: dict[str, torch.Tensor], *,
                  verify: Callable[[Path], object] | None = None) -> Path:
    """Write the artifact into a temporary sibling directory, check it, then move it into place.

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
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "harken_version": monitor.__version__,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **manifest,
            "tensors_sha256": sha256_file(tensor_path),
        }
        validate_manifest(full, out / MANIFEST, saving=True)
        check_tensors(tensors, out / TENSORS, saving=True)
        (staging / MANIFEST).write_text(json.dumps(full, indent=2, allow_nan=False) + "\n")
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


# --------------------------------------------------------------------------- validation


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(value, limit: int = 60) -> str:
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_manifest(m: dict, where: Path, *, saving: bool = False) -> None:
    """Everything a loader relies on, checked before any of it is used: one ArtifactError
    naming the file and the key (a hand-edited or corrupted manifest never gives a traceback)."""
    prefix = "refusing to save the model: " if saving else f"{where}: "

    def bad(key: str, msg: str):
        raise ArtifactError(f"{prefix}{key}: {msg}")

    version = m.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        bad("format_version", "is missing or not an integer")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{where}: format_version {version} is newer than this harken "
                            f"supports ({FORMAT_VERSION}); upgrade harken")
    if version < 1:
        bad("format_version", f"must be 1..{FORMAT_VERSION}, got {version}")
    for key in ("encoder", "scorers", "threshold", "sample_rate_hz", "window_s", "tensors_sha256"):
        if key not in m:
            raise ArtifactError(f"{where}: required key {key!r} is missing")
    enc = m["encoder"]
    if not isinstance(enc, dict) or not isinstance(enc.get("name"), str) or not enc["name"]:
        bad("encoder", f"must be a mapping with a name, got {_short(enc)}")
    _check_front_end(enc, bad)
    scorers = m["scorers"]
    if not isinstance(scorers, list) or not scorers:
        bad("scorers", f"must be a non-empty list of scorers, got {_short(scorers)}")
    from monitor.scorers import SCORERS, scorer_kind  # here, not at import: artifact stays light

    names = []
    for i, s in enumerate(scorers):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            bad(f"scorers[{i}]", f"must be a mapping with a name, got {_short(s)}")
        if scorer_kind(s["name"]) not in SCORERS:
            bad(f"scorers[{i}].name", f"unknown scorer {_short(s['name'])} "
                                      f"(known: {', '.join(SCORERS)})")
        if s["name"] in names:
            bad(f"scorers[{i}].name", f"{s['name']!r} appears twice")
        names.append(s["name"])
    fusion = m.get("fusion", {"method": "mean", "stats": {}})
    if not isinstance(fusion, dict) or fusion.get("method") not in FUSION_METHODS:
        got = fusion.get("method") if isinstance(fusion, dict) else fusion
        bad("fusion.method", f"must be one of {', '.join(FUSION_METHODS)}, got {_short(got)}")
    stats = fusion.get("stats")
    if not isinstance(stats, dict):
        bad("fusion.stats", f"must be a mapping, got {_short(stats)}")
    for name, pair in stats.items():
        if (not isinstance(pair, list) or len(pair) != 2 or not all(map(_finite_number, pair))
                or pair[1] <= 0):
            bad(f"fusion.stats.{_short(name, 20)}",
                f"must be [mean, std > 0] of finite numbers, got {_short(pair)}")
    if fusion.get("transform", "none") not in ("none", "log"):
        bad("fusion.transform", f"must be none or log, got {_short(fusion.get('transform'))}")
    fusion_per_id = fusion.get("per_id", {})
    if not isinstance(fusion_per_id, dict):
        bad("fusion.per_id", f"must be a mapping of machine ID to statistics, got {_short(fusion_per_id)}")
    for key, id_stats in fusion_per_id.items():
        if not isinstance(id_stats, dict) or set(id_stats) != set(stats):
            bad(f"fusion.per_id.{_short(key, 10)}", "must hold statistics for the same scorers as fusion.stats")
        for name, pair in id_stats.items():
            if (not isinstance(pair, list) or len(pair) != 2 or not all(map(_finite_number, pair))
                    or pair[1] <= 0):
                bad(f"fusion.per_id.{_short(key, 10)}.{_short(name, 20)}",
                    f"must be [mean, std > 0] of finite numbers, got {_short(pair)}")
    if len(names) > 1 and not set(names) <= set(stats):
        bad("fusion.stats", f"has no statistics for {', '.join(sorted(set(names) - set(stats)))} "
                            "(needed to fuse several scorers)")
    th = m["threshold"]
    if not isinstance(th, dict) or "value" not in th:
        bad("threshold", f"must be a mapping with a value, got {_short(th)}")
    if not _finite_number(th["value"]):
        bad("threshold.value", f"must be a finite number, got {_short(th['value'])} "
                               "(retrain the model)")
    per_id = th.get("per_id", {})
    if not isinstance(per_id, dict):
        bad("threshold.per_id", f"must be a mapping of machine ID to threshold, got {_short(per_id)}")
    for key, value in per_id.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 6):
            bad("threshold.per_id", f"keys must be machine IDs like \"00\", got {_short(key)}")
        if not _finite_number(value):
            bad(f"threshold.per_id.{key}", f"must be a finite number, got {_short(value)}")
    rate = m["sample_rate_hz"]
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        bad("sample_rate_hz", f"must be a positive integer, got {_short(rate)}")
    w = m["window_s"]
    if not _finite_number(w) or not 0 < w <= MAX_WINDOW_S:
        bad("window_s", f"must be a number in (0, {MAX_WINDOW_S:g}] seconds, got {_short(w)}")
    digest = m["tensors_sha256"]
    if not isinstance(digest, str) or len(digest) != 64:
        bad("tensors_sha256", f"must be a sha256 hex digest, got {_short(digest)}")
    if "name" in m and not isinstance(m["name"], str):
        bad("name", f"must be a string, got {_short(m['name'])}")


_MEL_INTS = {"sample_rate_hz": (8_000, 48_000), "n_fft": (16, 65_536), "hop_length": (1, 65_536),
             "n_mels": (1, 1_024)}


def _check_front_end(enc: dict, bad) -> None:
    """The log-mel settings an encoder spec may carry are used only when scoring starts:
    check them here, so a hand-edited one fails at load, not in the first batch."""
    if "image_frames" in enc:
        v = enc["image_frames"]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100_000:
            bad("encoder.image_frames", f"must be an integer in 1..100000, got {_short(v)}")
    if "mel" not in enc:
        return
    mel = enc["mel"]
    from monitor.audio import MelParams

    known = set(MelParams.__dataclass_fields__)
    if not isinstance(mel, dict) or not set(mel) <= known:
        bad("encoder.mel", f"must be a mapping of {', '.join(sorted(known))}, got {_short(mel)}")
    for key, (lo, hi) in _MEL_INTS.items():
        if key in mel:
            v = mel[key]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                bad(f"encoder.mel.{key}", f"must be an integer in {lo}..{hi}, got {_short(v)}")
    for key in ("f_min_hz", "log_floor"):
        if key in mel and (not _finite_number(mel[key]) or mel[key] < 0):
            bad(f"encoder.mel.{key}", f"must be a finite number >= 0, got {_short(mel[key])}")
    if "log_floor" in mel and mel["log_floor"] <= 0:
        bad("encoder.mel.log_floor", f"must be > 0, got {_short(mel['log_floor'])}")
    if mel.get("f_max_hz") is not None and (not _finite_number(mel["f_max_hz"])
                                            or mel["f_max_hz"] <= mel.get("f_min_hz", 0.0)):
        bad("encoder.mel.f_max_hz", f"must be empty or a number above f_min_hz, got "
                                    f"{_short(mel['f_max_hz'])}")


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
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    except RecursionError:
        raise ArtifactError(f"{manifest_path}: nested too deeply; not a harken model manifest") from None
    except OSError as exc:
        raise ArtifactError(f"{manifest_path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: not a harken model manifest (format != {FORMAT!r})")
    validate_manifest(manifest, manifest_path)
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
    check_tensors(tensors, tensor_path)
    if "calibration" in manifest:  # models trained before calibration have none
        from monitor.calibration import calibration_problem

        why = calibration_problem(manifest["calibration"], tensors)
        if why is not None:
            raise ArtifactError(f"{manifest_path}: {why}")
    return Artifact(root, manifest, tensors)
