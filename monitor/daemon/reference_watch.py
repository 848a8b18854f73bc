"""Keeps each source's detector in step with its normal reference overlay in the state
directory (monitor/reference.py), however the overlay changed (`harken verdict`, undo).

Polled from the daemon's supervising loop: one small file read per source and tick. A source
with an overlay gets its own detector entry on the inference worker, `<model>#ref:<source>`
(a shallow copy sharing the encoder, monitor/overlay.py); without one it shares the model's
entry and its batches with the other sources again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from monitor.errors import UsageError
from monitor.logs import get_logger
from monitor.reference import ReferenceStore

POLL_EVERY_S = 1.0


class ReferenceWatcher:
    def __init__(self, state_dir, models: Mapping[str, str], worker, model_keys: dict[str, str],
                 on_changed: Callable[[str, object], None] | None = None):
        """models: source id -> model key; model_keys: the dict the daemon's sinks read the
        key to queue a source's windows under (updated here, after the detector is in place);
        on_changed(source, overlay): after a swap, on the worker (the threshold follows)."""
        self.on_changed = on_changed
        self.stores = {sid: ReferenceStore(state_dir, sid) for sid in models}
        self.models = dict(models)
        self.worker = worker
        self.model_keys = model_keys
        self.versions: dict[str, int] = {sid: 0 for sid in models}
        # sources still learning (monitor/daemon/learning.py): their overlay waits for arming
        self.held: set[str] = set()
        self._log = get_logger(stage="reference")
        self._next_poll_mono_s = 0.0

    def poll(self) -> None:
        """At most once a second: with 100 sources that is 100 small reads a second."""
        now = time.monotonic()
        if now < self._next_poll_mono_s and self.worker.ident is not None:
            return
        self._next_poll_mono_s = now + POLL_EVERY_S
        for sid, store in self.stores.items():
            try:
                version = store.version()
                if version == self.versions[sid]:
                    continue
                overlay = store.load()
            except UsageError as exc:  # a damaged file: keep scoring with what is in force
                self._log.error("reference_unreadable", source=sid, error=str(exc))
                continue
            self.versions[sid] = version
            if self.worker.ident is None:  # not started yet (daemon start): apply here and now
                self._apply(sid, overlay)
                continue
            self.worker.call_soon(lambda sid=sid, overlay=overlay: self._apply(sid, overlay))

    def rebase(self, sid: str, key: str) -> None:
        """The source's detector is now `key` (an enrolled one): its overlay goes on top of it
        from the next poll on."""
        self.models[sid] = key
        self.held.discard(sid)
        self.versions[sid] = -1

    def _apply(self, sid: str, overlay) -> None:
        """On the inference worker."""
        from monitor.overlay import with_reference

        if sid in self.held:
            return

        base_key = self.models[sid]
        own_key = f"{base_key}#ref:{sid}"
        if overlay.windows == 0:
            self.model_keys[sid] = base_key
            self.worker.detectors.pop(own_key, None)
        else:
            base = self.worker.detectors[base_key]
            self.worker.detectors[own_key] = with_reference(base, overlay.embeddings,
                                                            overlay.machine_ids)
            self.model_keys[sid] = own_key
        self._log.info("reference_loaded", source=sid, version=overlay.version,
                       windows=overlay.windows, verdicts=len(overlay.entries))
        if self.on_changed is not None:
            self.on_changed(sid, overlay)
