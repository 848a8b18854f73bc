import json

import numpy as np
import pytest
import torch

from monitor.detector import Detector
from monitor.errors import UsageError
from monitor.decoders import MLPAutoencoder
from monitor.scorers import Features, KnnScorer, MahalanobisScorer, ReconScorer, ledoit_wolf
from train.config import load_train_config
from train.evaluate import evaluate
from train.fit import calibrate_threshold, fit_model
from train.fit_scorers import train_autoencoder


def test_seed_baseline_widths():
    ae = MLPAutoencoder([8192, 4096, 2048, 1024, 512, 256])
    linears = [m for m in ae.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in linears] == [8192, 4096, 2048, 1024, 512, 256, 512, 1024, 2048, 4096]
    assert linears[-1].out_features == 8192


def test_training_loop_learns_low_rank_structure():
    # Embeddings on a 4-dim subspace plus a little noise: a bottleneck of 8 can learn them.
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 64, generator=gen)
    z = torch.randn(400, 4, generator=gen) @ basis + 0.05 * torch.randn(400, 64, generator=gen)
    z = (z - z.mean(0)) / z.std(0)
    scorer = ReconScorer.build("mlp", 64, [64, 32, 8])
    cfg = load_train_config(None, max_epochs=60, early_stop_patience=60, batch_size=32)
    hist = train_autoencoder(scorer, Features(z[:360]), Features(z[360:]), cfg, torch.device("cpu"),
                             progress=False)
    assert hist[-1].train_loss < 0.3 * hist[0].train_loss
    assert min(h.val_loss for h in hist) < 0.3 * hist[0].val_loss


def test_early_stopping_and_best_weights(tone_data, tmp_path):
    cfg = load_train_config(None, encoder="mel", decoder_dims=(8192, 64, 16), max_epochs=40,
                            early_stop_patience=2, early_stop_min_delta=10.0, batch_size=4)
    result = fit_model(tone_data, tmp_path / "m", cfg, device="cpu", progress=False)
    # min_delta 10 means no epoch after the first counts as better: stop after 1 + patience.
    assert result["epochs"] == 3


def test_trained_model_separates_tone_anomalies(tiny_model, tone_data):
    metrics = evaluate(tiny_model, tone_data, device="cpu", progress=False)
    assert metrics["auc"] > 0.9  # the tone anomalies are blatant
    assert set(metrics["per_id"]) == {"00", "01"}
    assert metrics["n_normal"] == metrics["n_anomaly"] == 8


def test_training_is_reproducible(tone_data, tmp_path):
    cfg = load_train_config(None, encoder="mel", decoder_dims=(8192, 32), max_epochs=3, seed=7)
    a = fit_model(tone_data, tmp_path / "a", cfg, device="cpu", progress=False)
    b = fit_model(tone_data, tmp_path / "b", cfg, device="cpu", progress=False)
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert a["threshold"] == b["threshold"]


def test_distance_scorers_and_fusion(tone_data, tmp_path):
    cfg = load_train_config(None, scorers="knn,mahalanobis", fusion="max", seed=1)
    fit_model(tone_data, tmp_path / "d", cfg, device="cpu", progress=False)
    det = Detector.load(tmp_path / "d", device="cpu")
    assert set(det.scorers) == {"knn", "mahalanobis"}
    assert not det.reconstructs_image and det.error_map(np.zeros(160000, np.float32)) is None
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["fusion"]["method"] == "max"
    assert manifest["threshold"]["method"] == "quantile"  # fused z-scores are not gamma
    metrics = evaluate(tmp_path / "d", tone_data, device="cpu", progress=False)
    assert metrics["auc"] > 0.9


def test_knn_uses_the_machine_id_bank():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    knn = KnnScorer.fit(z, [0, 0, 1, 1], k=1, metric="euclidean")
    q = torch.tensor([[0.0, 1.0]])
    assert knn.score(Features(q), [1]).item() == pytest.approx(0.0)
    assert knn.score(Features(q), [0]).item() == pytest.approx(np.hypot(1.0, 0.9), rel=1e-5)
    assert knn.score(Features(q), [None]).item() == pytest.approx(0.0)  # pooled bank for unknown IDs


def test_ledoit_wolf_matches_sklearn_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    cov = ledoit_wolf(torch.from_numpy(x)).numpy()
    # Independent computation of the same estimator (Ledoit & Wolf 2004).
    xc = x - x.mean(0)
    s = xc.T @ xc / len(x)
    mu = np.trace(s) / 6
    d2 = ((s - mu * np.eye(6)) ** 2).sum()
    b2 = sum(((np.outer(r, r) - s) ** 2).sum() for r in xc) / len(x) ** 2
    shrink = min(b2, d2) / d2
    assert np.allclose(cov, shrink * mu * np.eye(6) + (1 - shrink) * s)
    # Full precision (p <= n) and the low-rank Woodbury form (p > n) give the same distances.
    q = torch.from_numpy(x[:5]).float()
    full = MahalanobisScorer.fit(torch.from_numpy(x).float(), [0] * 40, group_scale=False)
    ref = np.sqrt(np.einsum("bi,ij,bj->b", x[:5] - x.mean(0), np.linalg.inv(cov), x[:5] - x.mean(0)))
    assert np.allclose(full.score(Features(q), [0] * 5).numpy(), ref, rtol=1e-3)
    # group_scale: the same estimator in the ID's own per-dimension units (plus a small floor).
    scale = np.sqrt(xc.var(0) + 1e-3)
    cov_s = ledoit_wolf(torch.from_numpy(x / scale)).numpy()
    d = (x[:5] - x.mean(0)) / scale
    ref_s = np.sqrt(np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov_s), d))
    scaled = MahalanobisScorer.fit(torch.from_numpy(x).float(), [0] * 40, group_scale=True)
    assert np.allclose(scaled.score(Features(q), [0] * 5).numpy(), ref_s, rtol=1e-2)
    assert not np.allclose(ref_s, ref, rtol=1e-2)  # the option changes the model
    wide = rng.normal(size=(12, 30))
    low = MahalanobisScorer.fit(torch.from_numpy(wide).float(), [0] * 12, group_scale=False)
    assert low.models["all"].basis is not None
    cw = ledoit_wolf(torch.from_numpy(wide)).numpy()
    dw = wide[:3] - wide.mean(0)
    ref = np.sqrt(np.einsum("bi,ij,bj->b", dw, np.linalg.inv(cw), dw))
    assert np.allclose(low.score(Features(torch.from_numpy(wide[:3]).float()), [0] * 3).numpy(), ref, rtol=1e-3)


def test_threshold_calibration():
    rng = np.random.default_rng(0)
    s = rng.gamma(2.0, 1.0, 5000)
    t = calibrate_threshold(s, "gamma", 0.9)
    assert t["method"] == "gamma"
    assert (s > t["value"]).mean() == pytest.approx(0.1, abs=0.02)
    q = calibrate_threshold(s, "quantile", 0.95)
    assert q["value"] == pytest.approx(np.quantile(s, 0.95))


def test_config_errors_name_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(UsageError, match="train.learning_rat: unknown key"):
        load_train_config(f)
    f.write_text("train:\n  batch_size: many\n")
    with pytest.raises(UsageError, match="batch_size: expected an integer"):
        load_train_config(f)
    with pytest.raises(UsageError, match="val_fraction"):
        load_train_config(None, val_fraction=1.5)
    with pytest.raises(UsageError, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")


def test_train_config_reports_every_bad_key_at_once(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rat: 0.1\n  batch_size: 0\n  knn_metric: manhattan\n")
    with pytest.raises(UsageError) as info:
        load_train_config(f)
    assert info.value.problems[0].startswith("train.learning_rat: unknown key (known: ")
    assert info.value.problems[1:] == [
        "train.knn_metric: must be one of auto, cosine, euclidean, got 'manhattan'",
        "train.batch_size: must be >= 1, got 0"]
    assert str(info.value).startswith(f"{f}: train.learning_rat: unknown key")


def test_example_config_loads():
    from tests.helpers import REPO

    cfg = load_train_config(REPO / "config" / "train.example.yaml")
    assert cfg.learning_rate == 1e-3 and cfg.early_stop_patience == 20 and cfg.max_epochs == 500


def test_embedding_cache_hits_and_invalidation(tone_data, tmp_path, monkeypatch):
    from monitor.encoders.mel import MelImageEncoder
    from monitor.labels import find_audio, parse_clip
    from train.cache import EmbeddingCache
    from train.data import embed_clips

    clips = [parse_clip(p) for p in find_audio(tone_data / "train")][:6]
    enc = MelImageEncoder()
    calls = []
    real = enc.forward
    monkeypatch.setattr(enc, "forward", lambda w: calls.append(len(w)) or real(w))
    cache = EmbeddingCache(tmp_path / "cache", enc.spec(), 10.0, None)
    first = embed_clips(clips, enc, torch.device("cpu"), progress=False, cache=cache)
    assert cache.misses == 6 and sum(calls) == 6
    calls.clear()
    cache2 = EmbeddingCache(tmp_path / "cache", enc.spec(), 10.0, None)
    second = embed_clips(clips, enc, torch.device("cpu"), progress=False, cache=cache2)
    assert cache2.hits == 6 and calls == []  # the encoder never ran
    assert torch.equal(first.embeddings, second.embeddings)
    # Another hop or front end is another key: nothing is reused.
    cache3 = EmbeddingCache(tmp_path / "cache", enc.spec(), 10.0, 5.0)
    embed_clips(clips, enc, torch.device("cpu"), progress=False, cache=cache3)
    assert cache3.hits == 0


@pytest.mark.parametrize("encoder,decoder", [("mel", "unet"), ("conv", "cnn"), ("mel", "cnn")])
def test_every_decoder_trains_saves_and_scores(tone_data, tmp_path, encoder, decoder):
    cfg = load_train_config(None, encoder=encoder, decoder=decoder, max_epochs=4, batch_size=8,
                            decoder_dims=(8192, 256, 128, 32) if decoder == "unet" else None)
    result = fit_model(tone_data, tmp_path / "m", cfg, device="cpu", progress=False)
    assert result["epochs"] == 4 and result["parameters"] > 0
    det = Detector.load(tmp_path / "m", device="cpu")
    assert det.manifest["scorers"][0]["decoder"] == decoder
    windows = np.random.default_rng(0).normal(0, 0.05, (2, 160000)).astype(np.float32)
    scores = det.score_windows(windows)
    assert scores.shape == (2,) and np.all(np.isfinite(scores)) and np.all(scores > 0)
    emap = det.error_map(windows[0])
    assert det.reconstructs_image  # said by the encoder and scorer, not by the encoder's name
    if decoder == "cnn":
        assert emap.shape == (128, 64)
        # the error map is the score's per-cell breakdown
        assert emap.mean() == pytest.approx(scores[0], rel=1e-4)
    else:
        assert emap.shape == (128, 64)  # the mel image reconstructed by unet


def test_unet_shape_follows_the_seed():
    from monitor.decoders import UNetAutoencoder, default_unet_dims

    assert default_unet_dims(768) == [768, 1024, 512, 128]
    net = UNetAutoencoder([768, 1024, 512, 128])
    linears = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(768, 1024), (1024, 512), (512, 128), (128, 512), (1024, 1024), (2048, 768)]


def test_thresholds_per_machine_id_reach_replay_and_evaluate(tmp_path):
    """Each machine ID with enough held-out windows gets its own threshold; replay, evaluate
    and the daemon's scorer use it for that ID's windows."""
    import json

    from monitor.detector import Detector
    from monitor.replay import score_files
    from monitor.labels import find_audio
    from tests.helpers import write_tone_dataset
    from train.config import load_train_config
    from train.evaluate import evaluate
    from train.fit import fit_model

    data = write_tone_dataset(tmp_path / "data", ids=(0, 3), n_train=30, n_test=3, seed=5)
    cfg = load_train_config(None, scorers="knn", threshold_method="quantile", seed=1)
    fit_model(data, tmp_path / "m", cfg, device="cpu", progress=False)
    thr = json.loads((tmp_path / "m" / "manifest.json").read_text())["threshold"]
    assert set(thr["per_id"]) == {"00", "03"}
    det = Detector.load(tmp_path / "m", device="cpu")
    assert det.threshold_for(0) == thr["per_id"]["00"] and det.threshold_for(3) == thr["per_id"]["03"]
    assert det.threshold_for(None) == det.threshold_for(7) == thr["value"]
    assert thr["per_id"]["00"] != thr["per_id"]["03"]
    for ws in score_files(det, find_audio(data / "test")):
        assert ws.threshold == det.threshold_for(ws.machine_id)
        assert ws.anomaly == (ws.score > ws.threshold)
    m = evaluate(tmp_path / "m", data, device="cpu", progress=False)
    assert m["thresholds_per_id"] == thr["per_id"]
