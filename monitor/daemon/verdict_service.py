"""Verdicts that reach the running daemon (the page, MQTT): checked, the clip embedded on the
inference worker (it owns the models), then applied to the state directory like
`harken verdict set`; the reference watcher loads the new overlay on its next poll. Also the
two listeners that carry them to the daemon, built here (not started): the page's server and
the MQTT verdict topics."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from monitor.errors import UsageError
from monitor.reference import ReferenceStore
from monitor.verdicts import Verdict, event_source, record_verdict, undo_verdict
from monitor.yamlsafe import short_repr

EMBED_TIMEOUT_S = 120.0


def verdict_handler(cfg, state_dir: Path, worker, detectors: Mapping[str, object]
                    ) -> Callable[[object], dict]:
    by_id = {s.id: s for s in cfg.sources}

    def embed(source: str, windows):
        det = detectors[by_id[source].model]
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(det.embed(windows).cpu())
            except Exception as exc:  # noqa: BLE001 - handed back to the caller, which logs it
                done.set_exception(exc)
        worker.call_soon(run)
        try:
            return done.result(timeout=EMBED_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise UsageError("the inference worker did not embed the clip in time; "
                             "try again") from None

    def handle(data: object, source: str | None = None) -> dict:
        """source: where the verdict came from (an MQTT topic); the event must be its own."""
        verdict = Verdict.from_json(data)
        if source is not None and event_source(verdict.event_id, cfg.node, list(by_id)) != source:
            raise UsageError(f"event {verdict.event_id[:100]} is not an alarm of source {source}")
        return record_verdict(state_dir, node=cfg.node, source_ids=list(by_id), verdict=verdict,
                              window_s_of=lambda s: by_id[s].window_s,
                              machine_id_of=lambda s: by_id[s].machine_id, embed=embed,
                              max_windows=cfg.reference_max_windows).to_json()
    return handle


def undo_handler(cfg, state_dir: Path) -> Callable[[object], dict]:
    """Undo from the page: `{"event_id": ...}` takes that alarm's normal verdict out of its
    source's reference, exactly as `harken verdict undo --verdict-id` does."""
    source_ids = [s.id for s in cfg.sources]

    def handle(data: object) -> dict:
        if not isinstance(data, dict) or set(data) != {"event_id"} or \
                not isinstance(data["event_id"], str):
            raise UsageError(f'an undo must be {{"event_id": "<alarm id>"}}, got {short_repr(data)}')
        event_id = data["event_id"]
        source = event_source(event_id, cfg.node, source_ids)
        entry = next((e for e in ReferenceStore(state_dir, source).load().entries
                      if e.event_id == event_id), None)
        if entry is None:
            raise UsageError(f"event {event_id[:100]} has no normal verdict in the reference "
                             f"of {source}: nothing to undo")
        return undo_verdict(state_dir, source, entry.verdict_id)
    return handle


def web_listener(cfg, state_dir: Path, web_sink, on_verdict: Callable[[object], dict]):
    """The operator's page (not started): verdicts and undo from the browser."""
    from monitor.daemon.web import WebServer, read_token

    web = cfg.web
    return WebServer(web_sink, host=web.host, port=web.port, token=read_token(web.token_file),
                     on_verdict=on_verdict, on_undo=undo_handler(cfg, state_dir))


def mqtt_listener(cfg, events: Iterable, on_verdict: Callable[[object], dict]):
    """The MQTT verdict topics (not started); `events` are the daemon's recent alarm events,
    for a verdict about `"event_id": "latest"` (the source's latest alarm start)."""
    from monitor.daemon.config import resolve_mqtt_password
    from monitor.daemon.mqtt_verdicts import MqttVerdictListener  # paho only when configured

    def latest_event(source: str) -> str | None:
        starts = [e.id for e in list(events) if e.source == source and e.type == "start"]
        return starts[-1] if starts else None

    assert cfg.mqtt is not None
    return MqttVerdictListener(cfg.mqtt, node=cfg.node, source_ids=[s.id for s in cfg.sources],
                               password=resolve_mqtt_password(cfg.mqtt),
                               latest_event=latest_event, handle=on_verdict)
