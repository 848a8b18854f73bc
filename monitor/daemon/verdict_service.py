"""Verdicts that reach the running daemon (the page, MQTT): checked, the clip embedded on the
inference worker (it owns the models), then applied to the state directory like
`harken verdict set`; the reference watcher loads the new overlay on its next poll."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping
from pathlib import Path

from monitor.errors import UsageError
from monitor.verdicts import Verdict, record_verdict

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

    def handle(data: object) -> dict:
        verdict = Verdict.from_json(data)
        return record_verdict(state_dir, node=cfg.node, source_ids=list(by_id), verdict=verdict,
                              window_s_of=lambda s: by_id[s].window_s,
                              machine_id_of=lambda s: by_id[s].machine_id, embed=embed,
                              max_windows=cfg.reference_max_windows).to_json()
    return handle
