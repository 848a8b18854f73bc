"""Daemon throughput: how many real-time folder sources one machine scores without drops, and
the window-end-to-score latency. `harken bench --daemon` calls `search_sources`.

Sources replay synthetic 10-s clips with `speed: realtime` and a 10-s hop; `time_scale`
replays them that many times faster than real time so a short run covers many windows (the
figures then stand for `n_sources * time_scale` real-time sources' load).

A run "sustains" its load when no window is dropped and the p95 window-end-to-score latency
stays under the scaled hop (`hop_s / time_scale`): a worker slower than that only hides its
backlog in the queue during a short run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from monitor.daemon.app import Daemon
from monitor.daemon.config import AlarmConfig, DaemonConfig, EvidenceConfig, SourceConfig
from monitor.daemon.inference import percentile


class _CountingPublisher:
    def __init__(self):
        self.scores = 0

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def publish_score(self, score) -> None: self.scores += 1
    def publish_alarm_state(self, source, on) -> None: ...
    def publish_event(self, event) -> None: ...
    def publish_source_state(self, source, state) -> None: ...
    def publish_stats(self, stats) -> None: ...
    def status(self) -> dict: return {}


def _write_clips(folder: Path, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(10 * 16000)) / 16000
    for i in range(max(1, int(np.ceil(seconds / 10.0)))):
        x = 0.1 * np.sin(2 * np.pi * (120 + rng.uniform(-2, 2)) * t) + 0.01 * rng.standard_normal(t.shape)
        sf.write(folder / f"{i:05d}_normal_id_00.wav", x.astype(np.float32), 16000, subtype="PCM_16")


def run_daemon_bench(model: str | Path, n_sources: int, seconds: float, *, time_scale: float = 1.0,
                     hop_s: float = 10.0, device: str = "cpu", threads: int | None = None,
                     batch_max: int = 32, queue_max_windows: int = 64) -> dict:
    """Run the daemon in-process on n_sources real-time folder sources for `seconds` of wall
    time; returns windows produced/scored/dropped and latency p50/p95 (ms)."""
    audio_s = seconds * time_scale
    with tempfile.TemporaryDirectory(prefix="harken-daemon-bench-") as tmp:
        folder = Path(tmp) / "clips"
        _write_clips(folder, audio_s, seed=0)
        sources = tuple(SourceConfig(id=f"s{i}", kind="folder", model=str(model), path=str(folder),
                                     speed="realtime", hop_s=hop_s, time_scale=time_scale)
                        for i in range(n_sources))
        cfg = DaemonConfig(sources=sources, node="bench", device=device, threads=threads,
                           state_dir=str(Path(tmp) / "state"), batch_max=batch_max,
                           queue_max_windows=queue_max_windows, stats_interval_s=3600.0,
                           alarm=AlarmConfig(k=1, n=1, hold_s=0.0),
                           evidence=EvidenceConfig(enabled=False))
        daemon = Daemon(cfg, publisher=_CountingPublisher())
        t0 = time.monotonic()
        daemon.run()  # ends when every source has played its clips
        wall = time.monotonic() - t0
        w = daemon.worker
        assert w is not None
        return {"n_sources": n_sources, "time_scale": time_scale, "hop_s": hop_s,
                "equivalent_realtime_sources": n_sources * time_scale,
                "wall_s": round(wall, 2), "windows_produced": daemon.queue.produced,
                "windows_scored": w.scored, "windows_dropped": daemon.queue.dropped,
                "latency_ms_p50": percentile(w.latency_ms, 50),
                "latency_ms_p95": percentile(w.latency_ms, 95),
                "batch_ms_p50": percentile(w.batch_ms, 50), "batch_ms_p95": percentile(w.batch_ms, 95)}


def sustained(result: dict) -> bool:
    """No drops, everything produced was scored, and the worker kept pace with the scaled hop."""
    return (result["windows_dropped"] == 0 and result["windows_produced"] > 0
            and result["windows_scored"] >= result["windows_produced"]
            and result["latency_ms_p95"] is not None
            and result["latency_ms_p95"] <= 1000.0 * result["hop_s"] / result["time_scale"])


def build_bench_model(encoder: str, out: Path, weights: str | None = None,
                      device: str = "cpu") -> Path:
    """A small artifact trained on a few synthetic clips (knn scorer: no training loop).
    Scores are not the point; the daemon only needs something real to load and run."""
    from train.config import TrainConfig
    from train.fit import fit_model
    from train.synth import write_dataset

    data = out / "data"
    write_dataset(data, ids=(0,), n_train=6, n_test_normal=1, n_test_anomaly=1, seed=0,
                  progress=False)
    cfg = TrainConfig(encoder=encoder, scorers=("knn",), weights=weights,
                      embedding_cache="off").validate()
    fit_model(data, out / "model", cfg, device=device, progress=False)
    return out / "model"


def search_sources(model: str | Path, *, candidates: tuple[int, ...] | None = None,
                   seconds: float = 10.0, time_scale: float = 10.0, hop_s: float = 10.0,
                   budget_s: float = 300.0, max_sources: int = 256, device: str = "cpu",
                   threads: int | None = None, log=print) -> dict:
    """The largest N that `sustained` holds for: the given candidates, or doubling from 1 until
    it fails and then bisecting, stopping early when the time budget is spent."""
    runs: dict[int, dict] = {}
    t_end = time.monotonic() + budget_s

    def trial(n: int) -> bool:
        r = run_daemon_bench(model, n, seconds, time_scale=time_scale, hop_s=hop_s,
                             device=device, threads=threads)
        r["sustained"] = sustained(r)
        runs[n] = r
        log(f"  daemon {n:4d} sources x time_scale {time_scale:g} "
            f"(= {r['equivalent_realtime_sources']:g} real-time): produced {r['windows_produced']}, "
            f"dropped {r['windows_dropped']}, latency p50 {r['latency_ms_p50']} ms "
            f"p95 {r['latency_ms_p95']} ms -> {'ok' if r['sustained'] else 'NOT sustained'}")
        return r["sustained"]

    def budget_left() -> bool:
        return time.monotonic() < t_end

    if candidates:
        for n in sorted(candidates):
            if not budget_left():
                break
            trial(n)
    else:
        good, bad, n = 0, None, 1
        while budget_left() and n <= max_sources:
            if trial(n):
                good, n = n, n * 2
            else:
                bad = n
                break
        while bad is not None and bad - good > 1 and budget_left():
            mid = (good + bad) // 2
            if trial(mid):
                good = mid
            else:
                bad = mid
    ok = [n for n, r in runs.items() if r["sustained"]]
    best = max(ok) if ok else 0
    at = runs.get(best)
    return {"max_sources": best, "time_scale": time_scale, "hop_s": hop_s,
            "max_equivalent_realtime_sources": best * time_scale,
            "latency_ms_p50": at["latency_ms_p50"] if at else None,
            "latency_ms_p95": at["latency_ms_p95"] if at else None,
            "budget_exhausted": not budget_left(),
            "runs": [runs[n] for n in sorted(runs)]}


def main() -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--sources", default="1,2,4,8")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--time-scale", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    for n in (int(x) for x in args.sources.split(",")):
        print(json.dumps(run_daemon_bench(args.model, n, args.seconds, time_scale=args.time_scale,
                                          threads=args.threads)), flush=True)


if __name__ == "__main__":
    main()
