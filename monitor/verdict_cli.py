"""`harken verdict set|undo|list`: a person's word on an alarm, from the command line.

They work on the state directory of the daemon's config; a running daemon picks up the new
reference overlay version by itself (it polls the version file)."""

from __future__ import annotations

import json

from monitor.errors import UsageError


def register(sub) -> None:
    v = sub.add_parser("verdict", help="judge an alarm (normal / fault), undo or list verdicts")
    vs = v.add_subparsers(dest="verdict_command", metavar="ACTION", required=True)
    s = vs.add_parser("set", help="record a verdict on an alarm event")
    s.add_argument("--config", required=True, help="the daemon YAML (its state_dir and sources)")
    s.add_argument("event_id", help="the alarm id (alarm_started's alarm_id, the event's id)")
    s.add_argument("verdict", help="normal (a false alarm) or fault (confirmed)")
    s.add_argument("--note", default=None)
    s.add_argument("--device", default="cpu", help="where the model embeds the clip")
    s.set_defaults(func=cmd_verdict_set)
    u = vs.add_parser("undo", help="take a normal verdict's windows out of the reference again")
    u.add_argument("--config", required=True)
    u.add_argument("--source", required=True)
    u.add_argument("--verdict-id", default=None, help="default: the newest")
    u.set_defaults(func=cmd_verdict_undo)
    ls = vs.add_parser("list", help="the verdicts in each source's normal reference")
    ls.add_argument("--config", required=True)
    ls.set_defaults(func=cmd_verdict_list)

    m = sub.add_parser("model", help="models and their normal reference overlays")
    ms = m.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    e = ms.add_parser("export", help="a source's model with its normal reference, as a new artifact")
    e.add_argument("--config", required=True)
    e.add_argument("--source", required=True)
    e.add_argument("--out", required=True, help="the new artifact's directory")
    e.set_defaults(func=cmd_model_export)


def _config(path: str):
    from monitor.daemon.config import load_config

    return load_config(path, check_models=False)


def cmd_verdict_set(args) -> int:
    from monitor.daemon.config import resolve_state_dir
    from monitor.verdicts import Verdict, record_verdict

    cfg = _config(args.config)
    verdict = Verdict.checked(args.event_id, args.verdict, args.note)
    by_id = {s.id: s for s in cfg.sources}

    def embed(source: str, windows):
        from monitor.detector import Detector

        return Detector.load(by_id[source].model, device=args.device).embed(windows).cpu()

    result = record_verdict(resolve_state_dir(cfg), node=cfg.node, source_ids=list(by_id),
                            verdict=verdict, window_s_of=lambda s: by_id[s].window_s,
                            machine_id_of=lambda s: by_id[s].machine_id, embed=embed,
                            max_windows=cfg.reference_max_windows)
    print(json.dumps(result.to_json()))
    return 0


def cmd_verdict_undo(args) -> int:
    from monitor.daemon.config import resolve_state_dir
    from monitor.verdicts import undo_verdict

    cfg = _config(args.config)
    if args.source not in {s.id for s in cfg.sources}:
        raise UsageError(f"--source: no source {args.source!r} in {args.config}")
    print(json.dumps(undo_verdict(resolve_state_dir(cfg), args.source, args.verdict_id)))
    return 0


def cmd_verdict_list(args) -> int:
    from monitor.daemon.config import resolve_state_dir
    from monitor.reference import ReferenceStore

    cfg = _config(args.config)
    out = {}
    for s in cfg.sources:
        overlay = ReferenceStore(resolve_state_dir(cfg), s.id).load()
        out[s.id] = {"version": overlay.version, "windows": overlay.windows,
                     "verdicts": [e.to_json() for e in overlay.entries]}
    print(json.dumps(out))
    return 0


def cmd_model_export(args) -> int:
    from monitor.daemon.config import resolve_state_dir
    from monitor.model_export import export_with_reference
    from monitor.reference import ReferenceStore

    cfg = _config(args.config)
    by_id = {s.id: s for s in cfg.sources}
    if args.source not in by_id:
        raise UsageError(f"--source: no source {args.source!r} in {args.config}")
    overlay = ReferenceStore(resolve_state_dir(cfg), args.source).load()
    out = export_with_reference(by_id[args.source].model, overlay, args.out, source=args.source)
    print(json.dumps({"artifact": str(out), "source": args.source, "reference_version":
                      overlay.version, "windows": overlay.windows}))
    return 0
