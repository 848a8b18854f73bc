"""On-disk embedding cache: repeated epochs and experiments never re-run a frozen encoder.

Keyed by the file's content hash plus everything that changes the embedding: the encoder spec
(name, weights sha256, parameters), the front end, the window and the hop. Entries are
safetensors files; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from monitor.artifact import sha256_file
from monitor.logs import get_logger


def default_cache_dir() -> Path:
    base = os.environ.get("HARKEN_CACHE_DIR") or os.environ.get("CACHE_DIRECTORY")
    if base:
        return Path(base) / "embeddings"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harken" / "embeddings"


def file_digest(path: Path) -> str:
    return sha256_file(path)


class EmbeddingCache:
    def __init__(self, root: Path, encoder_spec: dict, window_s: float, hop_s: float | None):
        key = json.dumps({"encoder": encoder_spec, "window_s": window_s, "hop_s": hop_s},
                         sort_keys=True)
        self.key = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.dir = Path(root) / f"{encoder_spec.get('name', 'encoder')}-{self.key}"
        self.hits = 0
        self.misses = 0
        self.write_failed = False
        self.log = get_logger(stage="cache")

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def get(self, digest: str) -> dict[str, torch.Tensor] | None:
        path = self._path(digest)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = load_file(str(path))
            entry["vectors"]  # noqa: B018 - every entry has vectors; a missing key is corruption
        except (SafetensorError, OSError, KeyError) as exc:
            self.log.warning("cache_entry_unreadable", path=str(path), error=str(exc))
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, digest: str, entry: dict[str, torch.Tensor]) -> None:
        """entry: "vectors" (windows, dim), optionally "maps" and "images"."""
        if self.write_failed:
            return
        path = self._path(digest)
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous().cpu() for k, v in entry.items()}, str(tmp))
            os.replace(tmp, path)  # readers never see a half-written entry
        except (OSError, SafetensorError) as exc:
            # A cache is an optimisation: a full disk or a read-only cache directory must not
            # end a training run. Warn once and stop writing.
            self.write_failed = True
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.log.warning("cache_write_failed", dir=str(self.dir), error=str(exc)[:200],
                             hint="training goes on without caching embeddings")
