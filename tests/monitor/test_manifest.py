"""The typed manifest: the JSON on disk comes back unchanged, bad manifests are one clear line."""

import dataclasses
import json
import shutil

import pytest

from monitor.artifact import FORMAT_VERSION, load_artifact, save_artifact
from monitor.detector import Detector
from monitor.errors import ArtifactError
from monitor.manifest import REQUIRED, Manifest


def _raw(model) -> dict:
    return json.loads((model / "manifest.json").read_text())


def test_a_trained_manifest_round_trips_byte_for_byte(tiny_model):
    text = (tiny_model / "manifest.json").read_text()
    m = load_artifact(tiny_model).manifest
    assert isinstance(m, Manifest)
    assert json.dumps(m.to_json(), indent=2, allow_nan=False) + "\n" == text
    assert m == json.loads(text) and list(m) == list(json.loads(text))  # keys in file order


def test_a_manifest_keeps_the_order_of_its_json(tiny_model):
    raw = _raw(tiny_model)
    shuffled = dict(reversed(list(raw.items())))  # as a hand-edited or older file may be
    m = Manifest.from_json(shuffled, "m.json")
    assert list(m.to_json()) == list(shuffled) != list(raw)
    assert json.dumps(m.to_json()) == json.dumps(shuffled)
    assert list(m.with_updates(enrolment={"windows": 20})) == list(shuffled) + ["enrolment"]


def test_training_writes_the_keys_in_the_order_it_always_has(tiny_model):
    keys = list(_raw(tiny_model))
    assert keys == ["format", "format_version", "harken_version", "created_utc", "name",
                    "sample_rate_hz", "window_s", "encoder", "scorers", "fusion", "normalisation",
                    "threshold", "normal_scores", *(["calibration"] if "calibration" in keys else []),
                    "training", "tensors_sha256"]


def test_saving_a_loaded_manifest_keeps_everything_but_the_stamps(tiny_model, tmp_path):
    art = load_artifact(tiny_model)
    out = save_artifact(tmp_path / "copy", art.manifest.with_updates(name="renamed"), art.tensors)
    again, before = _raw(out), _raw(tiny_model)
    assert again["name"] == "renamed"
    assert again["tensors_sha256"] == before["tensors_sha256"]  # same tensors, same hash
    stamped = ("name", "created_utc", "harken_version")
    assert {k: v for k, v in again.items() if k not in stamped} == \
        {k: v for k, v in before.items() if k not in stamped}
    assert list(again) == list(before)


def test_attribute_access_equals_dict_access(tiny_model):
    raw = _raw(tiny_model)
    m = Manifest.from_json(raw, "m.json")
    assert len(m) == len(raw)
    for key, value in raw.items():
        assert m[key] == value and getattr(m, key) == value
    assert m.threshold_value == raw["threshold"]["value"]
    assert m.thresholds_per_id == {int(k): v for k, v in raw["threshold"].get("per_id", {}).items()}
    assert m.files_per_id == raw["training"]["files_per_id"]
    assert m.get("no_such_key") is None and "no_such_key" not in m
    with pytest.raises(KeyError):
        m["no_such_key"]
    det = Detector.load(tiny_model, device="cpu")
    assert det.manifest == raw and det.window_s == m.window_s and det.threshold == m.threshold_value


def test_keys_beyond_the_fields_and_nulls_come_back_as_they_were(tiny_model):
    raw = _raw(tiny_model)
    raw.pop("calibration", None)
    raw.pop("fusion")  # a model from before fusion: the mean of the raw scores
    raw["normal_scores"] = None
    raw["reference_overlay"] = {"windows": 3}
    m = Manifest.from_json(raw, "m.json")
    assert m.calibration is None and "calibration" not in m
    assert m.fusion is None and m.fusion_spec == {"method": "mean", "stats": {}}
    assert m.normal_scores is None and m["normal_scores"] is None
    assert m.extra == {"normal_scores": None, "reference_overlay": {"windows": 3}}
    assert m.to_json() == raw


def test_a_newer_format_version_is_one_clear_line(tiny_model):
    raw = _raw(tiny_model)
    raw["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ArtifactError) as exc:
        Manifest.from_json(raw, "model/manifest.json")
    assert str(exc.value) == (f"model/manifest.json: format_version {FORMAT_VERSION + 1} is newer "
                              f"than this harken supports ({FORMAT_VERSION}); upgrade harken")


@pytest.mark.parametrize("key", REQUIRED)
def test_a_missing_required_key_is_named(tiny_model, tmp_path, key):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    raw = _raw(model)
    del raw[key]
    (model / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=f"manifest.json: required key '{key}' is missing$"):
        load_artifact(model)


def test_not_a_harken_manifest(tiny_model):
    raw = _raw(tiny_model)
    raw["format"] = "something-else"
    with pytest.raises(ArtifactError, match=r"m.json: not a harken model manifest \(format != "):
        Manifest.from_json(raw, "m.json")
    with pytest.raises(ArtifactError, match="not a harken model manifest"):
        Manifest.from_json([raw], "m.json")


def test_a_manifest_cannot_be_changed_in_place(tiny_model):
    raw = _raw(tiny_model)
    m = Manifest.from_json(raw, "m.json")
    raw["threshold"]["value"] = -1.0  # the caller's dict was copied
    assert m.threshold_value != -1.0
    m.to_json()["threshold"]["value"] = -2.0  # so is what to_json gives
    assert m.threshold_value not in (-1.0, -2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.window_s = 5.0
    updated = m.with_updates(enrolment={"windows": 40, "hop_s": 1.0})
    assert updated["enrolment"] == {"windows": 40, "hop_s": 1.0} and "enrolment" not in m
    assert dataclasses.replace(m, window_s=5.0).window_s == 5.0 and m.window_s != 5.0


def test_updates_are_checked_as_a_loaded_manifest_is(tiny_model):
    m = Manifest.from_json(_raw(tiny_model), "m.json")
    with pytest.raises(ArtifactError, match="threshold.value: must be a finite number, got nan"):
        m.with_updates(threshold={"value": float("nan")})
    with pytest.raises(ArtifactError, match=r"scorers\[0\].name: unknown scorer 'nope'"):
        m.with_updates(scorers=[{"name": "nope"}])
