"""Collect labelled clips and turn them into embeddings, batch by batch, with a progress bar."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from monitor.encoders.base import Encoder
from monitor.errors import UsageError
from monitor.labels import NORMAL, ClipInfo, find_audio, parse_clip
from monitor.logs import get_logger
from monitor.audio import split_windows
from monitor.detector import encode
from monitor.encoders.mel import MelImageEncoder
from monitor.scorers import Features
from monitor.replay import SkipCounter, load_checked
from train.cache import EmbeddingCache, file_digest


@dataclass(frozen=True)
class EmbeddedSet:
    embeddings: torch.Tensor  # (windows, dim) raw encoder output, on the CPU
    clips: list[ClipInfo]  # one per window
    skipped: SkipCounter
    maps: torch.Tensor | None = None  # (windows, C, f, t) pooled feature maps, when asked for
    images: torch.Tensor | None = None  # (windows, 128, 64) log-mel images, when asked for

    def features(self, idx=None) -> Features:
        f = Features(self.embeddings, self.maps, self.images)
        return f if idx is None else f.select(idx)

    @property
    def machine_ids(self) -> list[int | None]:
        return [c.machine_id for c in self.clips]


def normal_training_clips(root: Path) -> list[ClipInfo]:
    """Normal clips under root/train (or root): anomalies there are ignored with a warning."""
    log = get_logger(stage="train")
    clips = [parse_clip(p) for p in find_audio(root)]
    anomalous = [c for c in clips if c.label not in (NORMAL, None)]
    if anomalous:
        log.warning("anomalous_training_clips_ignored", count=len(anomalous),
                    first=str(anomalous[0].path))
    normal = [c for c in clips if c.label in (NORMAL, None)]
    if not normal:
        raise UsageError(f"{root}: no normal clips to train on")
    return normal


def data_fingerprint(clips: list[ClipInfo]) -> str:
    """sha256 over (file name, size, content hash) of every clip, in sorted order."""
    h = hashlib.sha256()
    for c in sorted(clips, key=lambda c: c.path.name):
        h.update(c.path.name.encode())
        h.update(hashlib.sha256(c.path.read_bytes()).digest())
    return h.hexdigest()


def embed_clips(clips: list[ClipInfo], encoder: Encoder, device: torch.device, *,
                window_s: float = 10.0, hop_s: float | None = None, batch_size: int = 16,
                progress: bool = True, desc: str = "embedding",
                cache: EmbeddingCache | None = None, with_map: bool = False) -> EmbeddedSet:
    """Embed every window of every clip; with a cache, only files not seen before are encoded.

    with_map adds the pooled feature maps and log-mel images that the cnn decoder needs.
    """
    log = get_logger(stage="embed")
    skips = SkipCounter()
    image = MelImageEncoder().to(device).eval() if with_map else None
    per_clip: dict[int, dict[str, torch.Tensor]] = {}
    digests: dict[int, str] = {}
    todo: list[int] = []
    for i, clip in enumerate(clips):
        if cache is not None:
            digests[i] = file_digest(clip.path) if clip.path.is_file() else ""
            hit = cache.get(digests[i]) if digests[i] else None
            if hit is not None and (not with_map or "maps" in hit):
                per_clip[i] = hit
                continue
        todo.append(i)

    pending: list[tuple[int, np.ndarray]] = []  # (clip index, (windows, samples))

    def flush() -> None:
        waves = torch.from_numpy(np.concatenate([w for _, w in pending])).to(device)
        with torch.inference_mode():
            f = encode(encoder, waves, with_map=with_map, image=image)
        parts = {k: v.cpu() for k, v in (("vectors", f.vector), ("maps", f.map), ("images", f.image))
                 if v is not None}
        sizes = [len(w) for _, w in pending]
        split = {k: torch.split(v, sizes) for k, v in parts.items()}
        for n, (i, _) in enumerate(pending):
            per_clip[i] = {k: v[n].clone() for k, v in split.items()}
            if cache is not None and digests.get(i):
                cache.put(digests[i], per_clip[i])
        pending.clear()

    bar = tqdm(total=len(todo), unit="clip", desc=desc, disable=not progress or not todo,
               leave=False)
    for i in todo:
        mono = load_checked(clips[i].path, skips, log)
        bar.update(1)
        if mono is None:
            continue
        pending.append((i, split_windows(mono, window_s, hop_s)))
        if sum(len(w) for _, w in pending) >= batch_size:
            flush()
    if pending:
        flush()
    bar.close()
    if cache is not None:
        log.info("embedding_cache", hits=cache.hits, misses=cache.misses, dir=str(cache.dir))
    if not per_clip:
        raise UsageError(f"none of the {len(clips)} clips could be used ({skips.unreadable} unreadable, "
                         f"{skips.silent} silent)")
    order = sorted(per_clip)

    def cat(key: str) -> torch.Tensor | None:
        return torch.cat([per_clip[i][key] for i in order]) if with_map or key == "vectors" else None

    owners = [clips[i] for i in order for _ in range(per_clip[i]["vectors"].shape[0])]
    return EmbeddedSet(cat("vectors"), owners, skips, cat("maps"), cat("images"))


def split_held_out(clips: list[ClipInfo], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out) over windows, split by file and stratified by machine ID."""
    rng = np.random.default_rng(seed)
    files_by_id: dict[int | None, list[Path]] = {}
    for c in dict.fromkeys(clips):  # unique clips, first-seen order
        files_by_id.setdefault(c.machine_id, []).append(c.path)
    held: set[Path] = set()
    for mid in sorted(files_by_id, key=lambda m: -1 if m is None else m):
        files = files_by_id[mid]
        if len(files) < 2:
            continue
        n = max(1, int(round(fraction * len(files))))
        for i in rng.permutation(len(files))[:n]:
            held.add(files[i])
    is_held = np.array([c.path in held for c in clips])
    if is_held.all() or not is_held.any():
        raise UsageError(f"need at least 2 normal clips per machine ID to hold some out "
                         f"(got {len(set(c.path for c in clips))} clips)")
    return np.nonzero(~is_held)[0], np.nonzero(is_held)[0]
