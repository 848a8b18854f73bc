"""Prometheus metrics on a dedicated registry (no process-global state, several daemons in one
test process do not collide). Served on 127.0.0.1 by default."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.windows_scored = Counter("harken_windows_scored", "Windows scored", ["source"], registry=r)
        self.windows_dropped = Counter("harken_windows_dropped", "Windows dropped because "
                                       "inference fell behind", ["source"], registry=r)
        self.overruns = Gauge("harken_capture_overruns", "Capture overruns (audio lost before "
                              "the ring buffer)", ["source"], registry=r)
        self.queue_depth = Gauge("harken_queue_windows", "Windows waiting for inference", registry=r)
        self.score = Gauge("harken_score", "Last anomaly score", ["source"], registry=r)
        self.threshold = Gauge("harken_threshold", "Alarm threshold", ["source"], registry=r)
        self.alarm = Gauge("harken_alarm_on", "1 while the source's alarm is on", ["source"], registry=r)
        self.alarms = Counter("harken_alarms", "Alarms started", ["source"], registry=r)
        self.audio_age = Gauge("harken_last_audio_age_seconds", "Seconds since the source last "
                               "delivered audio", ["source"], registry=r)
        self.batch_seconds = Histogram("harken_inference_batch_seconds", "Inference time per batch",
                                       registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.latency = Histogram("harken_window_to_score_seconds", "Window complete to score",
                                 registry=r, buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.skipped = Gauge("harken_input_skipped", "Bad files or rejected payloads skipped",
                             ["source"], registry=r)
        self.source_stalled = Gauge("harken_source_stalled", "1 while the source delivers no audio "
                                    "(device gone, feed stopped, folder missing)", ["source"], registry=r)
        self.sensor_faults = Counter("harken_sensor_faults", "Sensor fault episodes started",
                                     ["source", "kind"], registry=r)
        self.outbox_pending = Gauge("harken_mqtt_outbox_pending", "Alarm events and states on disk "
                                    "waiting for the broker's acknowledgement", registry=r)
        self.mqtt_connected = Gauge("harken_mqtt_connected", "1 while connected to the broker",
                                    registry=r)
        self.scores_dropped_offline = Gauge("harken_mqtt_scores_dropped", "Scores not published "
                                            "because the broker was away", registry=r)
        self._dropped_seen: dict[str, int] = {}

    def serve(self, host: str, port: int) -> None:
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def stop(self) -> None:
        """Close the scrape endpoint (a no-op when it was never served)."""
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
            self._server = None

    def dropped(self, by_source: dict[str, int]) -> None:
        for source, total in by_source.items():
            new = total - self._dropped_seen.get(source, 0)
            if new > 0:
                self.windows_dropped.labels(source).inc(new)
            self._dropped_seen[source] = total
