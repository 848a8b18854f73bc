"""`harken weights fetch` and `harken weights import`: put pretrained encoder weights into the
weights directory (`monitor/weights/store.py`), from the network on a connected machine or from
local files, checking that harken can load them before they replace anything."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import torch

from monitor.encoders.registry import build_encoder
from monitor.errors import HarkenError, UsageError, first_line
from monitor.weights.store import (HF_WEIGHT_FILES, KNOWN, default_path, file_sha256,
                                   hf_weights_file, weights_dir, write_sidecar)


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
        raise _offline_error(encoder, first_line(exc)) from None
    except Exception as exc:  # hub/httpx errors do not all derive from OSError
        _remove(staging)
        if type(exc).__module__.split(".")[0] in _NETWORK_MODULES:
            raise _offline_error(encoder, first_line(exc)) from None
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
        return first_line(exc)
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
