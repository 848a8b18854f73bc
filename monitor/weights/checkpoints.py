"""Checkpoint loaders the encoders use: torch state dicts read safely and loaded strictly, and
Hugging Face model directories loaded from local files only, each failure one line naming the
file."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

from monitor.errors import UsageError, first_line
from monitor.weights.store import hf_weights_file

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
        raise UsageError(f"{config_file}: not valid JSON ({first_line(exc)})") from None
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
                         f"({first_line(exc)})") from None
    except Exception as exc:  # safetensors raises its own SafetensorError
        if type(exc).__module__.split(".")[0] != "safetensors":
            raise
        raise UsageError(f"{weights_file}: cannot be loaded as {encoder} weights "
                         f"({first_line(exc)})") from None
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
        raise UsageError(f"{f}: not valid JSON ({first_line(exc)})") from None
    return value if isinstance(value, dict) else {}
