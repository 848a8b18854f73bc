"""MqttAudioSource against a real Mosquitto: PCM chunks with seq/ts, gaps, late chunks, WAV
clips, hostile payloads, configuration checks."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import paho.mqtt.client as paho
import pytest
import soundfile as sf
from paho.mqtt.enums import CallbackAPIVersion

from monitor.daemon.config import MqttConfig, SourceConfig
from monitor.daemon.mqtt import MqttAudioSource, user_properties
from monitor.errors import UsageError
from tests.monitor.daemon.conftest import fast_mqtt, wait_until

TOPIC = "factory/line1/mic3/pcm"


class Sink:
    def __init__(self):
        self.blocks, self.windows = [], []
        self.lock = threading.Lock()

    def on_block(self, block):
        with self.lock:
            self.blocks.append(block)

    def on_window(self, window):
        with self.lock:
            self.windows.append(window)


@pytest.fixture
def sender(broker):
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()

    def send(payload: bytes, seq=None, ts=None, topic=TOPIC):
        client.publish(topic, payload, qos=1, properties=user_properties(seq, ts)).wait_for_publish(10)

    yield send
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def source_factory(broker):
    made = []

    def make(stall_after_s: float = 30.0, **kw) -> tuple[MqttAudioSource, Sink]:
        cfg = SourceConfig(**({"id": "mic3", "kind": "mqtt", "model": "m", "topic": TOPIC} | kw))
        src = MqttAudioSource(cfg, fast_mqtt(broker), node="line1", password=None,
                              stall_after_s=stall_after_s)
        sink = Sink()
        src.start(sink.on_block, sink.on_window)
        made.append(src)
        wait_until(lambda: src.status()["connected"], what="source subscribed")
        return src, sink

    yield make
    for src in made:
        src.stop()


def test_stream_seq_gap_and_late_chunk(source_factory, sender):
    src, sink = source_factory(channels=2, select_channels=(1,))
    rng = np.random.default_rng(0)
    chunks = [(rng.integers(-20000, 20000, (1600, 2))).astype("<i2") for _ in range(6)]
    t0 = 1_700_000_000.0
    for seq in (0, 1, 2, 4, 3, 5):  # 3 is missing when 4 arrives, then comes late
        sender(chunks[seq].tobytes(), seq=seq, ts=t0 + 0.1 * seq)
    wait_until(lambda: src.status()["messages"] == 6, what="6 messages")
    assert [b.discontinuity for b in sink.blocks] == [False, False, False, True, False]
    assert [b.start_time_s for b in sink.blocks] == pytest.approx([t0 + 0.1 * s for s in (0, 1, 2, 4, 5)])
    for block, seq in zip(sink.blocks, (0, 1, 2, 4, 5)):
        assert block.source == "mic3" and block.samples.dtype == np.float32
        np.testing.assert_allclose(block.samples, chunks[seq][:, 1] / 32768.0, atol=1e-6)
    s = src.status()
    assert (s["gaps"], s["late"], s["blocks"], s["rejected"]) == (1, 1, 5, {})
    assert s["state"] == "running" and s["last_audio_age_s"] is not None


def test_stream_resamples_and_times_chunks_without_ts(source_factory, sender):
    src, sink = source_factory(rate_hz=48_000, format="f32le")
    x = (0.1 * np.sin(np.arange(4800) / 7.0)).astype("<f4")
    before_s = time.time()
    sender(x.tobytes())
    wait_until(lambda: sink.blocks, what="a block")
    block = sink.blocks[0]
    # 0.1 s at 16 kHz less the few samples the stream's resampler holds until the next chunk
    assert 1590 <= block.samples.shape[0] <= 1600
    from monitor.resample import resample_whole

    np.testing.assert_allclose(block.samples, resample_whole(x, 48_000, 16_000)[:block.samples.shape[0]],
                               atol=1e-6)
    assert block.discontinuity is False
    # no ts property: capture time is the arrival time minus the chunk's duration (0.1 s)
    assert before_s - 0.1 <= block.start_time_s + 1e-3 and block.start_time_s <= time.time() - 0.1


def test_bad_payloads_are_counted_and_the_source_goes_on(source_factory, sender):
    src, sink = source_factory(format="f32le", max_payload_bytes=8000)
    good = np.zeros(400, "<f4").tobytes()
    sender(good, seq=0)
    sender(b"\x00" * 7, seq=1)  # not whole samples
    sender(np.array([0.0, np.nan], "<f4").tobytes(), seq=2)
    sender(b"\x00" * 8004, seq=3)  # over max_payload_bytes
    sender(good, seq=4)
    sender(good, seq="x")  # unparseable seq property
    wait_until(lambda: src.status()["messages"] == 6, what="6 messages")
    s = src.status()
    assert s["rejected"] == {"partial_sample": 1, "non_finite": 1, "too_large": 1,
                             "bad_property": 1}
    assert [b.discontinuity for b in sink.blocks] == [False, True]


def test_window_mode_wav_clips(source_factory, sender):
    src, sink = source_factory(mode="window", window_s=2.0, hop_s=2.0, machine_id=3)
    stereo = np.stack([np.linspace(-0.5, 0.5, 32000 * 3), np.zeros(32000 * 3)], 1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, stereo, 32000, format="WAV", subtype="PCM_16")
    sender(b"not a wav file at all", ts=5.0)
    sender(buf.getvalue(), ts=1_700_000_000.0)
    wait_until(lambda: sink.windows, what="a window")
    w = sink.windows[0]
    assert w.samples.shape == (32000,) and w.samples.dtype == np.float32  # first 2 s at 16 kHz
    assert (w.source, w.start_time_s, w.duration_s, w.machine_id) == ("mic3", 1_700_000_000.0, 2.0, 3)
    assert src.status()["rejected"] == {"not_wav": 1} and sink.blocks == []


def test_stalled_when_no_audio_arrives(source_factory, sender):
    src, sink = source_factory(stall_after_s=0.3)
    wait_until(lambda: src.status()["state"] == "stalled", what="stalled")
    sender(np.zeros(160, "<i2").tobytes())
    wait_until(lambda: src.status()["state"] == "running", what="running again")


def test_messages_on_other_topics_are_never_heard(source_factory, sender):
    src, sink = source_factory()
    sender(np.zeros(160, "<i2").tobytes(), topic=TOPIC + "/extra")
    sender(np.zeros(160, "<i2").tobytes(), topic="factory/line1/other/pcm")
    sender(np.zeros(160, "<i2").tobytes())
    wait_until(lambda: src.status()["messages"] == 1, what="1 message")
    assert len(sink.blocks) == 1


@pytest.mark.parametrize("kw, match", [
    (dict(topic="factory/+/pcm"), "wildcards"),
    (dict(topic="factory/#"), "wildcards"),
    (dict(topic=None), "topic"),
    (dict(topic="a//b"), "empty topic level"),
    (dict(format="s24le"), "format"),
    (dict(mode="clip"), "mode"),
    (dict(rate_hz=96_000), "rate_hz"),
    (dict(channels=2, select_channels=(2,)), "select_channels"),
    (dict(id="mic/3"), "source id"),
])
def test_configuration_is_checked(kw, match):
    cfg = SourceConfig(**({"id": "mic3", "kind": "mqtt", "model": "m", "topic": TOPIC} | kw))
    with pytest.raises(UsageError, match=match):
        MqttAudioSource(cfg, MqttConfig(), node="line1", password=None)


def test_a_message_dropped_on_a_full_inbox_marks_the_next_queued_chunk():
    """Chunks without seq: 0..3 queued, 4-5 dropped (inbox full), 6 queued after the gap.
    Only chunk 0 (stream start) and chunk 6 may start a new stream; 1..3 are contiguous."""
    from types import SimpleNamespace

    cfg = SourceConfig(id="q", kind="mqtt", model="m", topic="rec/q", format="f32le")
    src = MqttAudioSource(cfg, MqttConfig(), node="line1", password=None, queue_max=4)
    src._broken = True  # as after connecting: the first block starts the stream

    def message(i):
        return SimpleNamespace(topic="rec/q", properties=None,
                               payload=np.full(160, i, "<f4").tobytes())

    for i in range(6):
        src._on_message(None, None, message(i))
    got = []
    src._on_block = got.append
    drained = 0
    while drained < 2:  # the worker takes two chunks, making room
        payload, props, arrival_s, broken_before = src._inbox.get_nowait()
        src._broken = src._broken or broken_before
        src._handle_chunk(payload, props, arrival_s)
        drained += 1
    src._on_message(None, None, message(6))
    while not src._inbox.empty():
        payload, props, arrival_s, broken_before = src._inbox.get_nowait()
        src._broken = src._broken or broken_before
        src._handle_chunk(payload, props, arrival_s)
    assert src.status()["dropped"] == 2
    assert [int(b.samples[0]) for b in got if b.discontinuity] == [0, 6]
