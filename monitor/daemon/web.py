"""The operator's page: every source's state and score, the alarm events with their evidence
(spectrogram, playable clip) and the verdict buttons; live over Server-Sent Events.

It is a sink like the JSONL and MQTT publishers: the daemon's threads hand it facts (a
score, an event, stats), it keeps a bounded copy in memory and pushes them to the open pages.
The HTTP server runs in its own threads (stdlib `ThreadingHTTPServer`), so a slow browser
cannot stall capture or inference: each page gets a bounded queue, full means dropped.
Reading is open on the bound address (127.0.0.1 by default); a verdict needs the token
(`web.token_file`, `$CREDENTIALS_DIRECTORY/web_token` or `$HARKEN_WEB_TOKEN`) as
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import json
import queue
import threading
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from monitor.daemon.types import AlarmEvent, Score
from monitor.errors import UsageError
from monitor.logs import get_logger

TIMELINE_POINTS = 720  # per source: 2 h of 10 s hops
EVENTS_KEPT = 5000
PAGE_MAX = 100
CLIENT_QUEUE = 256
MAX_BODY_BYTES = 4096


class WebSink:
    """Publisher protocol; every call only copies under a lock and notifies the pages."""

    def __init__(self, source_ids: list[str], events_path: str | Path | None = None):
        """events_path: where the event list is kept across restarts (web_events.py)."""
        self._lock = threading.Lock()
        self.sources = {sid: {"id": sid, "state": None, "score": None, "threshold": None,
                              "model": None, "alarm": False} for sid in source_ids}
        self.timeline = {sid: deque(maxlen=TIMELINE_POINTS) for sid in source_ids}
        self.events: dict[str, dict] = {}  # alarm id -> latest event, insertion (start) order
        self.verdicts: dict[str, str] = {}  # alarm id -> verdict
        self.stats: dict = {}
        self._clients: list[queue.Queue] = []
        self.clients_dropped = 0
        self._event_log = None
        if events_path is not None:
            from monitor.daemon.web_events import WebEventLog

            self._event_log = WebEventLog(events_path)
            self.events, self.verdicts = self._event_log.load(EVENTS_KEPT)

    # -- Publisher
    def start(self) -> None: ...

    def stop(self) -> None:
        self._push("bye", {})

    def publish_score(self, score: Score) -> None:
        with self._lock:
            s = self.sources[score.source]
            s.update(score=score.score, threshold=score.threshold, model=score.model)
            self.timeline[score.source].append((round(score.window_end_s, 3), score.score))
        self._push("score", {"source": score.source, "score": score.score,
                             "threshold": score.threshold, "model": score.model,
                             "t": round(score.window_end_s, 3), "file": score.label})

    def publish_alarm_state(self, source: str, on: bool) -> None:
        with self._lock:
            self.sources[source]["alarm"] = on
        self._push("alarm", {"source": source, "on": on})

    def publish_event(self, event: AlarmEvent) -> None:
        if event.type == "sensor_fault":
            return
        with self._lock:
            old = self.events.get(event.id, {})
            row = {**old, **event.to_json(), "open": event.type != "end",
                   "started": old.get("started", event.ts)}
            row["clip"] = row.get("clip") or old.get("clip")
            row["image"] = row.get("image") or old.get("image")
            self.events[event.id] = row
            while len(self.events) > EVENTS_KEPT:
                self.verdicts.pop(self.events.pop(next(iter(self.events)))["id"], None)
            if self._event_log is not None:
                self._event_log.append_row(row, self.events, self.verdicts)
        self._push("event", self._public(row))

    def publish_source_state(self, source: str, state: str) -> None:
        with self._lock:
            self.sources[source]["state"] = state
        self._push("source", {"source": source, "state": state})

    def status(self) -> dict:
        return {}

    def publish_stats(self, stats: dict) -> None:
        keep = {k: stats.get(k) for k in ("windows_scored", "windows_dropped", "queue_depth",
                                          "outbox_pending", "inference_ms_p50",
                                          "inference_ms_p95", "uptime_s")}
        with self._lock:
            self.stats = keep
        self._push("stats", keep)

    # -- for the server
    def _public(self, row: dict) -> dict:
        out = {k: row.get(k) for k in ("id", "source", "ts", "peak_score", "threshold", "open")}
        out["started"] = row.get("started")
        out["has_clip"] = bool(row.get("clip"))
        out["has_image"] = bool(row.get("image"))
        out["verdict"] = self.verdicts.get(row["id"])
        return out

    def snapshot(self) -> dict:
        with self._lock:
            return {"sources": [dict(s) for s in self.sources.values()], "stats": dict(self.stats)}

    def source_timeline(self, sid: str) -> list:
        with self._lock:
            return list(self.timeline.get(sid, ()))

    def event_page(self, before: int, limit: int) -> dict:
        """Newest first; `before` is an offset from the newest (paging)."""
        with self._lock:
            rows = list(self.events.values())[::-1]
            page = [self._public(r) for r in rows[before:before + limit]]
            return {"total": len(rows), "offset": before, "events": page}

    def event_file(self, alarm_id: str, kind: str) -> str | None:
        with self._lock:
            row = self.events.get(alarm_id)
            return None if row is None else row.get(kind)

    def mark_verdict(self, alarm_id: str, verdict: str | None) -> None:
        """None: the verdict was undone."""
        with self._lock:
            if verdict is None:
                self.verdicts.pop(alarm_id, None)
            else:
                self.verdicts[alarm_id] = verdict
            row = self.events.get(alarm_id)
            if row is not None and self._event_log is not None:
                self._event_log.append_verdict(alarm_id, verdict, self.events, self.verdicts)
        if row is not None:
            self._push("event", self._public(row))

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(CLIENT_QUEUE)
        with self._lock:
            self._clients.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._clients:
                self._clients.remove(q)

    def _push(self, kind: str, data: dict) -> None:
        with self._lock:
            clients = list(self._clients)
        msg = f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
        for q in clients:
            try:
                q.put_nowait(msg)
            except queue.Full:  # a page that does not read: it loses updates, nobody waits
                self.clients_dropped += 1


class WebServer:
    def __init__(self, sink: WebSink, *, host: str, port: int, token: str | None,
                 on_verdict: Callable[[object], dict], on_undo: Callable[[object], dict]):
        self.sink = sink
        self.token = token
        self.on_verdict = on_verdict
        self.on_undo = on_undo
        self.stopping = threading.Event()
        self._log = get_logger(stage="web")
        handler = _handler_for(self)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="harken-web",
                                        kwargs={"poll_interval": 0.5}, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._log.info("web_serving", host=self.httpd.server_address[0], port=self.port)

    def stop(self) -> None:
        self.stopping.set()
        self.sink._push("bye", {})  # open streams end now, not at their next keep-alive
        self.httpd.shutdown()
        self.httpd.server_close()

    def authorised(self, header: str | None) -> bool:
        if not self.token or not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].encode(), self.token.encode())


def _handler_for(server: WebServer):
    sink = server.sink

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args) -> None:  # no access log on stderr
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, data) -> None:
            self._send(code, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:
            url = urlparse(self.path)
            q = parse_qs(url.query)
            parts = [p for p in url.path.split("/") if p]
            if url.path == "/":
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif url.path == "/api/state":
                self._json(200, sink.snapshot())
            elif url.path == "/api/events":
                try:
                    offset = max(0, int(q.get("offset", ["0"])[0]))
                    limit = min(PAGE_MAX, max(1, int(q.get("limit", ["25"])[0])))
                except ValueError:
                    return self._json(400, {"error": "offset and limit must be integers"})
                self._json(200, sink.event_page(offset, limit))
            elif len(parts) == 3 and parts[:2] == ["api", "timeline"]:
                self._json(200, sink.source_timeline(parts[2]))
            elif len(parts) == 4 and parts[:2] == ["api", "events"] and parts[3] in ("clip", "image"):
                path = sink.event_file(parts[2], parts[3])
                if not path or not Path(path).is_file():
                    return self._json(404, {"error": f"no {parts[3]} for event {parts[2][:100]}"})
                ctype = "audio/wav" if parts[3] == "clip" else "image/png"
                self._send(200, Path(path).read_bytes(), ctype)
            elif url.path == "/api/stream":
                self._stream()
            else:
                self._json(404, {"error": "not found"})

        def _stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            client = sink.subscribe()
            try:
                self.wfile.write(b"event: hello\ndata: {}\n\n")
                self.wfile.flush()
                while not server.stopping.is_set():
                    try:
                        msg = client.get(timeout=10.0)
                    except queue.Empty:
                        msg = b": keep-alive\n\n"
                    self.wfile.write(msg)
                    self.wfile.flush()
                    if msg.startswith(b"event: bye"):
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass  # the page was closed
            finally:
                sink.unsubscribe(client)
                self.close_connection = True

        def do_POST(self) -> None:
            path = urlparse(self.path).path
            if path not in ("/api/verdict", "/api/undo"):
                return self._json(404, {"error": "not found"})
            what = "a verdict" if path == "/api/verdict" else "an undo"
            if not server.authorised(self.headers.get("Authorization")):
                server._log.warning("verdict_rejected", reason="token", path=path)
                return self._json(401, {"error": f"{what} needs the page's token "
                                                 "(Authorization: Bearer ...)"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self._json(400, {"error": "Content-Length must be a number"})
            if not 0 <= length <= MAX_BODY_BYTES:
                return self._json(413, {"error": f"at most {MAX_BODY_BYTES} bytes"})
            try:
                data = json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                return self._json(400, {"error": "the body must be JSON"})
            try:
                if path == "/api/verdict":
                    result = server.on_verdict(data)
                    sink.mark_verdict(result["event_id"], result.get("verdict", "?"))
                else:
                    result = server.on_undo(data)
                    sink.mark_verdict(result["event_id"], None)
            except UsageError as exc:
                return self._json(400, {"error": str(exc)})
            self._json(200, result)

    return Handler


def read_token(token_file: str | None) -> str | None:
    import os

    if token_file:
        try:
            return Path(token_file).read_text().strip() or None
        except OSError as exc:
            raise UsageError(f"web.token_file: {token_file}: cannot read ({exc.strerror})") from None
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / "web_token").is_file():
        return (Path(creds) / "web_token").read_text().strip() or None
    return os.environ.get("HARKEN_WEB_TOKEN") or None


PAGE = (Path(__file__).with_name("web_page.html")).read_text() if \
    Path(__file__).with_name("web_page.html").is_file() else "<h1>harken</h1>"
