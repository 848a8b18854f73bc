"""Checks of a config against this machine: the models load, the daemon's outputs are writable.

Run after the value checks (monitor/daemon/config.py `validate`), which need nothing but the YAML.
"""

from __future__ import annotations

import os
import tempfile
import typing
from pathlib import Path

from monitor.configload import PATH_SHOWN
from monitor.errors import UsageError
from monitor.yamlsafe import short_repr

if typing.TYPE_CHECKING:
    from monitor.manifest import Manifest

# `cfg` below is a monitor.daemon.config.DaemonConfig, not imported: that module imports this one

def model_problems(cfg: "DaemonConfig") -> list[str]:  # noqa: F821
    """Load every source's artifact (hash and shapes checked) once per distinct path."""
    from monitor.artifact import load_artifact  # torch import: only when models are checked
    from monitor.audio import SAMPLE_RATE_HZ

    problems: list[str] = []
    loaded: dict[str, Manifest | str] = {}
    for i, s in enumerate(cfg.sources):
        if s.model not in loaded:
            try:
                loaded[s.model] = load_artifact(s.model).manifest
            except UsageError as exc:
                loaded[s.model] = str(exc)
        got = loaded[s.model]
        if isinstance(got, str):
            problems.append(f"sources[{i}].model: {got}")
        elif (missing := _missing_weights(got)) is not None:
            problems.append(f"sources[{i}].model: {missing}")
        elif int(got.sample_rate_hz) != SAMPLE_RATE_HZ:
            problems.append(f"sources[{i}].model: {s.model}/manifest.json: trained at "
                            f"{got.sample_rate_hz} Hz but this harken runs at {SAMPLE_RATE_HZ} Hz; "
                            f"retrain the model at {SAMPLE_RATE_HZ} Hz")
        elif float(got.window_s) != s.window_s:
            problems.append(f"sources[{i}].window_s: the model was trained on {got.window_s} s "
                            f"windows (got {s.window_s})")
        elif s.learn_for is not None:
            from monitor.enrolment import enrolment_problem

            why = enrolment_problem(got)
            if why is not None:
                problems.append(f"sources[{i}].learn_for: {s.model}: {why}")
    return problems


def _missing_weights(manifest: Manifest) -> str | None:
    """The one-line error when a pretrained encoder's weights are not on this machine."""
    from monitor.encoders.registry import PRETRAINED
    from monitor.weights.store import locate

    spec = manifest.encoder
    if spec.get("name") not in PRETRAINED:
        return None
    try:
        locate(spec["name"], spec.get("weights"))
    except UsageError as exc:
        return str(exc)
    return None


def file_problems(cfg: "DaemonConfig") -> list[str]:  # noqa: F821
    """What the daemon will write must be writable by this user, now: the state directory
    (evidence, outbox, the folders' played lists) and the JSONL file. Otherwise the daemon
    would fail after start and systemd would restart it in a loop."""
    problems = []
    state = resolve_state_dir(cfg)
    why = _unwritable_dir(state)
    if why:
        env = " ($STATE_DIRECTORY)" if os.environ.get("STATE_DIRECTORY") else ""
        problems.append(f"state_dir: {short_repr(str(state), PATH_SHOWN)}{env}: {why}")
    if cfg.jsonl not in (None, "", "-"):
        jsonl = Path(cfg.jsonl)
        if jsonl.is_dir():
            problems.append(f"jsonl: {short_repr(cfg.jsonl, PATH_SHOWN)} is a directory; name a file")
        elif jsonl.exists():
            try:
                with open(jsonl, "ab"):
                    pass  # opening for append changes nothing
            except OSError as exc:
                problems.append(f"jsonl: {short_repr(cfg.jsonl, PATH_SHOWN)}: cannot append to it "
                                f"({exc.strerror or exc})")
        else:
            why = _unwritable_dir(jsonl.absolute().parent)
            if why:
                problems.append(f"jsonl: {short_repr(cfg.jsonl, PATH_SHOWN)}: cannot be created ({why})")
    return problems


def _unwritable_dir(path: Path) -> str | None:
    """None when files can be created in `path` (or in the nearest existing parent, which the
    daemon creates it under); else why not. A real probe: permissions, read-only mounts,
    ACLs and root all answer correctly."""
    probe_in = path
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            return "no existing parent directory"
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        return f"{short_repr(str(probe_in), PATH_SHOWN)} is not a directory"
    try:
        fd, name = tempfile.mkstemp(prefix=".harken-check-", dir=probe_in)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        where = "" if probe_in == path else f" (in {short_repr(str(probe_in), PATH_SHOWN)}, where it would be created)"
        return f"not writable{where}: {exc.strerror or exc}"
    return None


def resolve_state_dir(cfg: "DaemonConfig") -> Path:  # noqa: F821
    """systemd's StateDirectory= ($STATE_DIRECTORY) wins over the config file; the first
    entry when systemd lists several."""
    env = os.environ.get("STATE_DIRECTORY")
    return Path(env.split(":")[0]) if env else Path(cfg.state_dir)
