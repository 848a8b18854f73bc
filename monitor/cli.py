"""The `harken` command, owned by the runtime: monitor, check-config, watch, verdict, model
export, replay and weights list/verify. Training, benchmarks and soak tests plug in when they
are installed, through the `harken.commands` entry-point group (`train.commands`,
`bench.commands`); `monitor` never imports them by name except as that group's fallback."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path

from monitor import __version__
from monitor.errors import HarkenError, UsageError
from monitor.logs import configure_logging, get_logger

ENTRY_POINT_GROUP = "harken.commands"
# A source tree that was never `pip install`ed has no entry points: the same plug-ins by name.
FALLBACK_PLUGINS = ("train.commands", "bench.commands")

# A plug-in's `register(sub, weights_actions)` adds sub-commands to `sub` and may add
# `harken weights ACTION` handlers to `weights_actions` (train adds fetch and import).
Handler = Callable[[argparse.Namespace], int]
Register = Callable[[argparse._SubParsersAction, dict[str, Handler]], None]


def writable_dir(path: str, what: str) -> None:
    """Create an output directory up front: a bad path should fail before hours of work."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / ".harken-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the {what} there ({exc.strerror or exc})") from None


def show_progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


# --------------------------------------------------------------------------- runtime commands


def cmd_replay(args) -> int:
    from monitor.audio import MIN_HOP_S
    from monitor.detector import Detector
    from monitor.labels import find_audio
    from monitor.replay import check_output_path, replay

    if args.hop_s is not None and not (math.isfinite(args.hop_s) and args.hop_s >= MIN_HOP_S):
        raise UsageError(f"--hop-s must be a number >= {MIN_HOP_S} (seconds), got {args.hop_s}")
    files = find_audio(args.dir)
    to_file = bool(args.out) and args.out != "-"
    if to_file:
        check_output_path(args.out, files, model=args.model, what="replay output")
    detector = Detector.load(args.model, device=args.device, precision=args.precision)
    if to_file:
        # Written next to its final name and renamed at the end: an earlier result is replaced
        # only by a complete new one.
        with atomic_text_file(args.out, "JSONL") as f:
            summary = replay(detector, Path(args.dir), f, hop_s=args.hop_s, files=files,
                             progress=show_progress(args))
    else:
        summary = replay(detector, Path(args.dir), sys.stdout, hop_s=args.hop_s, files=files)
    get_logger(stage="replay").info("replay_done", **summary)
    return 0


@contextlib.contextmanager
def atomic_text_file(path: str | Path, what: str) -> Iterator:
    """A text file written to a temporary sibling, fsynced and renamed onto `path` on success;
    removed on failure (the old file, if any, stays)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        f = open(tmp, "w")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the {what} there ({exc.strerror or exc})") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cmd_weights_list(args) -> int:
    from monitor.encoders.registry import ENCODERS
    from monitor.weights import store as w

    rows = [w.check_weights(name) for name in ENCODERS]
    if args.json:
        print(json.dumps({"weights_dir": str(w.weights_dir()), "encoders": [r.to_json() for r in rows]}))
        return 0
    print(f"weights directory: {w.weights_dir()}")
    for r in rows:
        size = f"{r.size_bytes / 1e6:.1f} MB" if r.size_bytes is not None else "-"
        where = str(r.path) if r.path else "-"
        print(f"  {r.encoder:11s} {r.check:12s} {size:>10s}  {where}")
    return 0


def cmd_weights_verify(args) -> int:
    from monitor.weights import store as w

    names = [args.name] if args.name else [n for n in w.KNOWN]
    if args.name and args.name not in w.KNOWN:
        raise UsageError(f"{args.name!r} has no pretrained weights; encoders with weights: {', '.join(w.KNOWN)}")
    failed = False
    for name in names:
        r = w.check_weights(name)
        if r.check == "absent" and args.name:
            w.locate(name)  # the one-line "not found ... fetch/import" error
        print(f"{name}: {r.check}" + (f" ({r.path})" if r.path else ""))
        for problem in r.problems:
            print(f"  {problem}", file=sys.stderr)
        failed |= r.check == "mismatch"
    if failed:
        raise HarkenError("weights verification failed: corrupted or replaced files listed above")
    return 0


def _weights_command(actions: dict[str, Handler]) -> Handler:
    def cmd_weights(args) -> int:
        return actions[args.action](args)

    return cmd_weights


# --------------------------------------------------------------------------- plug-ins


def plugin_registrations() -> list[Register]:
    """The installed plug-ins' `register` functions; by module name when none is installed.
    A plug-in whose package is left out of this install is skipped."""
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    targets = [(ep.value.split(":")[0], ep.load) for ep in found] or [
        (name, lambda name=name: importlib.import_module(name).register) for name in FALLBACK_PLUGINS]
    registrations = []
    for module, load in targets:
        try:
            registrations.append(load())
        except ModuleNotFoundError as exc:
            parts = module.split(".")
            if exc.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
                raise  # the plug-in is there but one of its own imports is broken
    return registrations


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harken", description="Listen to machines: learn what normal "
                                "sounds like, flag what does not.")
    p.add_argument("--version", action="version", version=f"harken {__version__}")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from monitor.daemon import commands as daemon_commands

    daemon_commands.register(sub)

    r = sub.add_parser("replay", help="score every window of every WAV in a folder (JSON lines)")
    r.add_argument("dir")
    r.add_argument("--model", required=True)
    r.add_argument("--hop-s", type=float, default=None, help="window hop in seconds (default 10)")
    r.add_argument("--out", default=None, help="JSONL file (default stdout)")
    r.add_argument("--device", default="auto")
    r.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 (CUDA): autocast")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_replay)

    weights_actions: dict[str, Handler] = {"list": cmd_weights_list, "verify": cmd_weights_verify}
    for register in plugin_registrations():
        register(sub, weights_actions)

    wt = sub.add_parser("weights", help=f"pretrained encoder weights: {', '.join(weights_actions)}")
    wt.add_argument("action", choices=list(weights_actions))
    wt.add_argument("name", nargs="?", help="encoder (ast, panns, wav2vec2, resnet50, efficientat)")
    wt.add_argument("path", nargs="?", help="import: checkpoint file or Hugging Face model directory")
    wt.add_argument("--force", action="store_true", help="replace weights that are already there")
    wt.add_argument("--json", action="store_true", help="list: one JSON object on stdout")
    wt.set_defaults(func=_weights_command(weights_actions))
    return p


# Errors of the machine's disks that the user fixes (space, quota, a read-only mount,
# permissions): one line, exit 2, wherever they surface.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so every `finally` and clean-up runs as for
    Ctrl-C (a half-written model or data set is removed)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.command != "monitor":  # the daemon installs its own graceful-stop handler
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except HarkenError as exc:
        print(f"harken: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("harken: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("harken: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `harken evaluate --json | head`: the reader left; not an error worth a traceback.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            get_logger().exception("unexpected_error", command=args.command)
            return 1
        where = f"{exc.filename}: " if exc.filename else ""
        hint = "; free some space and run it again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"harken: error: {where}{exc.strerror or exc}{hint}", file=sys.stderr)
        return 2
    except Exception:  # unexpected: keep the traceback for the bug report
        get_logger().exception("unexpected_error", command=args.command)
        return 1


if __name__ == "__main__":
    sys.exit(main())
