"""The segment design check's helpers (bench/segment_check.py)."""

from __future__ import annotations

import numpy as np

from bench.segment_check import random_segments, sliding_means


def test_sliding_means_are_the_means_of_each_run_of_consecutive_windows():
    v = np.arange(20, dtype=float).reshape(10, 2)
    m = sliding_means(v, 3)
    assert m.shape == (8, 2)
    for i in range(8):
        assert np.allclose(m[i], v[i:i + 3].mean(axis=0))
    assert sliding_means(v[:2], 3).shape == (0, 2)


def test_random_segments_average_distinct_rows():
    v = np.eye(6)  # a mean of distinct rows has n entries of 1/n; a repeat would show as 2/n
    segs = random_segments(v, 3, 200, np.random.default_rng(0))
    assert segs.shape == (200, 6)
    assert np.allclose(np.sort(segs, axis=1)[:, -3:], 1 / 3) and np.allclose(segs.sum(axis=1), 1)
    assert len({tuple(np.flatnonzero(s)) for s in segs}) > 10
