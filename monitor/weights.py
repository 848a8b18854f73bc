"""Where pretrained encoder weights live on a machine, and how a missing file is reported.

harken never downloads at run time: training, evaluation and the daemon load only local files.
`harken weights fetch` (on a connected machine) or `harken weights import` put them in the
weights directory; this module finds them there.

Weights directory, first match wins: $HARKEN_WEIGHTS_DIR, $CACHE_DIRECTORY/weights (systemd's
CacheDirectory=), $XDG_CACHE_HOME/harken/weights, ~/.cache/harken/weights.

Imported or fetched weights get a sidecar `<name>.harken.json` with the sha256 of every file,
which `harken weights verify` rechecks; encoders also record the weights' sha256 in the model
artifact, so a model never runs on weights other than those it was trained with.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from monitor.artifact import sha256_file
from monitor.errors import HarkenError, UsageError


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


def read_torch_checkpoint(path: Path, what: str) -> object:
    """`torch.load(weights_only=True)`: tensors and plain containers only, never pickled code.
    Anything unreadable is one UsageError naming the file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, io.UnsupportedOperation) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path}: not a readable {what} checkpoint ({reason[:200]})") from None


def load_strict(net, state: dict, path: Path, what: str) -> None:
    """`load_state_dict(strict=True)` with the first mismatch of each kind named in one line,
    instead of torch's multi-line report."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    problems = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + \
               ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []) + \
               ([f"{len(wrong)} wrong shapes (e.g. {wrong[0]})"] if wrong else [])
    if problems:
        raise UsageError(f"{path}: not {what} weights: {'; '.join(problems)}")
    net.load_state_dict(state, strict=True)


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


# --------------------------------------------------------------------------- import and fetch


def import_weights(encoder: str, source: str | Path, *, force: bool = False) -> Path:
    """Copy a local checkpoint file (panns, efficientat) or HF model directory (ast, wav2vec2,
    resnet50) into the weights directory, after checking that harken can load it."""
    import shutil

    if encoder not in KNOWN:
        raise UsageError(f"{encoder!r} has no pretrained weights to import; encoders with weights: "
                         f"{', '.join(KNOWN)}")
    known = KNOWN[encoder]
    src = Path(source).expanduser()
    if not src.exists():
        raise UsageError(f"{src}: no such file or directory")
    if known.kind == "hf-dir":
        if not src.is_dir() or not (src / "config.json").is_file():
            raise UsageError(f"{src}: {encoder} weights are a Hugging Face model directory "
                             f"(config.json + model.safetensors)")
        hf_weights_file(src)
    elif not src.is_file():
        raise UsageError(f"{src}: {encoder} weights are a single checkpoint file, not a directory")
    _validate(encoder, src)
    dest = default_path(encoder)
    if dest.exists() and not force:
        raise UsageError(f"{dest} already exists; pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.importing"
    _remove(staging)
    if known.kind == "hf-dir":
        shutil.copytree(src, staging)
    else:
        shutil.copyfile(src, staging)
    _remove(dest)
    os.replace(staging, dest)
    write_sidecar(encoder, dest, str(src.resolve()))
    return dest


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _validate(encoder: str, path: Path) -> None:
    """Build the encoder from `path` on the CPU: raises UsageError naming a bad file."""
    from monitor.encoders.registry import build_encoder

    import torch

    build_encoder({"name": encoder, "weights": str(path)}, torch.device("cpu"))


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HARKEN_OFFLINE"))


def _offline_error(encoder: str, reason: str) -> HarkenError:
    return HarkenError(f"cannot download {encoder} weights ({reason}); run `harken weights fetch "
                      f"{encoder}` on a machine with internet access and copy {default_path(encoder)} "
                      f"into this machine's weights directory ({weights_dir()}), or use "
                      f"`harken weights import {encoder} PATH`")


def fetch_weights(encoder: str, *, force: bool = False) -> Path:
    """Download an encoder's default weights into the weights directory and verify them.

    Raises HarkenError (exit 1, one line) when offline or the download fails."""
    if encoder not in KNOWN:
        raise UsageError(f"{encoder!r} has no pretrained weights to fetch; encoders with weights: "
                         f"{', '.join(KNOWN)}")
    known = KNOWN[encoder]
    dest = default_path(encoder)
    if dest.exists() and not force:
        raise UsageError(f"{dest} already exists; pass --force to download again")
    if offline():
        raise _offline_error(encoder, "offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE "
                                      "/ HARKEN_OFFLINE)")
    host = "huggingface.co" if known.source.startswith("hf:") else urlsplit(known.source).hostname
    reason = _unreachable(host)
    if reason:  # one quick probe instead of the hub client's minute of retries
        raise _offline_error(encoder, f"{host} unreachable: {reason}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.fetching"
    _remove(staging)
    try:
        if known.source.startswith("hf:"):
            _fetch_hf(known.source[3:], staging)
        else:
            _fetch_url(known.source, staging)
    except HarkenError:
        _remove(staging)
        raise
    except (OSError, ValueError) as exc:  # connection refused, DNS, HTTP errors, hub errors
        _remove(staging)
        raise _offline_error(encoder, _first_line(exc)) from None
    except Exception as exc:  # hub/httpx errors do not all derive from OSError
        _remove(staging)
        if type(exc).__module__.split(".")[0] in _NETWORK_MODULES:
            raise _offline_error(encoder, _first_line(exc)) from None
        raise
    if known.kind == "file":
        size, digest = staging.stat().st_size, file_sha256(staging)
        if (known.size_bytes and size != known.size_bytes) or (known.sha256 and digest != known.sha256):
            _remove(staging)
            raise HarkenError(f"downloaded {encoder} weights from {known.source} do not match the "
                              f"published size/sha256 (got {size} bytes, sha256 {digest[:12]}...)")
    _remove(dest)
    os.replace(staging, dest)
    _validate(encoder, dest)
    write_sidecar(encoder, dest, known.source)
    return dest


_NETWORK_MODULES = ("huggingface_hub", "httpx", "httpx2", "httpcore", "httpcore2", "requests",
                    "urllib3")


def _unreachable(host: str | None, timeout_s: float = 5.0) -> str | None:
    """None when a TCP connection to host:443 opens, else why not."""
    import socket

    if not host:
        return "no host in the download address"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as exc:
        return _first_line(exc)
    return None


def _fetch_hf(repo: str, out: Path) -> None:
    from huggingface_hub import list_repo_files, snapshot_download

    files = set(list_repo_files(repo))
    weights = next((f for f in HF_WEIGHT_FILES if f in files), None)
    if weights is None:
        raise HarkenError(f"hf:{repo} has none of {', '.join(HF_WEIGHT_FILES)}")
    wanted = ["config.json", weights] + [f for f in ("preprocessor_config.json",) if f in files]
    snapshot_download(repo, local_dir=str(out), allow_patterns=wanted)
    for junk in (out / ".cache",):  # huggingface_hub's download metadata, not part of the model
        _remove(junk)


def _fetch_url(url: str, out: Path) -> None:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as resp, open(out, "wb") as f:  # noqa: S310
        while block := resp.read(1 << 20):
            f.write(block)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# --------------------------------------------------------------------------- loading HF models


def load_hf_model(model_cls, encoder: str, path: Path, model_type: str, **kwargs):
    """`model_cls.from_pretrained(path)` from local files only, with one-line errors that name
    the file at fault instead of transformers' multi-page tracebacks or silent random weights."""
    if not path.is_dir():
        raise UsageError(f"{path}: {encoder} weights are a Hugging Face model directory "
                         f"(config.json + model.safetensors), not a file")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise UsageError(f"{config_file}: missing; not a Hugging Face model directory") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config_file}: not valid JSON ({_first_line(exc)})") from None
    found = config.get("model_type") if isinstance(config, dict) else None
    if found != model_type:
        raise UsageError(f"{config_file}: model_type {found!r} is not {model_type!r}; these are not "
                         f"{encoder} weights")
    weights_file = hf_weights_file(path)
    import torch
    from transformers.utils import logging as hf_logging

    # The heads of the published checkpoints (classifier, quantizer) are expected leftovers:
    # keep transformers' load report and progress bar quiet and check missing keys below.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = model_cls.from_pretrained(str(path), local_files_only=True,
                                                output_loading_info=True, dtype=torch.float32,
                                                **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError) as exc:
        raise UsageError(f"{weights_file}: cannot be loaded as {encoder} weights "
                         f"({_first_line(exc)})") from None
    except Exception as exc:  # safetensors raises its own SafetensorError
        if type(exc).__module__.split(".")[0] != "safetensors":
            raise
        raise UsageError(f"{weights_file}: cannot be loaded as {encoder} weights "
                         f"({_first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    bad = list(info.get("missing_keys") or []) + [str(k[0]) if isinstance(k, tuple) else str(k)
                                                   for k in info.get("mismatched_keys") or []]
    if bad:
        raise UsageError(f"{weights_file}: {len(bad)} {encoder} weights missing or of the wrong "
                         f"shape (e.g. {sorted(bad)[0]}); incompatible checkpoint")
    return model


def read_preprocessor_config(path: Path) -> dict:
    """preprocessor_config.json of an HF model directory, or {} when it has none."""
    f = path / "preprocessor_config.json"
    if not f.is_file():
        return {}
    try:
        value = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{f}: not valid JSON ({_first_line(exc)})") from None
    return value if isinstance(value, dict) else {}
