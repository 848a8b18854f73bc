"""`harken train --fine-tune`: the real EfficientAT weights tuned end to end with the cnn decoder."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from monitor.artifact import load_artifact, save_artifact
from monitor.audio import WINDOW_S
from monitor.detector import Detector
from monitor.encoders.registry import build_encoder
from monitor.errors import ArtifactError, UsageError
from monitor.labels import split_dir
from tests.helpers import harken
from train.cache import EmbeddingCache
from train.config import load_train_config
from train.data import normal_training_clips, split_held_out
from train.finetune import load_window_waves, trainable_parameters
from train.fit import fit_model

MN04 = "weights/efficientat/mn04_as_mAP_432.pt"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tone_data, shared_data):
    """One fine-tuned efficientat+cnn artifact (two frozen epochs, one fine-tuning epoch)."""
    base = tmp_path_factory.mktemp("fine-tuned")
    cfg = load_train_config(None, encoder="efficientat", decoder="cnn",
                            weights=str(shared_data / MN04), fine_tune=True, max_epochs=2,
                            fine_tune_epochs=1, fine_tune_lr=1e-4)
    result = fit_model(tone_data, base / "model", cfg, device="cpu", progress=False,
                       cache_dir=base / "cache")
    return base / "model", result, cfg


def _frozen_encoder(spec: dict):
    return build_encoder({k: v for k, v in spec.items() if k not in ("fine_tuned", "tuned_sha256")},
                         torch.device("cpu"))


def _held_out_waves(tone_data, cfg) -> np.ndarray:
    clips = normal_training_clips(split_dir(tone_data, "train"))
    waves = load_window_waves(clips, WINDOW_S, None)  # 10 s clips: one window each
    _, ho = split_held_out(clips, cfg.val_fraction, cfg.seed)
    return waves[ho].numpy()


def test_encoder_weights_change_and_are_stored(tuned):
    path, result, _ = tuned
    art = load_artifact(path)
    spec = art.manifest["encoder"]
    assert spec["fine_tuned"] is True and len(spec["tuned_sha256"]) == 64
    frozen = dict(_frozen_encoder(spec).named_parameters())
    stored = {k[len("encoder."):]: v for k, v in art.tensors.items() if k.startswith("encoder.")}
    assert set(stored) == set(frozen)
    changed = [k for k in frozen if not torch.equal(stored[k], frozen[k].detach())]
    assert "net.features.0.0.weight" in changed  # the first conv sees the gradient of every block
    assert result["fine_tune"]["best_epoch"] == 1


def test_held_out_loss_is_not_worse(tuned):
    _, result, _ = tuned
    ft = result["fine_tune"]
    # The phase keeps its best weights, the frozen start included, so it can only improve.
    assert ft["val_loss_after"] <= ft["val_loss_before"]
    manifest = json.loads((tuned[0] / "manifest.json").read_text())
    assert manifest["training"]["fine_tune"]["val_loss_after"] == ft["val_loss_after"]


def test_artifact_round_trip_scores_match_training(tuned, tone_data):
    path, _, cfg = tuned
    windows = _held_out_waves(tone_data, cfg)
    det = Detector.load(path, device="cpu")
    scores = det.score_windows(windows)
    # normal_scores were computed in memory by the tuned encoder + decoder on these windows.
    summary = json.loads((path / "manifest.json").read_text())["normal_scores"]
    assert summary["n"] == len(scores)
    assert scores.mean() == pytest.approx(summary["mean"], rel=1e-5)
    assert scores.max() == pytest.approx(summary["max"], rel=1e-5)
    # Without its tuned weights the same artifact scores differently: they are really used.
    art = load_artifact(path)
    spec = {k: v for k, v in art.manifest["encoder"].items() if k != "fine_tuned"}
    untuned = Detector.from_artifact(replace(art, manifest=art.manifest.with_updates(encoder=spec)),
                                     device="cpu")
    assert not np.allclose(untuned.score_windows(windows), scores, rtol=1e-4)


@pytest.mark.parametrize("damage", ["drop", "reshape"])
def test_mismatched_encoder_tensors_are_an_artifact_error(tuned, tmp_path, damage):
    art = load_artifact(tuned[0])
    tensors = dict(art.tensors)
    key = "encoder.net.features.0.0.weight"
    if damage == "drop":
        del tensors[key]
    else:
        tensors[key] = tensors[key].flatten()
    out = save_artifact(tmp_path / "bad", art.manifest, tensors)
    with pytest.raises(ArtifactError, match="missing|shape"):
        Detector.load(out, device="cpu")


def test_tuned_spec_changes_the_embedding_cache_key(tuned, tmp_path):
    spec = load_artifact(tuned[0]).manifest["encoder"]
    frozen = _frozen_encoder(spec).spec()
    assert EmbeddingCache(tmp_path, spec, WINDOW_S, None).key != \
        EmbeddingCache(tmp_path, frozen, WINDOW_S, None).key


def test_frozen_artifact_still_loads(tiny_model, tone_data):
    manifest = json.loads((tiny_model / "manifest.json").read_text())
    assert "fine_tuned" not in manifest["encoder"]
    assert manifest["training"]["fine_tune"] is None
    det = Detector.load(tiny_model, device="cpu")
    assert np.isfinite(det.score_windows(_held_out_waves(tone_data, load_train_config(None)))).all()


@pytest.mark.parametrize("args", [
    ["--encoder", "mel", "--decoder", "cnn"],
    ["--encoder", "conv", "--decoder", "cnn"],
    ["--encoder", "efficientat", "--decoder", "mlp"],
    ["--encoder", "efficientat", "--decoder", "cnn", "--scorer", "recon,knn"],
])
def test_bad_combinations_exit_2(args, tone_data, tmp_path):
    proc = harken("train", "--data", str(tone_data), "--out", str(tmp_path / "m"), "--fine-tune",
                  *args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("harken: error:")]
    assert len(lines) == 1 and "--fine-tune" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_config_checks_and_untrainable_encoder():
    with pytest.raises(UsageError, match="fine_tune_lr"):
        load_train_config(None, fine_tune_lr=0.0)
    with pytest.raises(UsageError, match="fine_tune_batch_size"):
        load_train_config(None, fine_tune_batch_size=1)
    with pytest.raises(UsageError, match="no trainable parameters"):
        trainable_parameters(build_encoder({"name": "mel"}, torch.device("cpu")))
