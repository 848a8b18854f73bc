"""The weight-free default detector: stats encoder + two diagonal Gaussians (level and shape
views) and a full Ledoit-Wolf Gaussian, fused.

Trained and evaluated through the CLI as users run it, on synthetic slide-rail data and on the
real fan recordings in ../shared/data. Floors sit well below the measured figures (README
"Detection quality") so that noise does not fail them but a broken detector does.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from monitor.detector import Detector
from monitor.encoders.stats import StatsEncoder
from monitor.scorers import DiagScorer, Features, Fusion, KnnScorer
from tests.helpers import harken


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("default-detector")
    data, model = root / "data", root / "model"
    proc = harken("synth", str(data), "--ids", "0,1", "--train", "24", "--test-normal", "10",
                  "--test-anomaly", "10", "--snr-db", "0", "--seed", "5", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = harken("train", "--data", str(data), "--out", str(model), "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return data, model


def test_train_without_encoder_builds_the_default(synth_model):
    data, model = synth_model
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["encoder"]["name"] == "stats"
    assert [s["name"] for s in manifest["scorers"]] == ["diag", "diag@shape", "mahalanobis"]
    views = manifest["encoder"]["views"]
    by_name = {s["name"]: s for s in manifest["scorers"]}
    assert by_name["diag"]["view"] == views["level"]
    assert by_name["diag@shape"]["view"] == views["shape"]
    assert "view" not in by_name["mahalanobis"]  # the whole vector
    assert set(manifest["fusion"]["stats"]) == set(by_name)
    assert manifest["fusion"]["transform"] == "log"
    assert set(manifest["fusion"].get("per_id", {})) <= {"00", "01"}


def test_default_separates_synthetic_faults_and_reports_per_fault(synth_model):
    data, model = synth_model
    proc = harken("evaluate", "--model", str(model), "--data", str(data), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["auc"] > 0.75, m["auc"]  # measured 0.9+ on this seed
    assert set(m["per_fault"]) <= {"rail_damage", "dry_carriage", "slack_belt", "bearing_defect"}
    assert sum(v["n_anomaly"] for v in m["per_fault"].values()) == m["n_anomaly"]
    assert sum(v["n_anomaly"] for v in m["per_severity"].values()) == m["n_anomaly"]
    text = harken("evaluate", "--model", str(model), "--data", str(data), "--device", "cpu").stdout
    assert "fault " in text and "severity " in text


def test_round_trip_and_batching_give_the_same_scores(synth_model):
    data, model = synth_model
    a, b = Detector.load(model, device="cpu"), Detector.load(model, device="cpu")
    rng = np.random.default_rng(1)
    windows = (0.05 * rng.standard_normal((4, 160_000))).astype(np.float32)
    ids = [0, 1, None, 0]
    batch = a.score_windows(windows, ids)
    assert np.array_equal(batch, b.score_windows(windows, ids))
    single = np.array([a.score_windows(windows[i:i + 1], [ids[i]])[0] for i in range(4)])
    assert np.allclose(batch, single, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(batch))


def test_default_on_real_fan_recordings(shared_data, tmp_path):
    """Trained on the 75 real normals of one DCASE machine, evaluated on the real MIMII fan
    sample (10 normal, 10 abnormal; an AUC from 20 clips carries about +/- 0.1 of noise)."""
    data = tmp_path / "fan"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    for p in (shared_data / "audio" / "id00-unknown-machine").glob("normal_*.wav"):
        shutil.copy(p, data / "train" / p.name)
    for p in (shared_data / "audio" / "mimii-fan-sample").glob("*.wav"):
        shutil.copy(p, data / "test" / p.name)
    model = tmp_path / "model"
    proc = harken("train", "--data", str(data), "--out", str(model), "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    proc = harken("evaluate", "--model", str(model), "--data", str(data), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["n_normal"] == m["n_anomaly"] == 10
    assert m["auc"] >= 0.8, m["auc"]  # measured 0.92 (README)


def test_shape_view_ignores_gain_and_level_view_sees_it():
    enc = StatsEncoder().eval()
    rng = np.random.default_rng(0)
    t = np.arange(160_000) / 16_000
    x = (0.1 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)
    waves = torch.from_numpy(np.stack([x, 2 * x]))
    v = enc(waves).vector
    lo, hi = enc.views["level"]
    s0, s1 = enc.views["shape"]
    n_mels = enc.resolutions[0].n_mels
    level = v[:, lo:hi]
    # Doubling the amplitude adds 6.02 dB to every band mean and leaves spread statistics alone.
    assert torch.allclose(level[1, :n_mels] - level[0, :n_mels], torch.full((n_mels,), 6.0206), atol=1e-2)
    assert torch.allclose(level[1, n_mels:5 * n_mels], level[0, n_mels:5 * n_mels], atol=1e-3)
    shape = v[:, s0:s1]
    n_gain = len(enc.resolutions)
    assert torch.allclose(shape[1, :-n_gain], shape[0, :-n_gain], atol=1e-3)
    assert torch.allclose(shape[1, -n_gain:] - shape[0, -n_gain:], torch.full((n_gain,), 6.0206), atol=1e-2)


def test_diag_scorer_is_the_per_id_standardised_distance():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(50, 6, generator=gen) * torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0, 1.0])
    ids = [0] * 25 + [1] * 25
    z[25:] += 5.0
    diag = DiagScorer.fit(z, ids, view=[0, 4])
    q = torch.randn(3, 6, generator=gen)
    got = diag.score(Features(q), [1, 1, 1])
    ref_z = z[25:, :4].double()
    mean, var = ref_z.mean(0), ref_z.var(0, unbiased=False) + 1e-3
    ref = (((q[:, :4].double() - mean) ** 2) / var).sum(1).sqrt()
    assert torch.allclose(got.double(), ref, rtol=1e-4)
    # Dimensions outside the view do not matter.
    q2 = q.clone()
    q2[:, 4:] += 100.0
    assert torch.allclose(diag.score(Features(q2), [1, 1, 1]), got)


def test_knn_is_the_mean_of_the_k_nearest():
    bank = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    knn = KnnScorer.fit(bank, [0] * 4, k=3, metric="euclidean")
    assert knn.score(Features(torch.tensor([[0.0]])), [0]).item() == pytest.approx(1.0)


def test_fusion_puts_machine_ids_on_one_scale():
    # ID 1's normal distances are ten times ID 0's: per-ID statistics make both z ~ N(0, 1).
    gen = torch.Generator().manual_seed(0)
    a = torch.cat([torch.rand(40, generator=gen) + 1, 10 * (torch.rand(40, generator=gen) + 1)])
    b = a * 2
    ids = [0] * 40 + [1] * 40
    fusion = Fusion.fit("mean", {"x": a, "y": b}, "log", ids)
    fused = fusion.combine({"x": a, "y": b}, ids)
    assert abs(float(fused[:40].mean())) < 1e-6 and abs(float(fused[40:].mean())) < 1e-6
    pooled = Fusion.fit("mean", {"x": a, "y": b}, "log").combine({"x": a, "y": b})
    assert float(pooled[40:].mean() - pooled[:40].mean()) > 1.0  # without: ID 1 looks anomalous
    restored = Fusion.from_json(json.loads(json.dumps(fusion.to_json())))
    assert torch.equal(restored.combine({"x": a, "y": b}, ids), fused)


def test_scorers_on_named_views_train_load_and_score(synth_model, tmp_path):
    data, _ = synth_model
    model = tmp_path / "views"
    proc = harken("train", "--data", str(data), "--out", str(model), "--quiet", "--device", "cpu",
                  "--scorer", "knn@shape,diag@all,diag")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((model / "manifest.json").read_text())
    views = manifest["encoder"]["views"]
    by_name = {s["name"]: s for s in manifest["scorers"]}
    assert by_name["knn@shape"]["view"] == views["shape"]
    assert "view" not in by_name["diag@all"] and by_name["diag"]["view"] == views["level"]
    det = Detector.load(model, device="cpu")
    windows = (0.05 * np.random.default_rng(2).standard_normal((2, 160_000))).astype(np.float32)
    scores = det.score_windows(windows, [0, 1])
    assert np.all(np.isfinite(scores))
    # Two diag scorers on different views are two models, not aliases of one.
    level = views["level"][1] - views["level"][0]
    assert det.scorers["diag"].models["id_00"].mean.shape == (level,)
    assert det.scorers["diag@all"].models["id_00"].mean.shape == (manifest["normalisation"]["dim"],)


@pytest.mark.parametrize("scorers, message", [
    ("diag@nope", "no embedding view 'nope'"),
    ("diag,diag", "each scorer once"),
    ("recon@shape", "drop the @view"),
    ("lof@shape", "unknown scorer 'lof@shape'"),
])
def test_bad_scorer_names_are_one_line_errors(synth_model, tmp_path, scorers, message):
    data, _ = synth_model
    proc = harken("train", "--data", str(data), "--out", str(tmp_path / "m"), "--quiet",
                  "--device", "cpu", "--scorer", scorers)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()
