"""Issue 15's own hostile campaign: property-based tests over manifests, MQTT payloads and user
properties, training configs; signals at random points of the daemon; full disks under the
daemon; a flood against a real broker. Example counts stay modest so `make test` stays fast."""

from __future__ import annotations

import copy
import io
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.errors import UsageError
from tests.helpers import REPO, tone_clip

RATE = 16_000
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                          st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_json = st.recursive(_json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=8), kids, max_size=3)),
    max_leaves=8)


# --------------------------------------------------------------------------- manifests


def _paths(node, prefix=()):
    """Every (path) into a manifest down to depth 3, dicts and lists alike."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        if len(prefix) < 2:
            out += _paths(v, prefix + (k,))
    return out


@pytest.fixture(scope="module")
def fuzz_model(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(tiny_model, d)
    return d, json.loads((d / "manifest.json").read_text())


@FUZZ
@given(data=st.data())
def test_any_hand_edit_of_a_manifest_loads_or_is_one_artifact_error(fuzz_model, data):
    from monitor.detector import Detector

    root, original = fuzz_model
    m = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(m)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = data.draw(_json)
    (root / "manifest.json").write_text(json.dumps(m))  # NaN and Infinity included
    try:
        det = Detector.load(root, device="cpu")
    except UsageError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000
        return
    # It loaded: then it must score, and its thresholds must be usable numbers.
    assert math.isfinite(det.threshold)
    scores = det.score_windows(np.zeros((1, 160_000), np.float32) + 0.01)
    assert scores.shape == (1,)


# --------------------------------------------------------------------------- MQTT payloads


def _source(**kw):
    from monitor.daemon.config import MqttConfig, SourceConfig
    from monitor.daemon.mqtt import MqttAudioSource

    cfg = SourceConfig(**({"id": "q", "kind": "mqtt", "model": "m", "topic": "rec/q"} | kw))
    src = MqttAudioSource(cfg, MqttConfig(), node="t", password=None)
    out = []
    src._on_block = out.append
    src._on_window = out.append
    return src, out


def test_a_chunk_stamped_at_ts_0_never_starts_before_the_epoch():
    """Resampled from 8 kHz, the output starts a resampler lag before the chunk's ts: at ts 0
    that would be negative (found by the fuzz test below)."""
    src, blocks = _source(format="s16le", channels=1, rate_hz=8000)
    src._handle_chunk(b"\x00\x00" * 800, [("ts", "0")], time.time())
    src._handle_chunk(b"\x00\x00" * 800, [("ts", "0.1")], time.time())
    assert [b.start_time_s >= 0.0 for b in blocks] == [True, True]
    assert blocks[1].start_time_s > blocks[0].start_time_s


_prop_value = st.one_of(st.integers(-2**66, 2**66).map(str), st.floats().map(repr),
                        st.text(max_size=20), st.just("1e300"), st.just("nan"))
_props = st.lists(st.tuples(st.sampled_from(["seq", "ts", "other", "SEQ"]), _prop_value), max_size=4)


@FUZZ
@given(messages=st.lists(st.tuples(st.binary(max_size=700), _props), min_size=1, max_size=25),
       fmt=st.sampled_from(["s16le", "f32le"]), channels=st.integers(1, 3),
       rate=st.sampled_from([8000, 16000, 44100, 48000]))
def test_any_stream_of_chunks_and_properties_is_handled_and_counted(messages, fmt, channels, rate):
    from monitor.daemon import pcm
    from monitor.errors import AudioError

    src, blocks = _source(format=fmt, channels=channels, rate_hz=rate)
    for payload, props in messages:
        try:
            src._handle_chunk(payload, props, time.time())
        except pcm.PayloadError as exc:
            src._reject(exc.reason, str(exc))
        except AudioError as exc:
            src._reject("bad_audio", str(exc))
    s = src.status()
    assert s["blocks"] + s["late"] + sum(s["rejected"].values()) == len(messages)
    for b in blocks:
        assert b.samples.dtype == np.float32 and b.samples.ndim == 1
        assert np.isfinite(b.samples).all() and np.abs(b.samples).max(initial=0) <= 1.1e4
        assert math.isfinite(b.start_time_s) and 0 <= b.start_time_s < 5e9


def _wav(x, rate, subtype="PCM_16"):
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@FUZZ
@given(cut=st.integers(0, 2000), flip=st.integers(0, 1999), byte=st.integers(0, 255),
       rate=st.sampled_from([7999, 8000, 16000, 48000, 96000]), props=_props)
def test_any_mangled_wav_clip_is_a_window_or_a_counted_rejection(cut, flip, byte, rate, props):
    from monitor.daemon import pcm
    from monitor.errors import AudioError

    src, windows = _source(mode="window", window_s=1.0, hop_s=1.0)
    good = _wav(np.linspace(-0.5, 0.5, 1000).astype(np.float32), rate)
    for payload in (good[:cut], good[:flip] + bytes([byte]) + good[flip + 1:]):
        try:
            src._handle_clip(payload, props, time.time())
        except (pcm.PayloadError, AudioError):
            continue
    for w in windows:
        assert w.samples.shape == (16_000,) and np.isfinite(w.samples).all()
        assert 0 <= w.start_time_s <= 4_102_444_800.0 + 10


# --------------------------------------------------------------------------- training config

_train_keys = st.sampled_from(["encoder", "decoder", "scorers", "weights", "embedding",
                               "decoder_dims", "learning_rate", "batch_size", "max_epochs",
                               "lr_patience", "lr_factor", "early_stop_patience",
                               "early_stop_min_delta", "val_fraction", "threshold_method",
                               "threshold_quantile", "knn_k", "knn_metric", "fusion", "hop_s",
                               "embed_batch_size", "embedding_cache", "seed", "fine_tune",
                               "fine_tune_lr", "fine_tune_epochs", "fine_tune_batch_size", "bogus"])


@settings(max_examples=150, deadline=None)
@given(section=st.dictionaries(_train_keys, _json, max_size=5), nest=st.booleans())
def test_any_training_config_loads_or_is_one_usage_error(tmp_path_factory, section, nest):
    from train.config import load_train_config

    f = tmp_path_factory.mktemp("tc") / "train.yaml"
    try:
        text = yaml.safe_dump({"train": section} if nest else section, allow_unicode=True)
    except yaml.YAMLError:
        return
    f.write_text(text)
    try:
        cfg = load_train_config(f)
    except UsageError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000
        return
    for name in ("learning_rate", "lr_factor", "val_fraction", "threshold_quantile", "fine_tune_lr"):
        assert math.isfinite(getattr(cfg, name))


# --------------------------------------------------------------------------- signals


def _monitor_config(tmp_path, model, folder, **top):
    cfg = {"node": "n", "device": "cpu", "state_dir": str(tmp_path / "state"),
           "jsonl": str(tmp_path / "out.jsonl"), "stats_interval_s": 0.5,
           "sources": [{"id": "f", "kind": "folder", "path": str(folder), "model": str(model),
                        "watch": True, "poll_s": 0.1}], **top}
    f = tmp_path / "harken.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def test_sigterm_and_sigkill_at_random_points_of_the_monitor(tiny_model, tmp_path):
    """SIGTERM anywhere (loading, scoring, idle): a clean exit without a traceback and a JSONL
    file of whole lines. SIGKILL anywhere, then a restart: every recording is scored, none
    more than twice (the played list survives; only the file in flight is seen again)."""
    folder = tmp_path / "drop"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        sf.write(folder / f"{i:03d}_normal_id_00.wav", tone_clip(rng, 0, False, seconds=10.0), RATE)
    cfg = _monitor_config(tmp_path, tiny_model, folder)
    out = tmp_path / "out.jsonl"
    pick = random.Random(15)
    cmd = [sys.executable, "-m", "train.cli", "monitor", "--config", str(cfg), "--log-level",
           "warning"]
    for delay in (pick.uniform(0.0, 1.0), pick.uniform(2.0, 6.0)):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -signal.SIGTERM), err  # -15: before the handler existed
        assert "Traceback" not in err, err
    lines = out.read_text().splitlines() if out.exists() else []
    for line in lines:
        json.loads(line)  # whole lines only

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(pick.uniform(3.0, 8.0))
    proc.kill()
    proc.wait()
    def rows():
        got = []
        for line in out.read_text().splitlines() if out.exists() else []:
            try:
                got.append(json.loads(line))
            except json.JSONDecodeError:  # the SIGKILLed writer's last line may be torn
                pass
        return got

    def scored():
        return [Path(r["file"]).name for r in rows() if r.get("kind") == "score"]

    def onlines():
        return sum(r.get("kind") == "status" and r.get("status") == "online" for r in rows())

    before = onlines()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (onlines() == before or len(set(scored())) < 8):
        time.sleep(0.3)
    time.sleep(1.0)  # a few more polls: nothing old may be played again
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    names = scored()
    assert set(names) == {p.name for p in folder.iterdir()}, names
    counts = {n: names.count(n) for n in set(names)}
    assert max(counts.values()) <= 4, counts  # SIGTERM x2 + SIGKILL + restart: few repeats
    assert sum(c > 1 for c in counts.values()) <= 3, counts


# --------------------------------------------------------------------------- full disks


class _Loud:
    name = "loud"
    threshold = 1.0
    window_s = 1.0

    def threshold_for(self, machine_id):
        return 1.0

    def score_windows(self, windows, machine_ids):
        return np.full(len(windows), 5.0, np.float32)

    def log_mel(self, window):
        return np.zeros((128, 101), np.float32)

    def error_map(self, window, machine_id=None):
        return None


def test_a_full_disk_under_the_daemon_loses_files_not_the_daemon(tmp_path, mount_fs):
    """The JSONL file and the evidence on a 64 kB file system that fills up: the daemon scores
    every window, counts what it could not write, and stops cleanly."""
    from monitor.daemon.app import Daemon
    from monitor.daemon.config import AlarmConfig, DaemonConfig, SourceConfig

    disk = mount_fs(size="64k")
    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(40):
        sf.write(folder / f"{i:03d}.wav", np.full(RATE, 0.1 * (1 + i % 2), np.float32), RATE)
    cfg = DaemonConfig(sources=(SourceConfig(id="s", kind="folder", model="m", path=str(folder),
                                             window_s=1.0, hop_s=1.0),),
                       node="t", device="cpu", state_dir=str(disk / "state"),
                       jsonl=str(disk / "out.jsonl"), alarm=AlarmConfig(k=1, n=1, hold_s=0.0))

    class Alternating(_Loud):
        def score_windows(self, windows, machine_ids):
            return np.array([5.0 if w.max() > 0.15 else 0.1 for w in windows], np.float32)

    daemon = Daemon(cfg, detectors={"m": Alternating()})
    assert daemon.run() == 0
    stats = daemon.stats()
    assert stats["windows_scored"] == 40 and stats["windows_publish_failed"] == 0
    assert stats["jsonl_write_failed"] > 0 and stats["evidence_failed"] > 0
    assert sum(e.type == "start" for e in daemon.events) == 20  # every alarm still raised


# --------------------------------------------------------------------------- floods


@pytest.fixture
def broker(tmp_path):
    from tests.mosquitto import Mosquitto

    with Mosquitto(tmp_path / "broker") as b:
        yield b


def test_a_flood_of_large_payloads_keeps_memory_bounded_and_counts_drops(broker):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from monitor.daemon.config import SourceConfig
    from monitor.daemon.mqtt import MqttAudioSource
    from tests.monitor.daemon.conftest import fast_mqtt, wait_until

    cap = 2_000_000
    cfg = SourceConfig(id="q", kind="mqtt", model="m", topic="rec/q", format="s16le")
    src = MqttAudioSource(cfg, fast_mqtt(broker), node="t", password=None, queue_max=10_000,
                          queue_max_bytes=cap)
    stuck = threading.Event()
    peak = {"bytes": 0}

    def on_block(block):
        stuck.wait(30)  # a decoding worker that has fallen far behind

    src.start(on_block, lambda w: None)
    wait_until(lambda: src.status()["connected"], what="subscribed")
    sender = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    sender.connect(broker.host, broker.port)
    sender.loop_start()
    payload = np.zeros(50_000, "<i2").tobytes()  # 100 kB
    try:
        for _ in range(300):  # 30 MB in all
            sender.publish("rec/q", payload, qos=0)
            peak["bytes"] = max(peak["bytes"], src._bytes_put - src._bytes_taken)
        wait_until(lambda: src.status()["messages"] + src.status()["dropped"] + src._inbox.qsize()
                   >= 290, timeout_s=30, what="the flood delivered")
        peak["bytes"] = max(peak["bytes"], src._bytes_put - src._bytes_taken)
        assert peak["bytes"] <= cap
        assert src.status()["dropped"] >= 250
    finally:
        stuck.set()
        sender.disconnect()
        sender.loop_stop()
        src.stop()


def test_finite_but_absurd_samples_are_not_audio(tmp_path):
    """A float WAV scaled by 1e30 is finite, yet every score of it is NaN: refused as audio
    (a counted skip in replay, training and folders; `bad_audio` for MQTT)."""
    from monitor.audio import load_audio
    from monitor.errors import AudioError

    f = tmp_path / "huge.wav"
    sf.write(f, (np.ones(16000) * 1e30).astype(np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="far outside"):
        load_audio(f)


def test_a_jsonl_path_that_became_unwritable_is_one_line_at_start(tmp_path):
    from monitor.daemon.jsonl import JsonlPublisher

    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(UsageError, match="jsonl: .*cannot append to it"):
        JsonlPublisher(tmp_path / "out.jsonl").start()
