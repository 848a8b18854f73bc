import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from monitor.artifact import FORMAT_VERSION, load_artifact
from monitor.detector import Detector
from monitor.errors import ArtifactError


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def test_round_trip_gives_identical_scores(tiny_model):
    a = Detector.load(tiny_model, device="cpu")
    b = Detector.load(tiny_model, device="cpu")
    rng = np.random.default_rng(0)
    windows = (0.05 * rng.standard_normal((3, 160000))).astype(np.float32)
    sa, sb = a.score_windows(windows), b.score_windows(windows)
    assert sa.shape == (3,) and np.all(np.isfinite(sa))
    assert np.array_equal(sa, sb)
    m = a.manifest
    assert m["format_version"] == FORMAT_VERSION
    assert m["encoder"]["name"] == "mel" and m["encoder"]["mel"]["n_fft"] == 512
    assert m["scorers"][0]["dims"] == [8192, 64, 16]
    assert m["threshold"]["value"] == a.threshold > 0
    assert m["normal_scores"]["n"] > 0
    assert len(m["training"]["data_sha256"]) == 64
    assert not any(p.suffix in (".pkl", ".pt", ".pth") for p in tiny_model.iterdir())


def test_scores_are_batch_invariant(tiny_model):
    det = Detector.load(tiny_model, device="cpu")
    rng = np.random.default_rng(1)
    windows = (0.05 * rng.standard_normal((4, 160000))).astype(np.float32)
    together = det.score_windows(windows)
    alone = np.array([det.score_windows(w[None])[0] for w in windows])
    assert np.allclose(together, alone, rtol=1e-4)


def test_corrupted_manifest_names_the_file(model_copy):
    (model_copy / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="manifest.json: not valid JSON"):
        load_artifact(model_copy)


def test_newer_format_is_refused(model_copy):
    m = json.loads((model_copy / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (model_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="newer than this harken supports"):
        load_artifact(model_copy)


def test_tensor_file_tampering_is_detected(model_copy):
    path = model_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        Detector.load(model_copy, device="cpu")


def test_shape_mismatch_is_a_clear_error(model_copy):
    path = model_copy / "model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith("scorer.recon.ae.") and k.endswith("weight"))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    m = json.loads((model_copy / "manifest.json").read_text())
    from monitor.artifact import sha256_file

    m["tensors_sha256"] = sha256_file(path)  # a consistent but wrong artifact
    (model_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="do not match its config"):
        Detector.load(model_copy, device="cpu")


def test_other_sample_rate_and_missing_dir(model_copy, tmp_path):
    m = json.loads((model_copy / "manifest.json").read_text())
    m["sample_rate_hz"] = 44100
    (model_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="trained at 44100 Hz"):
        Detector.load(model_copy, device="cpu")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="not a harken model directory"):
        load_artifact(tmp_path / "empty")
