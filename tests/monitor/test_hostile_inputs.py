"""Hostile files: a crafted artifact must not execute code; random bytes must not crash the reader."""

import io
import json
import os
import pickle
import shutil
import wave

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.artifact import sha256_file
from monitor.audio import read_wav, to_mono_16k
from monitor.detector import Detector
from monitor.errors import ArtifactError, AudioError, UsageError


class _Boom:
    def __reduce__(self):  # unpickling this would create the marker file
        return (open, ("/tmp/harken-pwned-marker", "w"))


def test_pickled_tensor_file_is_refused_without_running_it(tiny_model, tmp_path):
    marker = "/tmp/harken-pwned-marker"
    if os.path.exists(marker):
        os.remove(marker)
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    payload = pickle.dumps({"weights": _Boom()})
    (model / "model.safetensors").write_bytes(payload)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["tensors_sha256"] = sha256_file(model / "model.safetensors")  # hash matches the bomb
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unreadable safetensors"):
        Detector.load(model, device="cpu")
    assert not os.path.exists(marker)


def test_manifest_cannot_name_arbitrary_code(tiny_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["encoder"]["name"] = "os.system"
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="unknown encoder 'os.system'"):
        Detector.load(model, device="cpu")


def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=4096), cut=st.integers(0, 4096), flip=st.integers(0, 4095))
def test_reader_survives_random_and_mangled_bytes(tmp_path, data, cut, flip):
    good = _wav_bytes(np.arange(2000) % 300 * 50, 16000)
    candidates = [data, good[:cut], good[:flip] + bytes([good[flip % len(good)] ^ 0xFF]) + good[flip + 1:]]
    for i, blob in enumerate(candidates):
        path = tmp_path / f"f{i}.wav"
        path.write_bytes(blob)
        try:
            samples, rate = read_wav(path)
            mono = to_mono_16k(samples, rate, source=str(path))
        except AudioError as exc:
            assert str(path) in str(exc) or "Hz" in str(exc) or "NaN" in str(exc)
        else:
            assert mono.dtype == np.float32 and mono.ndim == 1 and np.isfinite(mono).all()
