"""Labels and machine IDs from DCASE file names and MIMII folder layouts.

DCASE: `normal_id_00_00000012.wav`, `anomaly_id_02_00000194.wav` (optionally prefixed with the
machine type, `slider__normal_id_00_...`). MIMII: `.../id_00/normal/00000012.wav`,
`.../id_00/abnormal/00000012.wav`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from monitor.errors import UsageError

NORMAL = "normal"
ANOMALY = "anomaly"
AUDIO_SUFFIXES = (".wav", ".flac")

_DCASE = re.compile(r"(?:^|_)(normal|anomaly)_id_(\d{1,3})(?:_|\.|$)", re.IGNORECASE)
_ID_DIR = re.compile(r"^id_(\d{1,3})$", re.IGNORECASE)
_MIMII_LABEL = {"normal": NORMAL, "abnormal": ANOMALY, "anomaly": ANOMALY}


@dataclass(frozen=True)
class ClipInfo:
    path: Path
    label: str | None  # "normal", "anomaly" or None when the name says nothing
    machine_id: int | None


def parse_clip(path: str | Path) -> ClipInfo:
    p = Path(path)
    m = _DCASE.search(p.stem)
    if m:
        return ClipInfo(p, m.group(1).lower(), int(m.group(2)))
    label = _MIMII_LABEL.get(p.parent.name.lower())
    id_match = _ID_DIR.match(p.parent.parent.name) if label else _ID_DIR.match(p.parent.name)
    machine_id = int(id_match.group(1)) if id_match else None
    return ClipInfo(p, label, machine_id)


def find_audio(root: str | Path) -> list[Path]:
    """All audio files under root (recursive), sorted; UsageError when there are none."""
    base = Path(root)
    if not base.exists():
        raise UsageError(f"{base}: no such directory")
    if base.is_file():
        return [base]
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"{base}: no .wav or .flac files found (searched recursively)")
    return files


def split_dir(root: str | Path, split: str) -> Path:
    """`root/split` when it exists (DCASE layout), else root itself."""
    base = Path(root)
    return base / split if (base / split).is_dir() else base
