"""The YAML loader: a mapping into frozen dataclasses by their type hints, every problem at once.

Shared by the daemon's config (monitor/daemon/config.py) and the training config (train/config.py):
unknown keys are refused and each problem names its dotted path (`sources[1].hop_s: ...`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, fields

from monitor.errors import UsageError
from monitor.yamlsafe import short_repr

MAX_PROBLEMS_SHOWN = 20
PATH_SHOWN = 300  # characters of a path an error message prints
PROBLEM_SHOWN = 240  # characters of one problem (a hostile key or value can be long)
MESSAGE_SHOWN = 600  # characters of all problems shown together; the rest are counted


def clip(text: str, limit: int = PATH_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class ConfigError(UsageError):
    """Every problem of a config file at once; `str()` joins them into the CLI's one line."""

    def __init__(self, where: str, problems: list[str]):
        self.where = where
        self.problems = list(problems)
        shown: list[str] = []
        for problem in self.problems[:MAX_PROBLEMS_SHOWN]:  # the first ones that fit, a count
            problem = clip(problem, PROBLEM_SHOWN)
            if shown and sum(len(x) + 2 for x in shown) + len(problem) > MESSAGE_SHOWN:
                break
            shown.append(problem)
        more = len(self.problems) - len(shown)
        text = "; ".join(shown)
        super().__init__(f"{where}: " + text + (f"; and {more} more" if more else ""))


def from_mapping(cls: type, data: object, path: str, problems: list[str]):
    """Build dataclass `cls` from a YAML mapping by its type hints; problems (with their dotted
    paths) are appended to `problems` and the result is None when any field was unusable."""
    if not isinstance(data, dict):
        problems.append(f"{path or '(top level)'}: expected a mapping, got {_kind(data)}")
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.metadata.get("yaml", True)}  # yaml False: not a key
    values: dict = {}
    for key, value in data.items():
        shown = key if isinstance(key, str) and len(key) <= 60 else short_repr(key, 60)
        where = f"{path}.{shown}" if path else str(shown)
        if key not in known:
            problems.append(f"{where}: unknown key (known: {', '.join(sorted(known))})")
            continue
        before = len(problems)
        converted = convert(value, hints[key], where, problems)
        if len(problems) == before or converted is not None:  # partial lists/mappings too
            values[key] = converted
    complete = True
    for name, f in known.items():
        if name not in values and f.default is MISSING and f.default_factory is MISSING:
            if name not in data:
                problems.append(f"{path + '.' if path else ''}{name}: required key is missing")
            complete = False
    # A field with a bad value keeps its default so the value checks still run on the rest and
    # every problem is reported at once; the caller knows from `problems` not to use it.
    return cls(**values) if complete else None


def convert(value: object, hint, path: str, problems: list[str]):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            problems.append(f"{path}: must not be empty")
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:  # the first type that takes the value without complaint
            trial: list[str] = []
            out = convert(value, option, path, trial)
            if not trial:
                return out
        if len(options) == 1:
            return convert(value, options[0], path, problems)
        names = " or ".join(_type_name(a) for a in options)
        problems.append(f"{path}: expected {names}, got {_kind(value)} ({short_repr(value)})")
        return None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {_kind(value)} ({short_repr(value)})")
            return None
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                problems.append(f"{path}: expected {len(args)} items, got {len(value)}")
                return None
            item_types = list(args)
        before = len(problems)
        items = tuple(convert(v, t, f"{path}[{i}]", problems)
                      for i, (v, t) in enumerate(zip(value, item_types)))
        if len(problems) > before and not all(dataclasses.is_dataclass(t) for t in item_types):
            return None  # a list of sections stays partial (None where one failed), values do not
        return items
    if dataclasses.is_dataclass(hint):
        if hasattr(hint, "from_yaml"):  # a section whose class is chosen by a key (source kinds)
            return hint.from_yaml(value, path, problems)
        return from_mapping(hint, value, path, problems)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_kind(value)}")
            return None
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan / .inf pass every `<` check silently
                problems.append(f"{path}: must be a finite number, got {short_repr(value)}")
                return None
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # a field type this loader does not know: a bug in the schema, not in the YAML
        raise TypeError(f"{path}: unsupported config field type {short_repr(hint)}")
    problems.append(f"{path}: expected {_type_name(hint)}, got {_kind(value)} ({short_repr(value)})")
    return None


def _type_name(hint) -> str:
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if typing.get_origin(hint) is tuple:
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def limited(default, *, gt: float | None = None, ge: float | None = None,
            within: tuple[float, float] | None = None, choices: tuple[str, ...] | None = None):
    """A dataclass field with its limit next to it; `limit_problems` checks it."""
    rule = {k: v for k, v in (("gt", gt), ("ge", ge), ("within", within), ("choices", choices))
            if v is not None}
    return dataclasses.field(default=default, metadata={"limit": rule})


def limit_problems(obj, path: str) -> list[str]:
    """The fields of `obj` outside their declared limits (None values are not checked)."""
    out: list[str] = []
    for f in fields(obj):
        rule = f.metadata.get("limit")
        value = getattr(obj, f.name)
        if not rule or value is None:
            continue
        where = f"{path}.{f.name}" if path else f.name
        if "gt" in rule and not value > rule["gt"]:
            out.append(f"{where}: must be > {rule['gt']}, got {value}")
        elif "ge" in rule and not value >= rule["ge"]:
            out.append(f"{where}: must be >= {rule['ge']}, got {value}")
        elif "within" in rule and not rule["within"][0] <= value <= rule["within"][1]:
            out.append(f"{where}: must be in {rule['within'][0]}-{rule['within'][1]}, got {value}")
        elif "choices" in rule and value not in rule["choices"]:
            out.append(f"{where}: must be one of {', '.join(rule['choices'])}, got {short_repr(value)}")
    return out
