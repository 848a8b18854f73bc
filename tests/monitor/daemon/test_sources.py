"""Folder and mic sources: real WAV files on disk, a fake PortAudio stream, no sound card."""

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from monitor.audio import split_windows
from monitor.daemon.config import SourceConfig
from monitor.daemon.folder import FolderSource
from monitor.daemon.mic import MicSource, find_input_device
from monitor.errors import UsageError
from tests.helpers import tone_clip
from tests.monitor.daemon.conftest import FakeStream

RATE = 16_000


def collect(source):
    blocks, windows = [], []
    source.start(blocks.append, windows.append)
    return blocks, windows


def wait_finished(source):
    source._thread.join(timeout=60)
    assert source.finished


@pytest.fixture()
def clips(tmp_path):
    """Three files: 26 s (two windows + a tail over half a window), 4 s (padded), 10 s."""
    rng = np.random.default_rng(7)
    d = tmp_path / "clips"
    d.mkdir()
    lengths = {"b_normal_id_00_1.wav": 26.0, "a_normal_id_01_0.wav": 4.0, "c_anomaly_id_00_2.wav": 10.0}
    audio = {}
    for name, seconds in lengths.items():
        x = tone_clip(rng, 0, "anomaly" in name, seconds=seconds)
        sf.write(d / name, x, RATE, subtype="FLOAT")
        audio[name] = x
    return d, audio


def test_folder_max_speed_cuts_files_like_replay(clips):
    d, audio = clips
    src = FolderSource(SourceConfig(id="f", kind="folder", model="m", path=str(d), hop_s=10.0),
                       wall=lambda: 5000.0)
    _, windows = collect(src)
    wait_finished(src)
    names = [Path(w.label).name for w in windows]
    assert names == ["a_normal_id_01_0.wav"] + ["b_normal_id_00_1.wav"] * 3 + ["c_anomaly_id_00_2.wav"]
    expected = np.concatenate([split_windows(audio[n]) for n in sorted(audio)])
    np.testing.assert_array_equal(np.stack([w.samples for w in windows]), expected)
    # files laid end to end on the audio timeline: the 4-s file counts as one padded window
    assert [w.start_time_s for w in windows] == [5000.0, 5010.0, 5020.0, 5026.0, 5036.0]
    assert [w.machine_id for w in windows] == [1, 0, 0, 0, 0]
    assert src.status()["state"] == "ended" and src.waits_s == []


def test_folder_realtime_paces_windows_on_an_injected_clock(clips):
    d, _ = clips
    clock = SimpleNamespace(now=100.0)

    def wait(seconds):
        clock.now += seconds
        return False

    cfg = SourceConfig(id="f", kind="folder", model="m", path=str(d), speed="realtime", hop_s=5.0)
    src = FolderSource(cfg, clock=lambda: clock.now, wall=lambda: 5000.0 + clock.now, wait=wait)
    _, windows = collect(src)
    wait_finished(src)
    # 4-s file: ready at 10 s (padded window); 26-s file: windows end at 10, 15, 20, 25 s;
    # 10-s file: 10 s. Each wait is measured from the file's own start.
    assert src.waits_s == pytest.approx([10.0, 10.0, 5.0, 5.0, 5.0, 10.0])
    assert [w.ready_mono_s - 100.0 for w in windows] == pytest.approx([10, 20, 25, 30, 35, 45])
    fast = FolderSource(SourceConfig(id="f", kind="folder", model="m", path=str(d), speed="realtime",
                                     hop_s=5.0, time_scale=10.0),
                        clock=lambda: clock.now, wall=lambda: 0.0, wait=wait)
    collect(fast)
    wait_finished(fast)
    assert fast.waits_s == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.5, 1.0])


def test_folder_watch_takes_only_files_whose_size_held(tmp_path):
    d = tmp_path / "drop"
    d.mkdir()
    src = FolderSource(SourceConfig(id="f", kind="folder", model="m", path=str(d), watch=True))
    rng = np.random.default_rng(0)
    sf.write(d / "001.wav", tone_clip(rng, 0, False), RATE)
    assert src._ready_files() == []  # first sight: size not yet known to be stable
    with open(d / "002.wav", "wb") as f:
        f.write(b"RIFF")  # a recorder still writing
    assert [p.name for p in src._ready_files()] == ["001.wav"]
    with open(d / "002.wav", "ab") as f:
        f.write(b"\0" * 100)
    src._done.add(d / "001.wav")
    assert src._ready_files() == []  # 002 grew since the last poll
    assert [p.name for p in src._ready_files()] == ["002.wav"]


def test_folder_watch_plays_new_files_until_stopped(tmp_path):
    d = tmp_path / "drop"
    d.mkdir()
    src = FolderSource(SourceConfig(id="f", kind="folder", model="m", path=str(d), watch=True,
                                    poll_s=0.01))
    _, windows = collect(src)
    sf.write(d / "001.wav", tone_clip(np.random.default_rng(0), 0, False), RATE)
    for _ in range(3000):
        if windows:
            break
        src._stop.wait(0.01)
    src.stop()
    assert len(windows) == 1 and not src.finished and src.status()["state"] == "running"


def test_a_watched_folder_stamps_each_file_when_it_was_recorded(tmp_path):
    """Files dropped an hour apart are an hour apart on the timeline, not end to end."""
    d = tmp_path / "drop"
    d.mkdir()
    clip = tone_clip(np.random.default_rng(0), 0, False)
    for i, written in enumerate((1_000_000.0, 1_003_600.0)):
        sf.write(d / f"{i:03d}.wav", clip, RATE)
        os.utime(d / f"{i:03d}.wav", (written, written))
    src = FolderSource(SourceConfig(id="f", kind="folder", model="m", path=str(d), watch=True,
                                    poll_s=0.01))
    _, windows = collect(src)
    for _ in range(3000):
        if len(windows) == 2:
            break
        src._stop.wait(0.01)
    src.stop()
    assert [w.start_time_s for w in windows] == pytest.approx([999_990.0, 1_003_590.0])


def test_folder_source_scores_equal_harken_replay_scores(tone_data, tiny_model, tmp_path):
    from monitor.daemon.app import Daemon
    from monitor.daemon.config import DaemonConfig
    from monitor.replay import replay
    from monitor.detector import Detector

    class Memory:
        def __init__(self):
            self.scores = []

        def start(self): ...
        def stop(self): ...
        def publish_score(self, s): self.scores.append(s)
        def publish_alarm_state(self, *a): ...
        def publish_event(self, e): ...
        def publish_source_state(self, *a): ...
        def publish_stats(self, s): ...
        def status(self): return {}

    # a long file with a tail and a short one, next to the fixture's 10-s clips
    d = tmp_path / "mixed"
    d.mkdir()
    for p in sorted((tone_data / "test").glob("*.wav"))[:6]:
        os.symlink(p, d / p.name)
    rng = np.random.default_rng(3)
    sf.write(d / "zz_normal_id_00_long.wav", tone_clip(rng, 0, False, seconds=27.0), RATE)
    sf.write(d / "zz_normal_id_01_short.wav", tone_clip(rng, 1, False, seconds=3.0), RATE)

    out = io.StringIO()
    replay(Detector.load(tiny_model, device="cpu"), d, out, hop_s=5.0)
    expected = [json.loads(line) for line in out.getvalue().splitlines()]

    pub = Memory()
    cfg = DaemonConfig(sources=(SourceConfig(id="f", kind="folder", model=str(tiny_model),
                                             path=str(d), hop_s=5.0),),
                       node="t", device="cpu", state_dir=str(tmp_path / "state"))
    Daemon(cfg, publisher=pub).run()
    assert [Path(s.label).name for s in pub.scores] == [Path(r["file"]).name for r in expected]
    # Equal up to float rounding: the daemon batches whatever is queued, replay 16 at a time,
    # and a matrix product of another batch size may round differently in the last bits.
    assert [s.score for s in pub.scores] == pytest.approx([r["score"] for r in expected], rel=1e-5)
    assert len(expected) == 6 + 4 + 1  # 27 s at a 5-s hop: 0, 5, 10, 15; 3 s: one padded


# --------------------------------------------------------------------------- mic


def test_mic_with_no_sound_card_names_the_device_and_keeps_retrying():
    import sounddevice

    assert len(sounddevice.query_devices()) == 0  # this machine has none; the test relies on it
    src = MicSource(SourceConfig(id="pump1", kind="mic", model="m", device="USB Audio"),
                    reopen_backoff_s=(0.05, 0.1))
    src.start(lambda b: None, lambda w: None)  # no exit: the device may appear later
    try:
        st = src.status()
        assert st["state"] == "stalled"
        assert "pump1" in st["last_error"] and "USB Audio" in st["last_error"]
        assert "no audio input devices" in st["last_error"]
        for _ in range(500):  # a few retries (real PortAudio re-scans in between)
            if src.reopen_failures >= 2:
                break
            src._stop.wait(0.01)
        assert src.reopen_failures >= 2 and src.status()["state"] == "stalled"
    finally:
        src.stop()


def test_a_mic_missing_at_start_is_opened_once_it_appears():
    """USB sound cards often appear after harken has started at boot."""
    present = {"now": False}
    streams = []

    def query():
        return DEVICES if present["now"] else [DEVICES[1]]  # HDMI only: no input yet

    def factory(**kw):
        streams.append(FakeStream(**kw))
        return streams[-1]

    src = MicSource(SourceConfig(id="m", kind="mic", model="m", device="USB Audio"),
                    query_devices=query, stream_factory=factory, reopen_backoff_s=(0.02, 0.05))
    blocks = []
    src.start(blocks.append, lambda w: None)
    try:
        assert src.status()["state"] == "stalled" and streams == []
        for _ in range(300):
            if src.reopen_failures >= 2:
                break
            src._stop.wait(0.01)
        present["now"] = True
        for _ in range(500):
            if streams:
                break
            src._stop.wait(0.01)
        assert streams and streams[0].kwargs["device"] == 2  # found by name once it appeared
        assert src.status()["state"] == "running" and src.status()["last_error"] is None
        streams[0].callback(np.zeros((1600, 1), np.float32), 1600,
                            SimpleNamespace(inputBufferAdcTime=0.0), None)
        for _ in range(500):
            if blocks:
                break
            src._stop.wait(0.01)
        assert len(blocks) == 1 and blocks[0].discontinuity
    finally:
        src.stop()


DEVICES = [{"name": "HDA Intel PCH: ALC3246 Analog (hw:0,0)", "max_input_channels": 2},
           {"name": "HDMI 0", "max_input_channels": 0},
           {"name": "USB Audio Device: - (hw:2,0)", "max_input_channels": 1}]


def test_mic_device_lookup_by_name_or_index():
    assert find_input_device("usb", DEVICES, source="m") == 2
    assert find_input_device(0, DEVICES, source="m") == 0
    assert find_input_device(None, DEVICES, source="m") is None
    with pytest.raises(UsageError, match="'HDMI' not found"):
        find_input_device("HDMI", DEVICES, source="m")
    with pytest.raises(UsageError, match="1 is not an input device"):
        find_input_device(1, DEVICES, source="m")
    with pytest.raises(UsageError, match="ambiguous"):
        find_input_device("hw:", DEVICES, source="m")


def test_mic_source_copies_mixes_and_timestamps_blocks_from_a_fake_stream():
    streams = []

    def factory(**kw):
        streams.append(FakeStream(**kw))
        return streams[-1]

    cfg = SourceConfig(id="m", kind="mic", model="m", device="ALC", channels=2, select_channels=(1,),
                       rate_hz=16000)
    src = MicSource(cfg, query_devices=lambda: DEVICES, stream_factory=factory, wall=lambda: 1000.0)
    blocks = []
    src.start(blocks.append, lambda w: None)
    stream = streams[0]
    assert stream.kwargs["device"] == 0 and stream.kwargs["channels"] == 2
    assert stream.kwargs["samplerate"] == 16000
    frames = 1600
    data = np.zeros((frames, 2), np.float32)
    data[:, 1] = np.linspace(-0.5, 0.5, frames)
    for i in range(3):
        stream.callback(data, frames, SimpleNamespace(inputBufferAdcTime=51.0 + i * 0.1),
                        SimpleNamespace(input_overflow=i == 2))
    data[:] = 9.0  # the callback copied: later changes to PortAudio's buffer do not leak
    for _ in range(1000):
        if len(blocks) == 3:
            break
        src._stop.wait(0.01)
    src.stop()
    assert len(blocks) == 3
    np.testing.assert_array_equal(blocks[0].samples, np.linspace(-0.5, 0.5, frames, dtype=np.float32))
    # stream time 51.0 maps onto the wall clock through the offset taken at open (1000 - 50)
    assert [b.start_time_s for b in blocks] == pytest.approx([1001.0, 1001.1, 1001.2])
    assert [b.discontinuity for b in blocks] == [True, False, True]  # start, ok, overflow
    assert src.overruns == 1 and src.status()["blocks"] == 3


def test_mic_callback_overrun_when_the_reader_falls_behind():
    src = MicSource(SourceConfig(id="m", kind="mic", model="m"), query_devices=lambda: DEVICES,
                    stream_factory=FakeStream)
    data = np.zeros((160, 1), np.float32)
    for _ in range(150):  # reader not started: the queue (100 blocks) fills up
        src._callback(data, 160, SimpleNamespace(inputBufferAdcTime=0.0), None)
    assert src.overruns == 50


def test_a_block_dropped_in_the_callback_marks_the_next_delivered_block_not_an_older_one():
    """The queue holds contiguous blocks 0..99; blocks 100-101 are dropped; block 102 follows
    the gap and must start a new stream, blocks 1..99 must not."""
    src = MicSource(SourceConfig(id="m", kind="mic", model="m"), query_devices=lambda: DEVICES,
                    stream_factory=FakeStream)
    for i in range(102):  # reader not started yet: the queue (100 blocks) fills up
        src._callback(np.full((160, 1), i, np.float32), 160, SimpleNamespace(inputBufferAdcTime=0.0), None)
    delivered = []
    src._on_block = delivered.append
    for _ in range(50):  # the reader drains half, making room
        data, adc, overflow, gap_before = src._blocks.get_nowait()
        src._gap = src._gap or overflow or gap_before
        src._deliver(data, adc)
    src._callback(np.full((160, 1), 102, np.float32), 160, SimpleNamespace(inputBufferAdcTime=0.0), None)
    while not src._blocks.empty():
        data, adc, overflow, gap_before = src._blocks.get_nowait()
        src._gap = src._gap or overflow or gap_before
        src._deliver(data, adc)
    marked = [int(b.samples[0] * 1) for b in delivered if b.discontinuity]
    assert src.overruns == 2
    assert marked == [0, 102], marked
