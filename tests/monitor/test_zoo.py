"""The pretrained encoders (ast, panns, wav2vec2, resnet50) on tiny random weights saved in the
real on-disk formats, loaded through the registry as users load them. No network anywhere."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.audio import load_audio, split_windows
from monitor.encoders.registry import build_encoder
from monitor.errors import UsageError
from tests.zoo_fixtures import TINY_DIMS, write_tiny

REPO = Path(__file__).resolve().parents[2]
ZOO = ("ast", "panns", "wav2vec2", "resnet50")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-zoo")
    return {name: write_tiny(name, root) for name in ZOO}


def _waves(batch: int = 3, seconds: float = 10.0, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    n = int(16_000 * seconds)
    t = np.arange(n) / 16_000
    x = 0.05 * rng.standard_normal((batch, n))
    x += 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000, (batch, 1)) * t)
    return torch.from_numpy(x.astype(np.float32))


# --------------------------------------------------------------------------- every encoder


@pytest.mark.parametrize("name", ZOO)
def test_encoder_loads_from_its_real_format_frozen_with_a_spec_that_rebuilds_it(name, tiny):
    enc = build_encoder({"name": name, "weights": str(tiny[name])}, CPU)
    assert enc.name == name and enc.embedding_dim == TINY_DIMS[name]
    assert not enc.training
    assert all(not p.requires_grad for p in enc.parameters())
    waves = _waves(3)
    with torch.inference_mode():
        out = enc(waves)
    assert out.vector.shape == (3, enc.embedding_dim) and out.vector.dtype == torch.float32
    assert torch.isfinite(out.vector).all()
    assert out.feature_map.ndim == 4 and out.feature_map.shape[:2] == (3, enc.embedding_dim)
    # different clips give different embeddings (the weights were really loaded and used)
    assert not torch.allclose(out.vector[0], out.vector[1])

    spec = json.loads(json.dumps(enc.spec()))  # what the artifact manifest stores
    assert spec["name"] == name and spec["weights"] == str(tiny[name])
    assert len(spec["weights_sha256"]) == 64
    again = build_encoder(spec, CPU)
    with torch.inference_mode():
        torch.testing.assert_close(again(waves).vector, out.vector)
        # batching does not change a clip's embedding
        torch.testing.assert_close(enc(waves[1:2]).vector, out.vector[1:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ZOO)
def test_default_lookup_in_the_weights_dir_and_the_missing_weights_message(name, tiny, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("HARKEN_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(UsageError, match=rf"{name} weights not found at {tmp_path}.*harken weights "
                                         rf"import {name} PATH"):
        build_encoder({"name": name}, CPU)
    monkeypatch.setenv("HARKEN_WEIGHTS_DIR", str(tiny[name].parent))
    enc = build_encoder({"name": name}, CPU)
    assert enc.spec()["weights"] is None  # the artifact finds them in whatever dir a machine has


@pytest.mark.parametrize("name", ZOO)
def test_weights_other_than_the_pinned_ones_are_refused(name, tiny):
    spec = {"name": name, "weights": str(tiny[name]), "weights_sha256": "0" * 64}
    with pytest.raises(UsageError, match="differ from the 000000000000... the model was trained with"):
        build_encoder(spec, CPU)


@pytest.mark.parametrize("name", ["ast", "wav2vec2", "resnet50"])
def test_corrupted_or_foreign_hf_weights_name_the_file(name, tiny, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny[name], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UsageError, match=rf"{weights}: cannot be loaded as {name} weights"):
        build_encoder({"name": name, "weights": str(bad)}, CPU)

    other = "resnet50" if name != "resnet50" else "ast"
    with pytest.raises(UsageError, match=rf"config.json: model_type .* these are not {name} weights"):
        build_encoder({"name": name, "weights": str(tiny[other])}, CPU)
    with pytest.raises(UsageError, match="Hugging Face model directory"):
        build_encoder({"name": name, "weights": str(tiny["panns"])}, CPU)


def test_corrupted_or_foreign_panns_checkpoints_name_the_file(tiny, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny["panns"].read_bytes()[:5000])
    with pytest.raises(UsageError, match=rf"{truncated}: not a readable PANNs checkpoint"):
        build_encoder({"name": "panns", "weights": str(truncated)}, CPU)

    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, foreign)
    with pytest.raises(UsageError, match=rf"{foreign}: not a PANNs CNN14 checkpoint"):
        build_encoder({"name": "panns", "weights": str(foreign)}, CPU)

    state = torch.load(tiny["panns"], weights_only=True)["model"]
    del state["fc1.bias"]
    partial = tmp_path / "partial.pth"
    torch.save({"model": state}, partial)
    with pytest.raises(UsageError, match=rf"{partial}: not CNN14 weights: 1 missing \(e.g. fc1.bias\)"):
        build_encoder({"name": "panns", "weights": str(partial)}, CPU)


def test_a_pickled_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(UsageError, match=rf"{evil}: not a readable PANNs checkpoint"):
        build_encoder({"name": "panns", "weights": str(evil)}, CPU)
    assert not marker.exists()


# --------------------------------------------------------------------------- ast


def test_batched_fbank_equals_ast_feature_extractor(tiny, shared_data):
    from transformers import ASTFeatureExtractor

    enc = build_encoder({"name": "ast", "weights": str(tiny["ast"])}, CPU)
    fe = ASTFeatureExtractor()  # built from its defaults: no download
    real = split_windows(load_audio(next((shared_data / "audio" / "dcase2020-dev-sample").glob(
        "fan__normal_*.wav"))))[:1]
    waves = np.concatenate([_waves(2).numpy(), real, np.zeros_like(real)])
    waves[1, 40_000:] = 0.0  # partly silent: the log floor
    ref = fe(list(waves), sampling_rate=16_000, return_tensors="pt")["input_values"]
    with torch.inference_mode():
        ours = enc.input_values(torch.from_numpy(waves))
    assert ours.shape == ref.shape == (4, 1024, 128)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    # a short clip: fewer frames, zero-padded before normalising, like the extractor
    short = waves[:1, :48_000]
    ref_short = fe(list(short), sampling_rate=16_000, return_tensors="pt")["input_values"]
    with torch.inference_mode():
        torch.testing.assert_close(enc.input_values(torch.from_numpy(short)), ref_short,
                                   rtol=1e-5, atol=1e-4)


def test_ast_outputs_are_the_pooled_tokens_and_the_patch_grid(tiny):
    from transformers import ASTModel

    enc = build_encoder({"name": "ast", "weights": str(tiny["ast"])}, CPU)
    assert enc.model.config._attn_implementation == "sdpa"
    eager = ASTModel.from_pretrained(str(tiny["ast"]), local_files_only=True,
                                     attn_implementation="eager").eval()
    waves = _waves(2)
    with torch.inference_mode():
        out = enc(waves)
        ref = eager(input_values=enc.input_values(waves))
    torch.testing.assert_close(out.vector, ref.pooler_output, rtol=1e-4, atol=1e-5)
    f, t = 12, 101  # (128 - 16) // 10 + 1, (1024 - 16) // 10 + 1
    assert out.feature_map.shape == (2, TINY_DIMS["ast"], f, t)
    tokens = ref.last_hidden_state
    for fi, ti in ((0, 0), (3, 7), (11, 100)):
        torch.testing.assert_close(out.feature_map[:, :, fi, ti], tokens[:, 2 + fi * t + ti],
                                   rtol=1e-4, atol=1e-5)


def test_ast_attention_rollout_matches_eager_attention_probabilities(tiny):
    from transformers import ASTModel

    enc = build_encoder({"name": "ast", "weights": str(tiny["ast"])}, CPU)
    waves = _waves(2, seed=3)
    with torch.inference_mode():
        roll = enc.attention_rollout(waves)
        eager = ASTModel.from_pretrained(str(tiny["ast"]), local_files_only=True,
                                         attn_implementation="eager").eval()
        atts = eager(input_values=enc.input_values(waves), output_attentions=True).attentions
    assert len(atts) == 2
    expected = None
    for a in atts:  # the rollout recipe, on transformers' own attention probabilities
        a = 0.5 * a.mean(1) + 0.5 * torch.eye(a.shape[-1])
        a = a / a.sum(-1, keepdim=True)
        expected = a if expected is None else a @ expected
    expected = expected[:, :2, 2:].mean(1).reshape(2, 12, 101)[:, :, :100]  # 998 real frames
    expected = expected / expected.amax(dim=(1, 2), keepdim=True)
    assert roll.shape == (2, 12, 100)
    torch.testing.assert_close(roll, expected, rtol=1e-4, atol=1e-5)
    assert float(roll.amax()) == pytest.approx(1.0)


# --------------------------------------------------------------------------- panns


def test_cnn14_has_panns_key_layout_and_forward(tiny):
    from monitor.encoders.panns import Cnn14Net, panns_models

    m = panns_models()
    # full size (80 M parameters, about 2 s): the layout a published checkpoint has
    real = m.Cnn14(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50,
                   fmax=8000, classes_num=527)
    layout = {k: v.shape for k, v in real.state_dict().items()}
    del real
    assert {k: v.shape for k, v in Cnn14Net().state_dict().items()} == layout

    enc = build_encoder({"name": "panns", "weights": str(tiny["panns"])}, CPU)
    waves = _waves(2, seconds=3.0)
    with torch.inference_mode():
        ref = m.Cnn14.forward(enc.net, waves)["embedding"]  # PANNs' own forward, same module
        out = enc(waves)
    torch.testing.assert_close(out.vector, ref)
    assert out.feature_map.shape == (2, TINY_DIMS["panns"], 2, 9)  # (mel 64 / 32, frames 301 / 32)


def test_panns_import_runs_no_wget_and_leaves_no_files(tiny, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "wget-called"
    wget = bin_dir / "wget"
    wget.write_text(f"#!/bin/sh\necho \"$@\" > {called}\nexit 1\n")
    wget.chmod(0o755)
    code = ("import sys, torch\n"
            "from monitor.encoders.registry import build_encoder\n"
            f"enc = build_encoder({{'name': 'panns', 'weights': {str(tiny['panns'])!r}}}, "
            "torch.device('cpu'))\n"
            "print(enc(torch.zeros(1, 16000)).vector.shape[1])\n"
            "print('panns_inference' in sys.modules)\n")
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "MPLCONFIGDIR": str(tmp_path / "mpl"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(TINY_DIMS["panns"]), "False"]
    assert not called.exists(), "wget was run"
    assert not (home / "panns_data").exists()
    assert sorted(p.name for p in home.iterdir()) == []


# --------------------------------------------------------------------------- wav2vec2 and resnet50


def test_wav2vec2_normalises_each_clip_as_its_feature_extractor_does(tiny):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    enc = build_encoder({"name": "wav2vec2", "weights": str(tiny["wav2vec2"])}, CPU)
    fe = Wav2Vec2FeatureExtractor.from_pretrained(str(tiny["wav2vec2"]), local_files_only=True)
    model = Wav2Vec2Model.from_pretrained(str(tiny["wav2vec2"]), local_files_only=True).eval()
    waves = _waves(2) * torch.tensor([[1.0], [7.0]]) + 0.2  # loudness and offset differ
    x = fe(list(waves.numpy()), sampling_rate=16_000, return_tensors="pt")["input_values"]
    with torch.inference_mode():
        ref = model(input_values=x).last_hidden_state
        out = enc(waves)
    torch.testing.assert_close(out.vector, ref.mean(1), rtol=1e-4, atol=1e-4)
    assert out.feature_map.shape == (2, TINY_DIMS["wav2vec2"], 1, ref.shape[1])


def test_resnet50_sees_the_log_mel_as_an_imagenet_normalised_picture(tiny):
    from monitor.encoders.resnet50 import IMAGENET_MEAN, IMAGENET_STD

    enc = build_encoder({"name": "resnet50", "weights": str(tiny["resnet50"])}, CPU)
    waves = _waves(2)
    with torch.inference_mode():
        px = enc.pixels(waves)
        out = enc(waves)
    assert px.shape == (2, 3, 224, 224)
    unit = px * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    for c in unit:  # per clip, every channel spans [0, 1] (bilinear resizing blurs the extremes)
        assert -1e-5 <= float(c.amin()) < 0.05 and 0.95 < float(c.amax()) <= 1.0 + 1e-5
    assert out.feature_map.shape == (2, TINY_DIMS["resnet50"], 7, 7)
