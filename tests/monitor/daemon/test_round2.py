"""Issue 15: what a hostile trial broke in the daemon, each case as it was reproduced.

1 an MQTT source in window mode kept the watchdog fed; 4 seq / ts user properties and drop
counters; 6 a 48 kHz stream in 0.1-s blocks scores like the file resampled whole; 7 evidence
never holds up scoring; 10 a watched folder does not replay its old files after a restart.
"""

from __future__ import annotations

import io
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from monitor.daemon.config import AlarmConfig, DaemonConfig, EvidenceConfig, MqttConfig, SourceConfig
from tests.helpers import tone_clip
from tests.monitor.daemon.conftest import FakeStream, fast_mqtt, wait_until

RATE = 16_000


class FakeDetector:
    name = "fake"
    threshold = 1.0
    window_s = 10.0

    def __init__(self, scores=None):
        self._scores = scores  # callable(window) -> score; default: quiet

    def threshold_for(self, machine_id):
        return self.threshold

    def score_windows(self, windows, machine_ids):
        if self._scores is None:
            return np.full(len(windows), 0.1, np.float32)
        return np.array([self._scores(w) for w in windows], np.float32)

    def log_mel(self, window):
        return np.zeros((128, 101), np.float32)

    def error_map(self, window, machine_id=None):
        return None


class Recorder:
    def __init__(self):
        self.scores, self.events, self.states = [], [], {}
        self.lock = threading.Lock()

    def start(self): ...
    def stop(self): ...
    def publish_alarm_state(self, *a): ...
    def publish_stats(self, s): ...
    def status(self): return {}

    def publish_score(self, s):
        with self.lock:
            self.scores.append(s)

    def publish_event(self, e):
        with self.lock:
            self.events.append(e)

    def publish_source_state(self, source, state):
        with self.lock:
            self.states.setdefault(source, []).append(state)


def wav_bytes(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# --------------------------------------------------------------------------- 1. window mode


def test_mqtt_window_mode_keeps_the_watchdog_fed_and_the_source_running(broker, tmp_path):
    """Clips every 0.25 s: scored, and the source is alive. It used to go `stalled` and starve
    the systemd watchdog (status() had no last_audio_mono_s; window mode skips the ring)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from monitor.daemon.app import Daemon
    from monitor.daemon.mqtt import MqttAudioSource

    mqtt = fast_mqtt(broker)
    sc = SourceConfig(id="q", kind="mqtt", model="m", topic="rec/q/wav", mode="window",
                      window_s=1.0, hop_s=0.2)
    cfg = DaemonConfig(sources=(sc,), node="t", device="cpu", state_dir=str(tmp_path / "s"),
                       stall_after_s=0.5, watchdog_dead_s=1.0, mqtt=mqtt,
                       evidence=EvidenceConfig(enabled=False))
    src = MqttAudioSource(sc, mqtt, node="t", password=None, stall_after_s=0.5)
    pub = Recorder()
    daemon = Daemon(cfg, publisher=pub, detectors={"m": FakeDetector()}, sources={"q": src})
    runner = threading.Thread(target=daemon.run)
    sender = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    sender.connect(broker.host, broker.port)
    sender.loop_start()
    clip = wav_bytes(tone_clip(np.random.default_rng(0), 0, False, seconds=1.0), RATE)
    runner.start()
    try:
        wait_until(lambda: src.status()["connected"], what="subscribed")
        alive = []
        for _ in range(14):  # 3.5 s: well past watchdog_dead_s and the stall time
            sender.publish("rec/q/wav", clip, qos=1).wait_for_publish(5)
            time.sleep(0.25)
            alive.append(daemon.alive())
        assert src.status()["last_audio_mono_s"] is not None
        assert len(pub.scores) >= 10
        assert all(alive[2:]), alive
        assert "stalled" not in pub.states.get("q", []), pub.states
    finally:
        daemon.request_stop()
        runner.join(30)
        sender.disconnect()
        sender.loop_stop()


# --------------------------------------------------------------------------- 4. seq, ts, drops


def _chunk_source(**kw):
    from monitor.daemon.mqtt import MqttAudioSource

    cfg = SourceConfig(**({"id": "q", "kind": "mqtt", "model": "m", "topic": "rec/q"} | kw))
    src = MqttAudioSource(cfg, MqttConfig(), node="t", password=None)
    blocks = []
    src._on_block = blocks.append
    return src, blocks


def _feed(src, payload: bytes, props) -> None:
    from monitor.daemon import pcm

    try:
        src._handle_chunk(payload, props, time.time())
    except pcm.PayloadError as exc:
        src._reject(exc.reason, str(exc))


def test_a_huge_seq_does_not_silence_the_stream():
    src, blocks = _chunk_source()
    chunk = np.zeros(160, "<i2").tobytes()
    _feed(src, chunk, [("seq", "1000000000000000")])
    for seq in (1, 2, 3, 4):
        _feed(src, chunk, [("seq", str(seq))])
    s = src.status()
    assert len(blocks) == 5 and s["late"] == 0 and s["restarts"] == 1, s
    assert [b.discontinuity for b in blocks[1:]] == [True, False, False, False]
    _feed(src, chunk, [("seq", "3")])  # a genuinely late chunk is still dropped as late
    assert src.status()["late"] == 1 and len(blocks) == 5


@pytest.mark.parametrize("props, reason", [
    ([("ts", "1e300")], "bad_property"),
    ([("ts", "-1")], "bad_property"),
    ([("ts", "nan")], "bad_property"),
    ([("seq", str(2**64))], "bad_property"),
    ([("seq", "9" * 5000)], "bad_property"),
])
def test_absurd_user_properties_are_rejected_and_counted(props, reason):
    src, blocks = _chunk_source()
    _feed(src, np.zeros(160, "<i2").tobytes(), props)
    assert blocks == [] and src.status()["rejected"] == {reason: 1}


def test_alarm_ids_from_absurd_times_still_give_short_evidence_names(tmp_path):
    from monitor.daemon.evidence import EvidenceStore, evidence_stem

    alarm_id = "line1-q-" + "9" * 300
    assert len(evidence_stem(alarm_id)) <= 120 and evidence_stem(alarm_id) != evidence_stem(alarm_id + "8")
    clip, image = EvidenceStore(tmp_path).save(alarm_id, np.zeros(16000, np.float32),
                                               log_mel=np.zeros((128, 101), np.float32),
                                               error_map=None)
    assert len(clip.rsplit("/", 1)[1]) < 130 and tmp_path.joinpath(clip).exists()


def test_inbox_drops_are_in_the_daemon_stats_and_the_inbox_is_bounded_in_bytes(tmp_path):
    from monitor.daemon.app import Daemon
    from monitor.daemon.mqtt import MqttAudioSource

    sc = SourceConfig(id="q", kind="mqtt", model="m", topic="rec/q")
    src = MqttAudioSource(sc, MqttConfig(), node="t", password=None, queue_max=1000,
                          queue_max_bytes=10_000)
    big = SimpleNamespace(topic="rec/q", properties=None, payload=b"\x00" * 4000)
    for _ in range(5):  # the worker is not running: nothing is taken out
        src._on_message(None, None, big)
    assert src._inbox.qsize() == 2 and src.status()["dropped"] == 3
    cfg = DaemonConfig(sources=(sc,), node="t", device="cpu", state_dir=str(tmp_path / "s"),
                       mqtt=MqttConfig())
    daemon = Daemon(cfg, publisher=Recorder(), detectors={"m": FakeDetector()}, sources={"q": src})
    daemon.init()  # every part built, nothing started
    per = daemon.stats()["sources"]["q"]
    assert per["dropped"] == 3 and per["input_dropped"] == 3  # it said 0 during a flood


def test_a_window_mode_clip_is_never_cut_into_all_its_windows():
    """A 4 MB clip at 8 kHz is 250 s: at a 0.01-s hop all its windows would be 16 GB."""
    import tracemalloc

    src, _ = _chunk_source(mode="window", window_s=10.0, hop_s=0.01, max_payload_bytes=5_000_000)
    windows = []
    src._on_window = windows.append
    payload = wav_bytes(np.zeros(8000 * 250, np.float32), 8000)
    tracemalloc.start()
    src._handle_clip(payload, [], time.time())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(windows) == 1 and windows[0].samples.shape == (160_000,)
    assert peak < 200e6, peak


# --------------------------------------------------------------------------- 6. resampling


@pytest.fixture(scope="module")
def clip48k(tmp_path_factory):
    rng = np.random.default_rng(7)
    t = np.arange(int(21.0 * 48_000)) / 48_000
    x = (0.1 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 5_100 * t)
         + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)
    path = tmp_path_factory.mktemp("rs") / "clip48k.wav"
    sf.write(path, x, 48_000, subtype="FLOAT")
    return path, x


def _file_windows(path):
    from monitor.audio import load_audio, split_windows

    return split_windows(load_audio(path), 10.0, 5.0)[:3]  # 0-10, 5-15, 10-20 s


def _ring_windows(blocks):
    from monitor.daemon.ringbuffer import RingBuffer

    ring = RingBuffer("s", window_s=10.0, hop_s=5.0)
    out = []
    for b in blocks:
        out += ring.push(b)
    return out


def test_a_48k_mic_in_0_1s_blocks_scores_like_the_file_resampled_whole(clip48k, tiny_model):
    from monitor.daemon.mic import MicSource
    from monitor.detector import Detector

    path, x = clip48k
    src = MicSource(SourceConfig(id="m", kind="mic", model="m", rate_hz=48_000),
                    query_devices=lambda: [{"name": "USB", "max_input_channels": 1}],
                    stream_factory=FakeStream, wall=lambda: 1000.0)
    blocks = []
    src._on_block = blocks.append
    src._stream_to_wall_s = 950.0
    for i in range(0, len(x) - 4800 + 1, 4800):  # 0.1-s PortAudio blocks
        src._deliver(x[i:i + 4800, None], 50.0 + i / 48_000)
    streamed = _ring_windows(blocks)
    whole = _file_windows(path)
    assert len(streamed) >= 3
    # sample for sample: the stateless per-block resampling was off by up to 8e-3 at each edge
    np.testing.assert_allclose(np.stack([w.samples for w in streamed[:3]]), whole, atol=2e-6)
    assert [w.start_time_s for w in streamed[:3]] == pytest.approx([1000.0, 1005.0, 1010.0], abs=1e-6)
    det = Detector.load(tiny_model, device="cpu")
    np.testing.assert_allclose(det.score_windows(np.stack([w.samples for w in streamed[:3]])),
                               det.score_windows(whole), rtol=1e-4)


def test_a_48k_mqtt_stream_in_0_1s_chunks_matches_the_file_and_resets_at_gaps(clip48k):
    path, x = clip48k
    src, blocks = _chunk_source(rate_hz=48_000, format="f32le")
    for n, i in enumerate(range(0, len(x) - 4800 + 1, 4800)):
        _feed(src, x[i:i + 4800].astype("<f4").tobytes(),
              [("seq", str(n)), ("ts", repr(1_700_000_000.0 + i / 48_000))])
    streamed = _ring_windows(blocks)
    np.testing.assert_allclose(np.stack([w.samples for w in streamed[:3]]), _file_windows(path),
                               atol=2e-6)
    assert streamed[0].start_time_s == pytest.approx(1_700_000_000.0, abs=1e-6)
    # after a gap the resampler starts afresh: the first block is the start of a new stream
    _feed(src, x[:4800].astype("<f4").tobytes(), [("seq", "500")])
    from monitor.resample import resample_whole

    np.testing.assert_allclose(blocks[-1].samples,
                               resample_whole(x[:4800], 48_000, 16_000)[:len(blocks[-1].samples)],
                               atol=1e-6)
    assert blocks[-1].discontinuity


# --------------------------------------------------------------------------- 7. evidence


def test_slow_evidence_never_holds_up_scoring(tmp_path):
    """Every other window starts an alarm whose evidence takes as long as the test wants;
    meanwhile every window is still scored. Events go out in order once evidence is done,
    starts beyond the evidence backlog without files (counted)."""
    from monitor.daemon.app import Daemon

    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(20):
        sf.write(folder / f"{i:03d}.wav", np.full(RATE, 0.1 if i % 2 else 0.2, np.float32), RATE)
    release = threading.Event()

    class SlowEvidence(FakeDetector):
        def log_mel(self, window):
            release.wait(60)
            return super().log_mel(window)

    det = SlowEvidence(scores=lambda w: 5.0 if w.max() > 0.15 else 0.1)
    cfg = DaemonConfig(sources=(SourceConfig(id="s", kind="folder", model="m", path=str(folder),
                                             window_s=1.0, hop_s=1.0),),
                       node="t", device="cpu", state_dir=str(tmp_path / "state"),
                       alarm=AlarmConfig(k=1, n=1, hold_s=0.0))
    pub = Recorder()
    daemon = Daemon(cfg, publisher=pub, detectors={"m": det})
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_until(lambda: len(pub.scores) == 20, timeout_s=30, what="all 20 windows scored "
                   "while the evidence is stuck")
        assert daemon.worker.scored == 20 and pub.events == []
        assert daemon.stats()["evidence_dropped"] >= 5  # 10 starts, at most 4 waiting
    finally:
        release.set()
        runner.join(60)
    starts = [e for e in pub.events if e.type == "start"]
    assert [e.type for e in pub.events] == ["start", "end"] * 10  # in order, none lost
    with_files = [e for e in starts if e.clip]
    assert 1 <= len(with_files) <= 5 and all((tmp_path / "state" / "evidence").glob("*.wav"))
    assert len(with_files) + daemon.event_worker.evidence_dropped == 10


# --------------------------------------------------------------------------- 10. played set


def test_a_restarted_daemon_does_not_replay_a_watched_folder(tmp_path):
    """Alarms are not raised again for old files (same ids, evidence rewritten): only files
    that are new, or replaced under the same name, are played after a restart."""
    from monitor.daemon.app import Daemon

    folder = tmp_path / "drop"
    folder.mkdir()
    for i in range(4):
        sf.write(folder / f"{i:03d}.wav", np.full(RATE, 0.2, np.float32), RATE)
    sc = SourceConfig(id="s", kind="folder", model="m", path=str(folder), window_s=1.0,
                      hop_s=1.0, watch=True, poll_s=0.05)
    cfg = DaemonConfig(sources=(sc,), node="t", device="cpu", state_dir=str(tmp_path / "state"),
                       alarm=AlarmConfig(k=1, n=1, hold_s=100.0))

    def run_until(n_scores):
        pub = Recorder()
        daemon = Daemon(cfg, publisher=pub, detectors={"m": FakeDetector(scores=lambda w: 5.0)})
        runner = threading.Thread(target=daemon.run)
        runner.start()
        try:
            wait_until(lambda: len(pub.scores) >= n_scores, timeout_s=30, what=f"{n_scores} scored")
            time.sleep(0.5)  # several more polls: nothing else must be played
        finally:
            daemon.request_stop()
            runner.join(30)
        return pub, daemon

    first, _ = run_until(4)
    assert len(first.scores) == 4 and sum(e.type == "start" for e in first.events) == 1
    evidence = sorted((tmp_path / "state" / "evidence").glob("*.wav"))
    stamp = [p.stat().st_mtime_ns for p in evidence]
    sf.write(folder / "004.wav", np.full(RATE, 0.2, np.float32), RATE)  # new
    sf.write(folder / "001.wav", np.full(2 * RATE, 0.2, np.float32), RATE)  # replaced
    second, daemon = run_until(3)
    assert sorted(s.label.rsplit("/", 1)[1] for s in second.scores) == ["001.wav", "001.wav", "004.wav"]
    assert daemon.sources["s"].status()["skipped_by_reason"]["played_before"] == 3
    assert [p.stat().st_mtime_ns for p in evidence] == stamp  # old evidence untouched
