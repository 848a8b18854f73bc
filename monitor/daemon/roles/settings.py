"""The `distributed:` section of the daemon config: settings of the capture, worker and alarms
roles. Loaded by monitor/daemon/config.py like every other section."""

from __future__ import annotations

from dataclasses import dataclass

from monitor.daemon.windowwire import valid_model_name

SHARE_GROUP_CHARS = set("/+#\0")


@dataclass(frozen=True)
class DistributedConfig:
    # worker, alarms: model artifacts by name (<models_dir>/<name>); a window names its model
    # by the directory name of its source's `model:` on the capture box
    models_dir: str | None = None
    group: str = "harken-workers"  # the worker pool's shared-subscription group
    instance: str = "0"  # worker: one of several on a machine (systemd %i); part of its client id
    # worker, alarms: the broker keeps the session (subscription, unacknowledged messages) this
    # long after a crash, so a restarted process gets back what it had not acknowledged
    session_expiry_s: int = 3600
    receive_maximum: int = 8  # worker: unacknowledged windows the broker hands one worker at once
    window_outbox_max: int = 2000  # capture: windows kept on disk while the broker is away
    drain_timeout_s: float = 30.0  # capture: on exit, wait this long for the broker to take the rest
    reorder_window: int = 32  # alarms: scores per source held back waiting for a missing one
    reorder_timeout_s: float = 30.0  # alarms: how long a missing window is waited for


def distributed_problems(cfg) -> list[str]:
    """Value checks of `role:` and `distributed:` (config.validate calls this)."""
    from monitor.daemon.roles import ROLES

    out: list[str] = []
    d = cfg.distributed
    if cfg.role not in ROLES:
        out.append(f"role: must be one of {', '.join(ROLES)}, got {str(cfg.role)[:40]!r}")
        return out
    if cfg.role != "all" and cfg.mqtt is None:
        out.append(f"role: {cfg.role} needs the mqtt: section (the roles talk through the broker)")
    if cfg.role in ("worker", "alarms") and not d.models_dir:
        out.append(f"distributed.models_dir: required for role {cfg.role}")
    if cfg.role in ("worker", "alarms") and cfg.sources:
        out.append(f"sources: role {cfg.role} takes no sources (they are on the capture boxes)")
    if cfg.role in ("all", "capture") and not cfg.sources:
        out.append("sources: at least one source is needed")
    if cfg.role == "capture":
        from pathlib import Path

        for i, s in enumerate(cfg.sources):
            if s is not None and not valid_model_name(Path(s.model).name):
                out.append(f"sources[{i}].model: its directory name {Path(s.model).name[:60]!r} "
                           "names the model to the workers and must be [A-Za-z0-9._-]")
    if not d.group or SHARE_GROUP_CHARS & set(d.group):
        out.append(f"distributed.group: must be non-empty without / + #, got {d.group[:40]!r}")
    if not d.instance or SHARE_GROUP_CHARS & set(d.instance):
        out.append(f"distributed.instance: must be non-empty without / + #, got {d.instance[:40]!r}")
    if not 0 <= d.session_expiry_s <= 2**32 - 1:
        out.append(f"distributed.session_expiry_s: must be in 0..4294967295, got {d.session_expiry_s}")
    if not 1 <= d.receive_maximum <= 65535:
        out.append(f"distributed.receive_maximum: must be in 1..65535, got {d.receive_maximum}")
    if d.window_outbox_max < 1:
        out.append(f"distributed.window_outbox_max: must be >= 1, got {d.window_outbox_max}")
    if d.drain_timeout_s < 0:
        out.append(f"distributed.drain_timeout_s: must be >= 0, got {d.drain_timeout_s}")
    if d.reorder_window < 1:
        out.append(f"distributed.reorder_window: must be >= 1, got {d.reorder_window}")
    if d.reorder_timeout_s <= 0:
        out.append(f"distributed.reorder_timeout_s: must be > 0, got {d.reorder_timeout_s}")
    return out
