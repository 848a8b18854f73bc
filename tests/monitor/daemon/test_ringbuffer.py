"""Ring buffer: windows and scores do not depend on how the audio was chunked."""

import numpy as np
import pytest

from monitor.daemon.ringbuffer import RingBuffer
from monitor.daemon.types import AudioBlock
from tests.helpers import tone_clip

RATE = 16_000
T0 = 1_700_000_000.0


def push_in_chunks(ring, audio, chunk, t0=T0):
    windows = []
    for off in range(0, len(audio), chunk):
        windows += ring.push(AudioBlock("s", audio[off:off + chunk], t0 + off / RATE))
    return windows


@pytest.fixture(scope="module")
def audio():
    rng = np.random.default_rng(1)
    return np.concatenate([tone_clip(rng, 0, False, seconds=7.0), tone_clip(rng, 0, True, seconds=6.0)])


def test_chunk_size_invariance_of_windows_and_scores(audio, tiny_model):
    from monitor.detector import Detector

    det = Detector.load(tiny_model, device="cpu")
    runs = {}
    for chunk in (1, 37, 16_000):
        ring = RingBuffer("s", window_s=10.0, hop_s=1.0)
        runs[chunk] = push_in_chunks(ring, audio, chunk)
    ref = runs[16_000]
    assert len(ref) == 4  # 13 s of audio, 10-s windows every 1 s
    ref_scores = det.score_windows(np.stack([w.samples for w in ref]))
    for chunk, wins in runs.items():
        assert [w.start_time_s for w in wins] == [w.start_time_s for w in ref], chunk
        for a, b in zip(wins, ref):
            np.testing.assert_array_equal(a.samples, b.samples)
        np.testing.assert_array_equal(det.score_windows(np.stack([w.samples for w in wins])), ref_scores)
    # the last window holds the anomalous tail, which the model notices
    assert ref_scores[-1] > ref_scores[0]


def test_hop_one_second_windows_and_first_sample_timestamps(audio):
    ring = RingBuffer("s", window_s=10.0, hop_s=1.0)
    wins = push_in_chunks(ring, audio, 4_000)
    assert [w.start_time_s for w in wins] == [T0 + i for i in range(4)]
    for i, w in enumerate(wins):
        np.testing.assert_array_equal(w.samples, audio[i * RATE:i * RATE + 10 * RATE])
        assert w.duration_s == 10.0 and w.end_time_s == T0 + i + 10.0
    # non-overlapping default hop: one window per 10 s, leftovers wait for more audio
    ring10 = RingBuffer("s", window_s=10.0, hop_s=10.0)
    assert len(push_in_chunks(ring10, audio, 3_000)) == 1
    more = ring10.push(AudioBlock("s", np.zeros(7 * RATE, np.float32), T0 + 13.0))
    assert len(more) == 1 and more[0].start_time_s == T0 + 10.0
    np.testing.assert_array_equal(more[0].samples[:3 * RATE], audio[10 * RATE:])


def test_discontinuity_resets_so_no_window_spans_a_gap(audio):
    ring = RingBuffer("s", window_s=10.0, hop_s=1.0)
    assert ring.push(AudioBlock("s", audio[:9 * RATE], T0)) == []
    later = T0 + 100.0
    wins = ring.push(AudioBlock("s", audio[:11 * RATE], later, discontinuity=True))
    assert ring.resets == 1
    assert [w.start_time_s for w in wins] == [later, later + 1.0]
    np.testing.assert_array_equal(wins[0].samples, audio[:10 * RATE])
    # a continuing block (no flag) carries on from where the stream is
    cont = ring.push(AudioBlock("s", audio[11 * RATE:12 * RATE], later + 11.0))
    assert [w.start_time_s for w in cont] == [later + 2.0]


def test_bad_hop_and_shape_are_refused():
    with pytest.raises(ValueError):
        RingBuffer("s", window_s=10.0, hop_s=11.0)
    with pytest.raises(ValueError):
        RingBuffer("s").push(AudioBlock("s", np.zeros((10, 2), np.float32), T0))
