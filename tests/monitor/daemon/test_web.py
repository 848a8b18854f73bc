"""The operator's page on a running daemon: HTTP API, live stream, token, and the page itself
in a real headless Chromium (skipped where Debian's chromium/chromedriver are absent)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf

from monitor.reference import ReferenceStore
from tests.helpers import RATE
from tests.monitor.test_verdicts import (REF_TRAIN_YAML, _config, _lines, _wait, fault_clip,
                                         start_daemon)
from tests.webdriver import CHROMEDRIVER, CHROMIUM, Browser

REPO = Path(__file__).resolve().parents[3]
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def ref_model(tmp_path_factory, tone_data) -> Path:
    from train.config import load_train_config
    from train.fit import fit_model

    base = tmp_path_factory.mktemp("ref-model")
    (base / "train.yaml").write_text(REF_TRAIN_YAML)
    fit_model(tone_data, base / "model", load_train_config(base / "train.yaml"), device="cpu",
              progress=False)
    return base / "model"


def _post(url: str, body, token: str | None):
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def test_page_stream_verdict_and_browser(tmp_path, ref_model):
    watch = tmp_path / "in"
    watch.mkdir()
    (tmp_path / "token").write_text(TOKEN + "\n")
    cfg = _config(tmp_path, ref_model, watch, extra=(
        "stats_interval_s: 1\n"
        f"web: {{enabled: true, port: 0, token_file: {tmp_path / 'token'}}}\n"))
    clip = tmp_path / "fault.wav"
    sf.write(clip, fault_clip(7), RATE, subtype="PCM_16")
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    out = tmp_path / "out.jsonl"

    def logged(event: str, **fields):
        for ln in log.read_text().splitlines():
            if f'"{event}"' in ln:
                rec = json.loads(ln[ln.index("{"):])
                if all(rec.get(k) == v for k, v in fields.items()):
                    return rec
        return None

    def score_of(name: str):
        return next((ln for ln in _lines(out) if ln.get("file", "").endswith(name)
                     and "score" in ln), None)

    browser = None
    try:
        port = _wait(lambda: logged("web_serving"), "the page", proc)["port"]
        base = f"http://127.0.0.1:{port}"
        assert b"<title>harken</title>" in _get(base + "/")
        assert [s["id"] for s in json.loads(_get(base + "/api/state"))["sources"]] == ["fan"]

        stream_lines: list[str] = []

        def read_stream() -> None:
            with urllib.request.urlopen(base + "/api/stream", timeout=120) as r:
                for raw in r:
                    stream_lines.append(raw.decode())
        threading.Thread(target=read_stream, daemon=True).start()
        _wait(lambda: any("hello" in ln for ln in stream_lines), "the stream to open", proc)

        if CHROMIUM and CHROMEDRIVER:
            browser = Browser()
            browser.get(base + "/")
            _wait(lambda: browser.run("return !!document.querySelector('#src-fan')"),
                  "the source row in the page", proc)

        shutil.copy(clip, watch / "a.wav")
        _wait(lambda: any(ln.startswith("event: score") for ln in stream_lines),
              "a live score on the stream", proc)
        first = _wait(lambda: score_of("a.wav"), "the first score", proc)
        assert first["anomaly"]
        event = _wait(lambda: next((e for e in json.loads(_get(base + "/api/events"))["events"]
                                    if e["has_clip"] and e["has_image"]), None),
                      "the alarm with its evidence", proc)
        assert _get(base + f"/api/events/{event['id']}/clip")[:4] == b"RIFF"
        assert _get(base + f"/api/events/{event['id']}/image")[:4] == b"\x89PNG"

        # refused: no token, a wrong token, an unknown event, a malformed verdict
        body = {"event_id": event["id"], "verdict": "normal"}
        assert _post(base + "/api/verdict", body, None)[0] == 401
        assert _post(base + "/api/verdict", body, "wrong")[0] == 401
        code, err = _post(base + "/api/verdict", {"event_id": "n1-fan-1", "verdict": "normal"}, TOKEN)
        assert code == 400 and "unknown event" in err["error"]
        code, err = _post(base + "/api/verdict", {"event_id": event["id"], "verdict": "ok"}, TOKEN)
        assert code == 400 and "normal or fault" in err["error"]
        assert _post(base + "/api/verdict", b"{not json", TOKEN)[0] == 400
        assert ReferenceStore(tmp_path / "state", "fan").version() == 0

        if browser is not None:
            # the page's own evidence: the clip plays, then the verdict is given from the page
            _wait(lambda: browser.run(
                "return !!document.querySelector(`tr[data-event='${arguments[0]}'] audio`)",
                event["id"]), "the alarm row in the page", proc)
            duration = browser.run_async(
                "const a = document.querySelector(`tr[data-event='${arguments[0]}'] audio`);"
                "const done = arguments[arguments.length - 1];"
                "a.addEventListener('loadedmetadata', () => done(a.duration));"
                "a.addEventListener('error', () => done(-1)); a.load();", event["id"])
            assert duration == pytest.approx(10.0, abs=0.1)
            browser.type("#token", TOKEN)
            browser.screenshot(tmp_path / "page.png")
            browser.click(f"tr[data-event='{event['id']}'] button.v-normal")
            _wait(lambda: "recorded normal" in browser.run(
                "return document.getElementById('verdict-msg').textContent"),
                "the page to confirm the verdict", proc)
        else:
            code, result = _post(base + "/api/verdict", body, TOKEN)
            assert code == 200, result
        _wait(lambda: logged("reference_loaded", version=1), "the new reference", proc)
        shutil.copy(clip, watch / "b.wav")
        again = _wait(lambda: score_of("b.wav"), "the replayed clip's score", proc)
        assert not again["anomaly"], again
        # undo from the page: refused without the token or for an event without a normal
        # verdict, then the judged windows leave the reference and the clip alarms again
        assert _post(base + "/api/undo", {"event_id": event["id"]}, None)[0] == 401
        code, err = _post(base + "/api/undo", {"event_id": "n1-fan-1"}, TOKEN)
        assert code == 400 and "nothing to undo" in err["error"]
        code, err = _post(base + "/api/undo", {"id": event["id"]}, TOKEN)
        assert code == 400 and "event_id" in err["error"]
        assert ReferenceStore(tmp_path / "state", "fan").version() == 1
        if browser is not None:
            _wait(lambda: browser.run(
                "return !!document.querySelector(`tr[data-event='${arguments[0]}'] button.v-undo`)",
                event["id"]), "the undo button", proc)
            if os.environ.get("HARKEN_SCREENSHOT"):
                browser.screenshot(Path(os.environ["HARKEN_SCREENSHOT"]))
            browser.click(f"tr[data-event='{event['id']}'] button.v-undo")
            _wait(lambda: "undone" in browser.run(
                "return document.getElementById('verdict-msg').textContent"),
                "the page to confirm the undo", proc)
            _wait(lambda: not browser.run(
                "return !!document.querySelector(`tr[data-event='${arguments[0]}'] button.v-undo`)",
                event["id"]), "the undo button to go", proc)
        else:
            code, result = _post(base + "/api/undo", {"event_id": event["id"]}, TOKEN)
            assert code == 200, result
        assert ReferenceStore(tmp_path / "state", "fan").load().windows == 0
        _wait(lambda: logged("reference_loaded", version=2), "the reference after undo", proc)
        shutil.copy(clip, watch / "c.wav")
        assert _wait(lambda: score_of("c.wav"), "the score after undo", proc)["anomaly"]

        # the event list survives a restart (<state_dir>/web_events.jsonl)
        seen = _wait(lambda: {e["id"] for e in json.loads(_get(base + "/api/events?limit=100"))[
            "events"]} if json.loads(_get(base + "/api/events"))["total"] == 2 else None,
            "the alarms of a.wav and c.wav on the page", proc)
        if browser is not None:
            browser.close()
            browser = None
        proc.terminate()
        proc.wait(timeout=60)
        log = tmp_path / "daemon2.log"
        proc = start_daemon(cfg, log)
        port = _wait(lambda: logged("web_serving"), "the page after a restart", proc)["port"]
        after = json.loads(_get(f"http://127.0.0.1:{port}/api/events?limit=100"))["events"]
        assert seen and {e["id"] for e in after} == seen
        assert next(e for e in after if e["id"] == event["id"])["verdict"] is None, "undone"
    finally:
        if browser is not None:
            browser.close()
        proc.terminate()
        proc.wait(timeout=60)


def test_the_sink_stays_bounded_and_pages():
    from monitor.daemon.types import AlarmEvent
    from monitor.daemon.web import EVENTS_KEPT, PAGE_MAX, WebSink

    sink = WebSink(["fan"])
    slow = sink.subscribe()  # a page that never reads
    for i in range(EVENTS_KEPT + 50):
        sink.publish_event(AlarmEvent("start", f"n1-fan-{i}", "fan", float(i), 2.0, 1.0))
    assert slow.qsize() == slow.maxsize and sink.clients_dropped > 0
    page = sink.event_page(0, PAGE_MAX)
    assert page["total"] == EVENTS_KEPT
    assert page["events"][0]["id"] == f"n1-fan-{EVENTS_KEPT + 49}", "newest first"
    assert sink.event_page(EVENTS_KEPT - 1, PAGE_MAX)["events"][0]["id"] == "n1-fan-50"


def test_the_event_list_survives_a_restart_and_stays_compact(tmp_path, monkeypatch):
    from monitor.daemon import web_events
    from monitor.daemon.types import AlarmEvent
    from monitor.daemon.web import WebSink

    monkeypatch.setattr(web_events, "COMPACT_AFTER_LINES", 50)
    path = tmp_path / "web_events.jsonl"
    sink = WebSink(["fan"], events_path=path)
    for i in range(40):
        sink.publish_event(AlarmEvent("start", f"n1-fan-{i}", "fan", float(i), 2.0, 1.0,
                                      clip=f"/e/{i}.wav"))
        sink.publish_event(AlarmEvent("end", f"n1-fan-{i}", "fan", i + 0.5, 3.0, 1.0))
    sink.publish_event(AlarmEvent("start", "n1-fan-40", "fan", 40.0, 2.0, 1.0))  # still open
    sink.mark_verdict("n1-fan-3", "normal")
    sink.mark_verdict("n1-fan-4", "fault")
    sink.mark_verdict("n1-fan-4", None)  # undone
    assert len(path.read_text().splitlines()) <= 50 + 1, "compacted past the bound"
    with open(path, "a") as f:
        f.write('{"row": {"id": "n1-fan-cut"')  # a crash mid-line loses that line only

    again = WebSink(["fan"], events_path=path)
    page = again.event_page(0, 100)
    assert page["total"] == 41
    assert [e["id"] for e in page["events"][:2]] == ["n1-fan-40", "n1-fan-39"]
    assert not page["events"][0]["open"], "a restarted daemon has no alarm on"
    byid = {e["id"]: e for e in page["events"]}
    assert byid["n1-fan-3"]["verdict"] == "normal" and byid["n1-fan-4"]["verdict"] is None
    assert byid["n1-fan-5"]["has_clip"] and not byid["n1-fan-5"]["open"]
    assert byid["n1-fan-5"]["peak_score"] == 3.0
    assert again.event_file("n1-fan-5", "clip") == "/e/5.wav"
