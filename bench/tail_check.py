"""How well 180 normal scores predict a one-a-week threshold (issue 13's calibration check).

    python -m bench.tail_check --model bench-alarms/model-seed2 --seed 2 [--clips 600]

Scores `--clips` unseen healthy synthetic clips per machine ID (the seed's machines, as
`train.alarm_bench` renders them), fits the GPD tail to all of them and to 200 random
180-score subsamples, and prints how often a subsample's threshold at a per-window exceedance
of 0.3 % falls below the one the whole sample shows.
"""

from __future__ import annotations

import argparse

import numpy as np

from monitor.calibration import ScoreTail, fit_gpd_pwm

IDS = (0, 1, 2)
P_WINDOW = 0.003
SUBSAMPLE = 180


def main(argv=None) -> int:
    from monitor.detector import Detector
    from train.synth import MachineParams, clip_seed, render_clip

    p = argparse.ArgumentParser(prog="python -m bench.tail_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--seed", type=int, required=True, help="the seed the model was trained with")
    p.add_argument("--clips", type=int, default=600, help="unseen healthy clips per machine ID")
    args = p.parse_args(argv)
    det = Detector.load(args.model, device="cpu")
    scores = []
    for mid in IDS:
        params = MachineParams.for_id(mid, args.seed)
        clips = [render_clip(params, rng=np.random.default_rng(
            clip_seed(args.seed, mid, "test_normal", 100_000 + i)), snr_db=-6.0)
            for i in range(args.clips)]
        for i in range(0, len(clips), 60):
            batch = np.stack(clips[i:i + 60])
            scores.append(det.score_windows(batch, [mid] * len(batch)))
    s = np.concatenate(scores)
    u = np.quantile(s, 0.9)
    xi, sigma = fit_gpd_pwm(s[s > u] - u)
    truth = float(np.quantile(s, 1 - P_WINDOW))
    rng = np.random.default_rng(0)
    fitted = np.array([float(ScoreTail.fit(rng.choice(s, SUBSAMPLE, replace=False)).isf(P_WINDOW))
                       for _ in range(200)])
    cal = det.calibration.tail_for(IDS[0]) if det.calibration is not None else None
    print(f"{len(s)} unseen healthy scores: tail shape {xi:.2f}, scale {sigma:.2f}, "
          f"q99 {np.quantile(s, 0.99):.2f}, {100 * (1 - P_WINDOW):g}th percentile {truth:.2f}")
    if cal is not None:
        own = float(cal.isf(P_WINDOW))
        print(f"the model's calibration: {cal.n_scores} scores, shape {cal.xi:.2f}, "
              f"scale {cal.sigma:.2f}, max {cal.scores.max():.2f}; median "
              f"{np.median(cal.scores):.2f} and q90 {np.quantile(cal.scores, 0.9):.2f} against "
              f"{np.median(s):.2f} and {np.quantile(s, 0.9):.2f} unseen")
        print(f"{100 * np.mean(s > cal.scores.max()):.2f} % of the unseen scores are above the "
              f"highest calibration score ({cal.scores.max():.2f}), {100 * np.mean(s > 4.0):.2f} % "
              f"above 4")
        print(f"its own threshold at that exceedance: {own:.2f}, below the subsamples' in "
              f"{100 * np.mean(own < fitted):.0f} % of them")
    print(f"from {SUBSAMPLE}-score subsamples: threshold median {np.median(fitted):.2f} "
          f"(p10 {np.quantile(fitted, 0.1):.2f}, p90 {np.quantile(fitted, 0.9):.2f}); below the "
          f"whole sample's in {100 * np.mean(fitted < truth):.0f} % of them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
