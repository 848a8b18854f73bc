"""The runtime sub-commands of `harken`: `monitor` and `check-config`."""

from __future__ import annotations

import signal
import sys

from monitor.errors import UsageError


def register(sub) -> None:
    """Add the daemon's sub-commands to the `harken` argparse subparsers."""
    m = sub.add_parser("monitor", help="run the line-side monitoring daemon")
    m.add_argument("--config", required=True, help="daemon YAML (see config/harken.example.yaml)")
    # Its own dest: the top-level --log-level would be overwritten by a sub-parser default.
    m.add_argument("--log-level", dest="monitor_log_level", default=None,
                   choices=["debug", "info", "warning", "error"],
                   help="log level (default info)")
    m.set_defaults(func=cmd_monitor)

    c = sub.add_parser("check-config", help="validate a daemon YAML file and its model artifacts")
    c.add_argument("file")
    c.add_argument("--no-models", action="store_true", help="skip loading the model artifacts")
    c.set_defaults(func=cmd_check_config)

    from monitor.daemon import watch

    watch.add_parser(sub)

    from monitor import verdict_cli  # issue 16: harken verdict set|undo|list

    verdict_cli.register(sub)


def cmd_check_config(args) -> int:
    from monitor.daemon.config import MAX_PROBLEMS_SHOWN, config_problems, read_yaml

    try:
        data = read_yaml(args.file)
    except UsageError as exc:
        print(f"harken: error: {exc}", file=sys.stderr)
        return 2
    cfg, problems = config_problems(data, check_models=not args.no_models, check_files=True)
    if problems:
        for p in problems[:MAX_PROBLEMS_SHOWN]:
            print(f"{args.file}: {p}", file=sys.stderr)
        if len(problems) > MAX_PROBLEMS_SHOWN:
            print(f"{args.file}: and {len(problems) - MAX_PROBLEMS_SHOWN} more problems",
                  file=sys.stderr)
        return 2
    assert cfg is not None
    kinds = ", ".join(f"{s.id} ({s.kind})" for s in cfg.sources)
    if cfg.role != "all":  # issue 17: a role loads its models by name where it runs
        args.no_models = True
    if not args.no_models:  # the threshold each source will alarm at, and what it costs
        from monitor.daemon.thresholds import source_alarm_lines

        lines, problems = source_alarm_lines(cfg)
        if problems:
            for p in problems:
                print(f"{args.file}: {p}", file=sys.stderr)
            return 2
    print(f"{args.file}: OK, node {cfg.node}, {_role_summary(cfg, kinds)}")
    if not args.no_models:
        print("\n".join(lines))
    return 0


def _role_summary(cfg, kinds: str) -> str:
    """What check-config says a config runs: its sources, or for a role without any, what it does."""
    d = cfg.distributed
    if cfg.role == "worker":
        return (f"role worker (no sources of its own): scores windows of pool {d.group!r} "
                f"with models from {d.models_dir}, instance {d.instance}")
    if cfg.role == "alarms":
        return (f"role alarms (no sources of its own): alarms from the workers' scores "
                f"with models from {d.models_dir}")
    sources = f"{len(cfg.sources)} source(s): {kinds}"
    if cfg.role == "capture":
        return f"role capture, {sources}; windows to worker pool {d.group!r}"
    return sources


def cmd_monitor(args) -> int:
    from monitor.daemon.app import Daemon
    from monitor.daemon.config import load_config
    from monitor.logs import configure_logging

    configure_logging(args.monitor_log_level or "info")
    cfg = load_config(args.config)
    if cfg.role != "all":  # issue 17: capture / worker / alarms (monitor/daemon/roles/)
        from monitor.daemon.roles import run_role

        return run_role(cfg, _on_stop_signals)
    daemon = Daemon(cfg)

    def on_signal(signum, frame) -> None:
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.run()
    finally:
        daemon.stop()  # idempotent; stops sources and flushes sinks on an unexpected error too


def _on_stop_signals(stop) -> None:
    """SIGTERM and SIGINT call `stop()` (a role's request_stop: it only sets an event)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: stop())
    signal.signal(signal.SIGINT, lambda signum, frame: stop())
