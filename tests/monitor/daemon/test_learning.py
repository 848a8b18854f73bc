"""Enrolment from the live stream (`learn_for:`): a watched folder source learns, arms itself,
keeps what it learnt across a restart, then alarms on a fault; models it cannot fit are refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitor.daemon.config import ConfigError, load_config
from tests.helpers import RATE, harken, tone_clip
from tests.monitor.test_verdicts import _config, _lines, _wait, ref_model, start_daemon  # noqa: F401

MACHINE = 3  # a hum the model never heard in training (ids 0 and 1): its own normal is learnt


def _learning_config(tmp_path: Path, model: Path, watch: Path, learn_for: str = "80s",
                     extra: str = "") -> Path:
    cfg = _config(tmp_path, model, watch, extra)
    text = cfg.read_text().replace("    poll_s: 0.2\n", f"    poll_s: 0.2\n    hop_s: 2\n"
                                   f"    learn_for: {learn_for}\n")
    cfg.write_text(text)
    return cfg


def _clip(seed: int, anomalous: bool, seconds: float) -> np.ndarray:
    return tone_clip(np.random.default_rng(seed), MACHINE, anomalous, seconds=seconds)


def test_a_source_learns_arms_survives_a_restart_and_alarms(tmp_path, ref_model, broker,
                                                            collector):
    watch = tmp_path / "in"
    watch.mkdir()
    cfg = _learning_config(tmp_path, ref_model, watch, extra=(
        f"mqtt: {{host: {broker.host}, port: {broker.port}, reconnect_min_s: 0.2, "
        "reconnect_max_s: 0.5}\n"))
    out = tmp_path / "out.jsonl"
    for i in range(9):  # 18 s each: 5 windows at hop 2 s, the machine's hum varies a little
        sf.write(tmp_path / f"normal{i}.wav", _clip(i, False, 18.0), RATE, subtype="PCM_16")
    sf.write(tmp_path / "later.wav", _clip(10, False, 20.0), RATE, subtype="PCM_16")
    sf.write(tmp_path / "fault.wav", _clip(11, True, 10.0), RATE, subtype="PCM_16")
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)

    def logged(event: str):
        return [json.loads(ln[ln.index("{"):]) for ln in log.read_text().splitlines()
                if f'"{event}"' in ln]

    def states():
        return [ln["state"] for ln in _lines(out) if ln.get("kind") == "source_state"]

    def scores(name: str):
        return [ln for ln in _lines(out) if ln.get("kind") == "score"
                and ln.get("file", "").endswith(name)]

    try:
        _wait(lambda: "learning" in states(), "the source to start learning", proc)
        # 9 clips of 5 windows at hop 2 s: the first 40 windows (80 s) are learnt, the 9th
        # clip's are judged by the enrolled model
        for i in range(9):
            shutil.copy(tmp_path / f"normal{i}.wav", watch / f"a{i}.wav")
        armed = _wait(lambda: logged("source_armed"), "the source to arm", proc)[0]
        assert armed["windows"] == 40 and armed["restored"] is False
        _wait(lambda: len(scores(".wav")) == 45, "every window of a0-a8.wav", proc)
        learnt, judged = scores(".wav")[:40], scores(".wav")[40:]
        assert any(s["anomaly"] for s in learnt), "the artifact alone finds this hum anomalous"
        assert not any(ln.get("type") == "start" for ln in _lines(out)), "no alarm while learning"
        assert not any(s["anomaly"] for s in judged), judged
        assert judged[0]["threshold"] != learnt[0]["threshold"], "the enrolled tail's threshold"
        _wait(lambda: states()[-1] == "running", "the armed state", proc)
        assert states()[:2] == ["learning", "running"]
        collector.wait_for("harken/n1/fan/state", b"running")
        seen = collector.payloads("harken/n1/fan/state")  # re-sent on every connect
        assert [p for i, p in enumerate(seen) if i == 0 or p != seen[i - 1]][:2] == [
            b"learning", b"running"]
        assert (tmp_path / "state" / "enrolment" / "fan" / "enrolment.json").is_file()

        shutil.copy(tmp_path / "later.wav", watch / "b.wav")  # learning never resumes
        _wait(lambda: len(scores("b.wav")) == 6, "the later normal clip", proc)
        assert not any(s["anomaly"] for s in scores("b.wav"))
        assert len(logged("source_armed")) == 1
        assert json.loads((tmp_path / "state" / "enrolment" / "fan" / "enrolment.json")
                          .read_text())["windows"] == 40

        proc.terminate()
        proc.wait(timeout=60)
        out.unlink()
        log = tmp_path / "daemon2.log"
        proc = start_daemon(cfg, log)
        restored = _wait(lambda: logged("source_armed"), "the enrolment to be reused", proc)[0]
        assert restored["restored"] is True and restored["windows"] == 40
        _wait(lambda: states(), "the source state", proc)
        assert "learning" not in states()
        shutil.copy(tmp_path / "fault.wav", watch / "c.wav")
        start = _wait(lambda: next((ln for ln in _lines(out) if ln.get("type") == "start"), None),
                      "the fault's alarm", proc)
        assert start["source"] == "fan"
        assert scores("c.wav")[0]["anomaly"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_learn_for_is_checked(tmp_path, ref_model, tiny_model):
    watch = tmp_path / "in"
    watch.mkdir()
    for value, message in (("soon", "sources[0].learn_for: must be a duration like 2h"),
                           ("38s", "must cover at least 20 hops (40 s at hop_s 2)")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(_learning_config(tmp_path, ref_model, watch, value))
    cfg = _learning_config(tmp_path, tiny_model, watch)
    with pytest.raises(ConfigError, match="learn_for: .* the model's scorer recon needs a "
                                          "trained decoder"):
        load_config(cfg)
    ran = harken("monitor", "--config", str(cfg))
    assert ran.returncode == 2 and "recon needs a trained decoder" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert not (tmp_path / "state" / "enrolment").exists()


def test_check_config_says_what_a_learning_source_will_do(tmp_path, ref_model):
    watch = tmp_path / "in"
    watch.mkdir()
    ran = harken("check-config", str(_learning_config(tmp_path, ref_model, watch, "2h")))
    assert ran.returncode == 0, ran.stderr
    assert "fan: learns for 2h" in ran.stdout
