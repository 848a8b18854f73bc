"""The model artifact's manifest as a frozen, typed value, and the checks that make one.

Each key every artifact carries is a typed field under its on-disk name; the keys some
artifacts carry beyond those (`enrolment`, `reference_overlay`, whatever a newer harken of the
same format version added) stay in `extra`, and the keys' order is kept, so `to_json()` gives
back what the file holds, key for key. `Manifest` is also a read-only `Mapping` over that JSON,
for readers that look keys up.
"""

from __future__ import annotations

import copy
import math
import reprlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from monitor.errors import ArtifactError

FORMAT = "harken-model"
FORMAT_VERSION = 1
MAX_WINDOW_S = 600.0
FUSION_METHODS = ("mean", "max")
REQUIRED = ("encoder", "scorers", "threshold", "sample_rate_hz", "window_s", "tensors_sha256")
WRITTEN_BY_SAVE = ("format", "format_version", "harken_version", "created_utc", "tensors_sha256")

# The order of a manifest built field by field (the order `harken train` writes); one read
# from JSON keeps the JSON's order.
_HEAD = ("format", "format_version", "harken_version", "created_utc")
_BODY = ("name", "sample_rate_hz", "window_s", "encoder", "scorers", "fusion", "normalisation",
         "threshold", "normal_scores", "calibration", "training")


@dataclass(frozen=True, eq=False)
class Manifest(Mapping):
    """What a model is. Optional fields are None where the artifact has no such key; nested
    entries are the JSON values (dicts and lists) and must not be modified: use
    `with_updates` or `dataclasses.replace`."""

    format: str
    format_version: int
    encoder: dict[str, Any]
    scorers: list[dict[str, Any]]
    threshold: dict[str, Any]
    sample_rate_hz: int
    window_s: float
    tensors_sha256: str
    harken_version: str | None = None
    created_utc: str | None = None
    name: str | None = None
    fusion: dict[str, Any] | None = None  # None: the mean of the scorers' raw scores
    normalisation: dict[str, Any] | None = None
    normal_scores: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None  # None for models trained before calibration
    training: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), repr=False)  # as in the JSON it came from

    @classmethod
    def from_json(cls, d: Mapping, where: Path | str, *, saving: bool = False) -> Manifest:
        """Check every entry (one ArtifactError naming `where` and the key) and build it.
        A copy is taken: later changes to `d` do not reach the manifest."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ArtifactError(f"{where}: not a harken model manifest (format != {FORMAT!r})")
        validate_manifest(d, where, saving=saving)
        rest = copy.deepcopy(dict(d))
        # a key present as null keeps its place in `extra`: the file is given back as it was
        order = tuple(rest)
        typed = {k: rest.pop(k) for k in _TYPED if rest.get(k) is not None}
        return cls(**typed, extra=rest, key_order=order)

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to manifest.json (a deep copy, free to change)."""
        return copy.deepcopy(dict(self._items()))

    def with_updates(self, **json_keys: Any) -> Manifest:
        """A new manifest with these keys (on-disk names, extras too) replaced or added,
        checked as a loaded one is."""
        return Manifest.from_json({**self._items_dict(), **json_keys}, "updated manifest")

    # ------------------------------------------------------------------ derived values

    @property
    def threshold_value(self) -> float:
        return float(self.threshold["value"])

    @property
    def thresholds_per_id(self) -> dict[int, float]:
        """threshold.per_id ("00", "01", ... to a threshold) keyed by integer machine ID."""
        return {int(k): float(v) for k, v in self.threshold.get("per_id", {}).items()}

    @property
    def fusion_spec(self) -> dict[str, Any]:
        return self.fusion if self.fusion is not None else {"method": "mean", "stats": {}}

    @property
    def files_per_id(self) -> dict[str, int]:
        """Training files per machine ID ("00", ..., "unknown"); empty when not recorded."""
        return (self.training or {}).get("files_per_id", {})

    # ------------------------------------------------------------------ Mapping over the JSON

    def _items(self) -> Iterator[tuple[str, Any]]:
        present = {k: getattr(self, k) for k in _HEAD + _BODY if getattr(self, k) is not None}
        present.update(self.extra)
        present["tensors_sha256"] = self.tensors_sha256
        known = [k for k in self.key_order if k in present]
        for key in known + [k for k in present if k not in self.key_order]:
            yield key, present[key]

    def _items_dict(self) -> dict[str, Any]:
        return dict(self._items())

    def __getitem__(self, key: str) -> Any:
        if key in _TYPED:
            value = getattr(self, key)
            if value is not None:
                return value
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items())

    def __len__(self) -> int:
        return sum(1 for _ in self._items())


_TYPED = frozenset(f.name for f in fields(Manifest)) - {"extra", "key_order"}
assert _TYPED == set(_HEAD + _BODY + ("tensors_sha256",)), "every field has its place on disk"


# --------------------------------------------------------------------------- validation


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(value, limit: int = 60) -> str:
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_manifest(m: Mapping, where: Path | str, *, saving: bool = False) -> None:
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
    for key in REQUIRED:
        if key not in m:
            raise ArtifactError(f"{where}: required key {key!r} is missing")
    enc = m["encoder"]
    if not isinstance(enc, dict) or not isinstance(enc.get("name"), str) or not enc["name"]:
        bad("encoder", f"must be a mapping with a name, got {_short(enc)}")
    _check_front_end(enc, bad)
    _check_scorers_and_fusion(m, bad)
    _check_threshold(m["threshold"], bad)
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


def _check_stats_pair(pair) -> bool:
    return (isinstance(pair, list) and len(pair) == 2 and all(map(_finite_number, pair))
            and pair[1] > 0)


def _check_scorers_and_fusion(m: Mapping, bad) -> None:
    scorers = m["scorers"]
    if not isinstance(scorers, list) or not scorers:
        bad("scorers", f"must be a non-empty list of scorers, got {_short(scorers)}")
    from monitor.scorers import SCORERS, scorer_kind  # here, not at import: manifest stays light

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
        if not _check_stats_pair(pair):
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
            if not _check_stats_pair(pair):
                bad(f"fusion.per_id.{_short(key, 10)}.{_short(name, 20)}",
                    f"must be [mean, std > 0] of finite numbers, got {_short(pair)}")
    if len(names) > 1 and not set(names) <= set(stats):
        bad("fusion.stats", f"has no statistics for {', '.join(sorted(set(names) - set(stats)))} "
                            "(needed to fuse several scorers)")


def _check_threshold(th, bad) -> None:
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
