"""The synthetic slide-rail generator: determinism, layout, labels, SNR, fault severity, CLI."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from monitor.errors import UsageError
from tests.helpers import harken
from train.synth import (
    FAULTS,
    FS,
    PEAK_LIMIT,
    SEVERITY_RANGE,
    MachineParams,
    _kinematics,
    render_clip,
    render_components,
    write_dataset,
)

SMALL = dict(ids=(0, 3), n_train=2, n_test_normal=1, n_test_anomaly=4, snr_db=0.0, progress=False)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    summary = write_dataset(out, seed=3, **SMALL)
    return out, summary


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _log_spectrogram(x):
    _, _, s = signal.stft(x, FS, nperseg=512, noverlap=256)
    return np.log(np.abs(s) ** 2 + 1e-10)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(small_set, tmp_path):
    out, _ = small_set
    again = tmp_path / "again"
    write_dataset(again, seed=3, **SMALL)
    other = tmp_path / "other"
    write_dataset(other, seed=4, **SMALL)
    first, second, third = _files(out), _files(again), _files(other)
    assert first == second
    assert set(third) == set(first)
    wavs = [name for name in first if name.endswith(".wav")]
    assert all(third[name] != first[name] for name in wavs)


def test_layout_names_and_format(small_set):
    out, summary = small_set
    expected = {f"train/normal_id_{m:02d}_{i:08d}.wav" for m in (0, 3) for i in range(2)}
    expected |= {f"test/normal_id_{m:02d}_00000000.wav" for m in (0, 3)}
    expected |= {f"test/anomaly_id_{m:02d}_{i:08d}.wav" for m in (0, 3) for i in range(4)}
    written = set(_files(out))
    assert written == expected | {"labels.csv"}
    assert summary["total_files"] == len(expected) == 14
    assert summary["counts"] == {"train": 4, "test_normal": 2, "test_anomaly": 8}
    for name in expected:
        info = sf.info(out / name)
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16",
                                                                              160000)
        x, _ = sf.read(out / name)
        assert 0.01 < np.sqrt(np.mean(x ** 2)) and np.max(np.abs(x)) <= PEAK_LIMIT + 1e-4
    assert not list(out.parent.glob(".set.partial-*"))  # staging folder renamed away


def test_labels_csv_matches_the_files_and_covers_every_fault(small_set):
    out, summary = small_set
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "split", "label", "machine_id", "fault", "severity"]
    assert {r["file"] for r in rows} == {n for n in _files(out) if n.endswith(".wav")}
    for r in rows:
        name = r["file"]
        assert name.startswith(r["split"] + "/")
        assert f"{r['label']}_id_{int(r['machine_id']):02d}_" in name
        severity = float(r["severity"])
        if r["label"] == "normal":
            assert (r["fault"], severity) == ("none", 0.0)
        else:
            assert r["fault"] in FAULTS and SEVERITY_RANGE[0] <= severity <= SEVERITY_RANGE[1]
    for mid in ("0", "3"):  # four anomalies per ID: each fault once
        assert sorted(r["fault"] for r in rows if r["label"] == "anomaly"
                      and r["machine_id"] == mid) == sorted(FAULTS)
    assert summary["faults"] == {name: 2 for name in FAULTS}


@pytest.mark.parametrize("snr_db", [-6.0, 0.0, 10.0])
def test_background_is_mixed_at_the_requested_snr(snr_db, tmp_path):
    parts = render_components(1, None, rng=11, snr_db=snr_db)
    clip = parts.mix()
    np.testing.assert_allclose(clip, parts.gain * (parts.machine + parts.fault + parts.background),
                               atol=1e-6)
    # measured on the written file: what is left after removing the machine is the background
    path = tmp_path / "clip.wav"
    sf.write(path, clip, FS, subtype="PCM_16")
    written, _ = sf.read(path)
    background = written - parts.gain * parts.machine
    machine = parts.gain * parts.machine
    measured = 10 * np.log10(np.mean(machine ** 2) / np.mean(background ** 2))
    assert abs(measured - snr_db) < 1.0, measured


def test_render_clip_is_a_pure_function_of_its_rng_and_arguments():
    a = render_clip(2, "bearing_defect", 0.4, rng=np.random.default_rng(9))
    b = render_clip(2, "bearing_defect", 0.4, rng=np.random.default_rng(9))
    c = render_clip(2, "bearing_defect", 0.4, rng=np.random.default_rng(10))
    assert a.dtype == np.float32 and a.shape == (160000,)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert render_clip(2, rng=1, seconds=2.5).shape == (40000,)


@pytest.mark.parametrize("fault", FAULTS)
def test_higher_severity_moves_the_clip_further_from_the_healthy_one(fault):
    healthy = render_components(0, None, rng=21)
    healthy_spec = _log_spectrogram(healthy.gain * (healthy.machine + healthy.background))
    distances = []
    for severity in (0.1, 0.5, 1.0):
        parts = render_components(0, fault, severity, rng=21)
        if fault != "slack_belt":  # only the slack belt changes how the machine itself runs
            np.testing.assert_array_equal(parts.machine, healthy.machine)
        # the same background, scaled against this machine's power
        scale = np.dot(parts.background, healthy.background) / np.dot(healthy.background,
                                                                      healthy.background)
        np.testing.assert_allclose(parts.background, scale * healthy.background, atol=1e-9)
        distances.append(np.mean(np.abs(_log_spectrogram(parts.mix()) - healthy_spec)))
    assert distances[0] < distances[1] < distances[2], distances
    assert distances[0] > 0.01


def test_kinematics_are_consistent_strokes_between_the_end_stops():
    p = MachineParams.for_id(4, seed=1)
    kin = _kinematics(p, 10 * FS, np.random.default_rng(0))
    assert kin.x_m.min() >= -1e-9 and kin.x_m.max() <= p.stroke_m + 1e-9
    assert np.max(np.abs(kin.v_mps)) <= p.speed_mps * 1.1
    # velocity is the derivative of position (away from the corners of the profile)
    dxdt = np.gradient(kin.x_m) * FS
    assert np.median(np.abs(dxdt - kin.v_mps)) < 1e-3
    # the carriage is at an end stop when each stroke ends
    at_ends = kin.x_m[kin.stroke_ends]
    assert kin.stroke_ends.size >= 3
    assert np.all(np.minimum(at_ends, p.stroke_m - at_ends) < 1e-3)


def test_machine_ids_get_different_machines():
    a, b = MachineParams.for_id(0, seed=0), MachineParams.for_id(1, seed=0)
    assert a != b and MachineParams.for_id(0, seed=0) == a
    assert MachineParams.for_id(0, seed=1) != a


def test_refuses_a_non_empty_output_folder(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an empty directory"):
        write_dataset(out, **SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UsageError, match="not an empty directory"):
        write_dataset(a_file, **SMALL)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(ids=()), "at least one machine ID"),
    (dict(ids=(100,)), "0-99"),
    (dict(ids=(-1,)), "0-99"),
    (dict(ids=(1, 1)), "distinct"),
    (dict(n_train=-1), "n_train"),
    (dict(n_test_anomaly=-3), "n_test_anomaly"),
    (dict(n_train=0, n_test_normal=0, n_test_anomaly=0), "nothing to write"),
    (dict(snr_db=float("nan")), "snr_db"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments_are_usage_errors(kwargs, fragment, tmp_path):
    args = {**SMALL, **kwargs}
    with pytest.raises(UsageError, match=fragment):
        write_dataset(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_unknown_fault_and_bad_severity_are_usage_errors():
    with pytest.raises(UsageError, match="unknown fault"):
        render_clip(0, "gremlins", 0.5, rng=0)
    with pytest.raises(UsageError, match="severity"):
        render_clip(0, "rail_damage", 1.5, rng=0)


def test_cli_writes_a_set_and_rejects_bad_arguments(tmp_path):
    out = tmp_path / "cli-set"
    proc = harken("synth", str(out), "--ids", "5", "--train", "1", "--test-normal", "1",
                  "--test-anomaly", "1", "--seed", "2", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["total_files"] == 3
    assert sorted(p.name for p in (out / "test").iterdir()) == ["anomaly_id_05_00000000.wav",
                                                               "normal_id_05_00000000.wav"]
    for args, fragment in (([str(out)], "not an empty directory"),
                           ([str(tmp_path / "x"), "--ids", "100"], "0-99"),
                           ([str(tmp_path / "y"), "--train", "-1"], "n_train")):
        proc = harken("synth", *args, "--quiet")
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("harken: error:")]
        assert len(errors) == 1 and fragment in errors[0], proc.stderr
