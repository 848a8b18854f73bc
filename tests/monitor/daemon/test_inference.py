"""Inference worker: batching across sources, drop-oldest accounting when it falls behind."""

import time

import numpy as np

from monitor.daemon.inference import InferenceWorker, WindowQueue
from monitor.daemon.types import Window


class SlowDetector:
    """Sleeps per batch like a model too slow for the audio rate; score = first sample."""

    name = "slow"
    threshold = 0.5

    def __init__(self, seconds_per_batch=0.0, per_id=None):
        self.seconds = seconds_per_batch
        self.batches: list[int] = []
        self.per_id = per_id or {}

    def threshold_for(self, machine_id):
        return self.per_id.get(machine_id, self.threshold)

    def score_windows(self, windows, machine_ids=None):
        self.batches.append(len(windows))
        time.sleep(self.seconds)
        return windows[:, 0].astype(np.float64)


def window(source, i):
    return Window(source, np.full(160, float(i), np.float32), 1000.0 + i, 0.01, time.monotonic())


def test_queue_drops_the_oldest_and_counts():
    q = WindowQueue(3)
    for i in range(5):
        q.put_nowait("m", window("a", i))
    assert q.produced == 5 and q.dropped == 2 and q.dropped_by_source == {"a": 2}
    batch = q.take_batch(10, timeout_s=0)
    assert [w.start_time_s for _, w in batch] == [1002.0, 1003.0, 1004.0]


def test_sources_sharing_a_model_are_scored_in_one_batch():
    q = WindowQueue(100)
    shared, other = SlowDetector(), SlowDetector()
    for i in range(6):
        q.put_nowait("m1", window("a", i))
        q.put_nowait("m1", window("b", i))
        q.put_nowait("m2", window("c", i))
    got = []
    worker = InferenceWorker(q, {"m1": shared, "m2": other}, on_scored=got.append, batch_max=9)
    worker.stop_when_drained()
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert len(got) == 18 and worker.scored == 18
    assert max(shared.batches) > 1 and sum(shared.batches) == 12 and sum(other.batches) == 6
    assert all(n <= 9 for n in shared.batches + other.batches)
    by_source = {}
    for sw in got:  # per source, scores come out in capture order
        by_source.setdefault(sw.window.source, []).append(sw.window.start_time_s)
    assert all(ts == sorted(ts) for ts in by_source.values())
    assert {sw.model_name for sw in got} == {"slow"}


def test_a_slow_model_drops_windows_and_every_window_is_accounted_for():
    q = WindowQueue(4)
    det = SlowDetector(seconds_per_batch=0.02)
    scored = []
    worker = InferenceWorker(q, {"m": det}, on_scored=scored.append, batch_max=2)
    worker.start()
    produced = 200
    for i in range(produced):  # producers never block, however slow the worker is
        q.put_nowait("m", window("a", i))
        if i % 50 == 0:
            time.sleep(0.01)
    worker.stop_when_drained()
    worker.join(timeout=60)
    assert q.produced == produced
    assert q.dropped > 0
    assert q.dropped + worker.scored == produced
    assert len(scored) == worker.scored
    # what survives is the newest audio
    assert scored[-1].window.start_time_s == 1000.0 + produced - 1


def test_a_failing_batch_is_counted_and_the_worker_goes_on():
    class Broken(SlowDetector):
        def score_windows(self, windows, machine_ids=None):
            if windows[0, 0] == 0:
                raise RuntimeError("boom")
            return super().score_windows(windows, machine_ids)

    q = WindowQueue(10)
    q.put_nowait("m", window("a", 0))
    got = []
    worker = InferenceWorker(q, {"m": Broken()}, on_scored=got.append, batch_max=1)
    worker.start()
    deadline = time.monotonic() + 30
    while worker.failed == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    q.put_nowait("m", window("a", 1))
    worker.stop_when_drained()
    worker.join(timeout=30)
    assert worker.failed == 1 and worker.scored == 1 and got[0].score == 1.0


def test_each_window_gets_its_machine_ids_threshold_unless_the_source_overrides_it():
    q = WindowQueue(10)
    for source, mid in (("a", 0), ("b", 1), ("c", None), ("d", 1)):
        q.put_nowait("m", Window(source, np.zeros(160, np.float32), 1000.0, 0.01, time.monotonic(),
                                 machine_id=mid))
    got = []
    worker = InferenceWorker(q, {"m": SlowDetector(per_id={0: 0.1, 1: 0.9})}, on_scored=got.append,
                             threshold_overrides={"d": 2.0})
    worker.stop_when_drained()
    worker.start()
    worker.join(timeout=30)
    assert {sw.window.source: sw.threshold for sw in got} == {"a": 0.1, "b": 0.9, "c": 0.5, "d": 2.0}


def test_put_wait_blocks_while_full_and_loses_nothing():
    import threading

    q = WindowQueue(2)
    stop = threading.Event()
    put = threading.Thread(target=lambda: [q.put_wait("m", window("a", i), stop) for i in range(6)])
    put.start()
    got = []
    while len(got) < 6:
        got += [w.start_time_s for _, w in q.take_batch(1, timeout_s=1.0)]
    put.join(timeout=10)
    assert got == [1000.0 + i for i in range(6)] and q.dropped == 0
    stop.set()  # once stopping, a full queue drops again instead of blocking shutdown
    for i in range(4):
        q.put_wait("m", window("a", i), stop)
    assert q.dropped == 2


def test_a_failing_publish_loses_only_its_own_window():
    q = WindowQueue(10)
    for i in range(4):
        q.put_nowait("m", window("a", i))
    got = []

    def on_scored(sw):
        if sw.window.start_time_s == 1001.0:
            raise RuntimeError("broker client exploded")
        got.append(sw.window.start_time_s)

    worker = InferenceWorker(q, {"m": SlowDetector()}, on_scored=on_scored, batch_max=4)
    worker.stop_when_drained()
    worker.start()
    worker.join(timeout=30)
    assert got == [1000.0, 1002.0, 1003.0]
    assert worker.scored == 4 and worker.publish_failed == 1 and worker.failed == 0
