"""Alarm benchmark (issue 13): false alarms in long healthy streams, detection delay of faults.

    python -m train.alarm_bench --out bench-alarms [--seed 0] [--hours 6] [--plot tradeoff.png]

1. `harken synth` data at -6 dB, 3 machine IDs, 60 training clips each; `harken train` on it
   (the default stats encoder, calibrated tail).
2. `--hours` of healthy audio per ID, rendered in memory as 10-s clips the model never saw,
   played as one stream per ID.
3. Faulty streams: per ID, fault type and severity (5 severities in [0.5, 1]): 60 s healthy,
   then 120 s of the fault.
Everything goes through the daemon's threshold resolution and AlarmStateMachine
(train/stream_eval.py). Prints the figures at the default budget, and for the default rule per
fault type and severity, with the window AUC that bounds what any rule can do (JSON with
--json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from monitor.daemon.config import AlarmConfig
from monitor.daemon.thresholds import effective_rule, resolve_for_detector
from train.commands import fault_lines
from train.stream_eval import StreamScores, stream_figures, sweep, write_tradeoff

IDS = (0, 1, 2)
SNR_DB = -6.0
LEAD_IN_CLIPS = 6
FAULT_CLIPS = 12
SEVERITIES = (0.5, 0.625, 0.75, 0.875, 1.0)
BATCH = 64
# the daemon's rules at their default settings, and the ewma without its score cap (what the
# cap buys: monitor/daemon/rules.py)
RULES = {"kofn": AlarmConfig(rule="kofn"), "ewma": AlarmConfig(rule="ewma"),
         "cusum": AlarmConfig(rule="cusum"),
         "ewma_uncapped": AlarmConfig(rule="ewma", score_cap=None)}


def _score_clips(detector, clips, machine_id: int) -> np.ndarray:
    out = []
    for i in range(0, len(clips), BATCH):
        batch = np.stack(clips[i:i + BATCH])
        out.append(detector.score_windows(batch, [machine_id] * len(batch)))
    return np.concatenate(out) if out else np.zeros(0)


def build_model(out: Path, seed: int, progress: bool = True) -> tuple[Path, Path]:
    """The benchmark's training set and model (kept in `out`; reused when there)."""
    from train.config import TrainConfig
    from train.fit import fit_model
    from train.synth import write_dataset

    data, model = out / f"data-seed{seed}", out / f"model-seed{seed}"
    if not (model / "manifest.json").is_file():
        if data.exists():
            shutil.rmtree(data)  # this benchmark's own folder, from an interrupted run
        write_dataset(data, ids=IDS, n_train=60, n_test_normal=0, n_test_anomaly=0,
                      snr_db=SNR_DB, seed=seed, progress=progress)
        fit_model(data, model, TrainConfig(seed=seed), device="cpu", progress=progress)
    return data, model


def healthy_clips(seed: int, hours: float, progress: bool = True):
    """Per machine ID: (ID, batches of healthy clips the model never saw), rendered lazily, one
    batch in memory at a time."""
    from train.synth import MachineParams, clip_seed, render_clip

    n_clips = int(round(hours * 360))
    for mid in IDS:
        params = MachineParams.for_id(mid, seed)

        def batches(mid=mid, params=params):
            chunk = []
            for i in tqdm(range(n_clips), desc=f"healthy id {mid:02d}", unit="clip",
                          disable=not progress, leave=False):
                rng = np.random.default_rng(clip_seed(seed, mid, "test_normal", 100_000 + i))
                chunk.append(render_clip(params, rng=rng, snr_db=SNR_DB))
                if len(chunk) == BATCH:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        yield mid, batches()


def fault_clips(seed: int):
    """(ID, fault, severity, clips) per faulty stream: LEAD_IN_CLIPS healthy, then the fault."""
    from train.synth import FAULTS, MachineParams, clip_seed, render_clip

    for mid in IDS:
        params = MachineParams.for_id(mid, seed)
        for f_i, fault in enumerate(FAULTS):
            for s_i, sev in enumerate(SEVERITIES):
                clips = []
                for c in range(LEAD_IN_CLIPS + FAULT_CLIPS):
                    rng = np.random.default_rng(clip_seed(seed, mid, "test_anomaly",
                                                          200_000 + (f_i * 10 + s_i) * 100 + c))
                    is_fault = c >= LEAD_IN_CLIPS
                    clips.append(render_clip(params, fault if is_fault else None,
                                             sev if is_fault else 0.0, rng=rng, snr_db=SNR_DB))
                yield mid, fault, sev, clips


def run(out: Path, *, seed: int, hours: float, progress: bool = True) -> tuple[dict, object]:
    from monitor.detector import Detector

    t0 = time.monotonic()
    data, model = build_model(out, seed, progress)
    detector = Detector.load(model, device="cpu")
    normal = []
    for mid, batches in healthy_clips(seed, hours, progress=progress):
        s = np.concatenate([detector.score_windows(np.stack(b), [mid] * len(b)) for b in batches]
                           or [np.zeros(0)])
        normal.append(StreamScores(f"normal-{mid:02d}", mid, np.arange(len(s)) * 10.0, s, 10.0,
                                   len(s) * 10.0))
    faulty = []
    for mid, fault, sev, clips in fault_clips(seed):
        s = _score_clips(detector, clips, mid)
        faulty.append(StreamScores(f"{fault}-{sev:g}-id{mid:02d}", mid, np.arange(len(s)) * 10.0,
                                   s, 10.0, len(s) * 10.0, LEAD_IN_CLIPS * 10.0, fault, sev))
    alarm = AlarmConfig()

    def resolve_at(a):
        return lambda mid: resolve_for_detector(detector, a, hop_s=10.0, machine_id=mid)

    result = {"seed": seed, "hours_per_id": hours, "ids": list(IDS), "snr_db": SNR_DB,
              "model": str(model), "calibration": (detector.manifest.calibration or {}).get("known_id")}
    result["default_rule"] = effective_rule(alarm, detector.calibration is not None)
    for name, a in RULES.items():
        result[name] = stream_figures(normal, faulty, resolve_at(a), a.hold_s)
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result, (normal, faulty, alarm, resolve_at, detector.name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.alarm_bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="working directory (data sets, models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hours", type=float, default=6.0, help="healthy hours per machine ID")
    p.add_argument("--plot", default=None, help="write the budget vs delay plot (PNG) here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    result, (normal, faulty, alarm, resolve_at, name) = run(
        Path(args.out), seed=args.seed, hours=args.hours, progress=not args.quiet)
    if args.plot:
        result["plot"] = str(write_tradeoff(Path(args.plot), sweep(normal, faulty, alarm, resolve_at),
                                            f"{name}, synth -6 dB, seed {args.seed}"))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"seed {args.seed}: {result['hours_per_id']:g} h healthy x {len(IDS)} IDs, "
          f"{len(faulty)} faulty streams (severity 0.5-1), {result['seconds']} s")
    for rule in RULES:
        r = result[rule]
        mark = " (default)" if rule == result["default_rule"] else ""
        print(f"  {rule}{mark}: false alarm episodes {r['false_alarm_episodes']} in "
              f"{r['normal_hours']:g} h (expected {r['expected_false_alarms_per_day'] * r['normal_hours'] / 24:.2f}; "
              f"{r['observed_false_alarms_per_day']:.3f}/day observed vs "
              f"{r['expected_false_alarms_per_day']:.3f}/day expected); window FPR {r['window_fpr']:.5f} "
              f"TPR {r['window_tpr']:.3f}; faulty streams alarmed within 60 s: "
              f"{100 * r['streams_alarmed_within_60s']:.1f}% (any time {100 * r['streams_alarmed']:.1f}%), "
              f"median delay {r['delay_s_median']} s, p90 {r['delay_s_p90']} s")
    print(f"  by fault type and severity ({result['default_rule']}, the default rule):")
    for line in fault_lines(result[result["default_rule"]]["per_fault"]):
        print("    " + line)
    if args.plot:
        print(f"  plot: {result['plot']}")
    return 0


if __name__ == "__main__":
    from monitor.errors import run_script

    run_script(main, "python -m train.alarm_bench")
