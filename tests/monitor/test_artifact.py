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


# --------------------------------------------------------------------------- hand-edited manifests


def _edit(model_copy, **changes):
    m = json.loads((model_copy / "manifest.json").read_text())
    for dotted, value in changes.items():
        node = m
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    (model_copy / "manifest.json").write_text(json.dumps(m))


_DELETE = object()


@pytest.mark.parametrize("changes, match", [
    ({"threshold": {}}, "threshold: must be a mapping with a value"),
    ({"threshold__value": float("nan")}, "threshold.value: must be a finite number"),
    ({"threshold__value": float("inf")}, "threshold.value: must be a finite number"),
    ({"threshold__value": "0.5"}, "threshold.value: must be a finite number"),
    ({"threshold__per_id": {"00": float("nan")}}, r"threshold.per_id.00: must be a finite"),
    ({"threshold__per_id": {"zero": 1.0}}, "threshold.per_id: keys must be machine IDs"),
    ({"window_s": -1}, r"window_s: must be a number in \(0, 600\]"),
    ({"window_s": 1e12}, "window_s: must be a number"),
    ({"scorers": []}, "scorers: must be a non-empty list"),
    ({"scorers": [{"name": "evil"}]}, "unknown scorer 'evil'"),
    ({"scorers": "recon"}, "scorers: must be a non-empty list"),
    ({"encoder": None}, "encoder: must be a mapping with a name"),
    ({"encoder": {"weights": "x"}}, "encoder: must be a mapping with a name"),
    ({"fusion__method": "evil"}, "fusion.method: must be one of mean, max, got 'evil'"),
    ({"fusion": {"method": "mean"}}, "fusion.stats: must be a mapping"),
    ({"format_version": -5}, "format_version: must be 1..1, got -5"),
    ({"format_version": True}, "format_version: is missing or not an integer"),
    ({"sample_rate_hz": "16k"}, "sample_rate_hz: must be a positive integer"),
    ({"tensors_sha256": _DELETE}, "required key 'tensors_sha256' is missing"),
])
def test_hand_edited_manifest_is_one_clear_error(model_copy, changes, match):
    _edit(model_copy, **changes)
    with pytest.raises(ArtifactError, match=match):
        Detector.load(model_copy, device="cpu")


def test_nan_tensor_is_refused_on_load(model_copy):
    from monitor.artifact import sha256_file

    path = model_copy / "model.safetensors"
    tensors = load_file(str(path))
    tensors["standardizer.std"][3] = float("nan")
    save_file(tensors, str(path))
    _edit(model_copy, tensors_sha256=sha256_file(path))
    with pytest.raises(ArtifactError, match="'standardizer.std' has 1 NaN or infinite values"):
        load_artifact(model_copy)


def test_check_config_refuses_a_nan_threshold_model(model_copy, tmp_path):
    """What `harken train` once saved for a single held-out window: check-config must not pass it."""
    from tests.helpers import harken

    _edit(model_copy, threshold__value=float("nan"))
    cfg = tmp_path / "harken.yaml"
    cfg.write_text(f"node: n\nstate_dir: {tmp_path / 'state'}\nsources:\n"
                   f"  - {{id: s, kind: folder, path: {tmp_path}, model: {model_copy}}}\n")
    proc = harken("check-config", str(cfg))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "threshold.value: must be a finite number, got nan" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- atomic saves


def _manifest_and_tensors(model):
    art = load_artifact(model)
    keep = {k: v for k, v in art.manifest.items()
            if k not in ("format", "format_version", "harken_version", "created_utc", "tensors_sha256")}
    return keep, dict(art.tensors)


def test_save_replaces_a_model_only_once_the_new_one_is_complete(model_copy, tmp_path):
    from monitor.artifact import save_artifact

    manifest, tensors = _manifest_and_tensors(model_copy)
    before = (model_copy / "manifest.json").read_bytes()

    def fail(staging):  # as a SIGKILL or a failed round trip after the tensors were written
        assert (staging / "model.safetensors").is_file() and staging.parent == model_copy.parent
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_artifact(model_copy, {**manifest, "name": "new"}, tensors, verify=fail)
    assert (model_copy / "manifest.json").read_bytes() == before  # old model untouched
    Detector.load(model_copy, device="cpu")
    assert sorted(p.name for p in model_copy.parent.iterdir()) == ["model"]  # no staging left

    save_artifact(model_copy, {**manifest, "name": "new"}, tensors)
    assert load_artifact(model_copy).manifest["name"] == "new"
    assert sorted(p.name for p in model_copy.parent.iterdir()) == ["model"]


def test_save_refuses_nan_and_directories_holding_other_files(model_copy, tmp_path):
    from monitor.artifact import save_artifact
    from monitor.errors import UsageError

    manifest, tensors = _manifest_and_tensors(model_copy)
    with pytest.raises(ArtifactError, match="refusing to save the model: threshold.value"):
        save_artifact(tmp_path / "m2", {**manifest, "threshold": {"value": float("nan")}}, tensors)
    assert not (tmp_path / "m2").exists()
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "normal_id_00_0.wav").write_bytes(b"RIFF")
    with pytest.raises(UsageError, match="holds files that are not part of a harken model"):
        save_artifact(data, manifest, tensors)
    assert (data / "train" / "normal_id_00_0.wav").exists()


def test_stale_staging_of_a_killed_save_is_cleaned_up(model_copy):
    from monitor.artifact import save_artifact

    stale = model_copy.parent / ".model.partial-999999999-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    manifest, tensors = _manifest_and_tensors(model_copy)
    save_artifact(model_copy, manifest, tensors)
    assert not stale.exists()
