"""EfficientAT mn04 with the real AudioSet weights, through the registry users go through."""

import json

import numpy as np
import pytest
import torch

from monitor.audio import load_audio
from monitor.encoders import efficientat as ea
from monitor.encoders.registry import build_encoder
from monitor.errors import UsageError
from tests.helpers import harken

SPEECH, MUSIC = 0, 137
TYPING_CLASSES = {384, 385, 386}  # Typing, Typewriter, Computer keyboard
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights(shared_data):
    path = shared_data / "weights" / "efficientat" / "mn04_as_mAP_432.pt"
    assert path.is_file(), f"missing {path}"
    return path


@pytest.fixture(scope="module")
def encoder(weights):
    return build_encoder({"name": "efficientat", "weights": str(weights)}, CPU)


@pytest.fixture(scope="module")
def reference_clips(shared_data):
    """speech, music, typing: 32 kHz files read as harken reads everything (16 kHz mono)."""
    ref = shared_data / "audio" / "reference"
    clips = [load_audio(ref / f"{name}.wav") for name in ("speech", "music", "typing")]
    assert all(c.shape == (160_000,) for c in clips)
    return torch.from_numpy(np.stack(clips))


@pytest.fixture(scope="module")
def tags(encoder, reference_clips):
    with torch.inference_mode():
        return encoder.tag(reference_clips)


def test_checkpoint_matches_the_network_key_for_key(weights):
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net = ea.EfficientATNet()
    assert set(net.state_dict()) == set(state)
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # The README's 993,485 counts BN buffers too; learnable parameters are 983,599.
    assert sum(v.numel() for v in state.values()) == 993_485
    assert sum(p.numel() for p in net.parameters()) == 983_599


def test_audioset_labels():
    labels = ea.audioset_labels()
    assert len(labels) == 527
    assert labels[SPEECH] == "Speech" and labels[MUSIC] == "Music"
    assert [labels[i] for i in sorted(TYPING_CLASSES)] == ["Typing", "Typewriter", "Computer keyboard"]


def test_reference_clips_are_tagged_correctly(tags):
    assert tags.shape == (3, 527)
    assert ((tags >= 0) & (tags <= 1)).all()
    assert int(tags[0].argmax()) == SPEECH
    assert int(tags[1].argmax()) == MUSIC
    assert TYPING_CLASSES & set(tags[2].topk(5).indices.tolist())
    assert SPEECH not in tags[2].topk(2).indices.tolist()


def test_clip_alone_equals_clip_in_a_batch(encoder, reference_clips, tags):
    with torch.inference_mode():
        alone = encoder(reference_clips[2:3])
        batch = encoder(reference_clips)
        alone_tags = encoder.tag(reference_clips[2:3])
    torch.testing.assert_close(alone.vector[0], batch.vector[2], atol=1e-4, rtol=0)
    torch.testing.assert_close(alone.feature_map[0], batch.feature_map[2], atol=1e-4, rtol=0)
    torch.testing.assert_close(alone_tags[0], tags[2], atol=1e-4, rtol=0)


@pytest.mark.parametrize("embedding,dim", [("pooled384", 384), ("hidden512", 512), ("both", 896)])
def test_embedding_shapes_and_spec_round_trip(weights, reference_clips, embedding, dim):
    enc = build_encoder({"name": "efficientat", "weights": str(weights), "embedding": embedding}, CPU)
    assert enc.name == "efficientat" and enc.embedding_dim == dim
    with torch.inference_mode():
        out = enc(reference_clips[:2])
    assert out.vector.shape == (2, dim) and out.vector.dtype == torch.float32
    assert out.feature_map.shape == (2, 384, 4, 32)  # 128 mel x 1000 frames, stride 32
    assert torch.isfinite(out.vector).all()

    spec = json.loads(json.dumps(enc.spec()))
    assert spec == {"name": "efficientat", "weights": str(weights), "embedding": embedding,
                    "weights_sha256": "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"}
    again = build_encoder(spec, CPU)
    with torch.inference_mode():
        torch.testing.assert_close(again(reference_clips[:2]).vector, out.vector)


def test_both_is_pooled_then_hidden(weights, reference_clips):
    encs = {e: ea.load_efficientat(weights, embedding=e) for e in ("pooled384", "hidden512", "both")}
    with torch.inference_mode():
        vec = {e: enc(reference_clips[:1]).vector for e, enc in encs.items()}
    torch.testing.assert_close(vec["both"], torch.cat([vec["pooled384"], vec["hidden512"]], 1))
    assert not torch.allclose(vec["pooled384"][:, :10], vec["hidden512"][:, :10])


def test_front_end_shape_and_frames():
    front = ea.EfficientATFrontEnd()
    spec = front(torch.zeros(2, 160_000))
    assert spec.shape == (2, 1, 128, 1000)  # 10 s at 32 kHz, hop 320
    # Silence is the log floor: (log(1e-5) + 4.5) / 5 everywhere.
    torch.testing.assert_close(spec, torch.full_like(spec, (np.log(1e-5) + 4.5) / 5))
    with pytest.raises(UsageError, match="batch, samples"):
        front(torch.zeros(160_000))


def test_default_weights_dir_is_used_when_no_path_is_given(weights, monkeypatch):
    monkeypatch.setenv("HARKEN_WEIGHTS_DIR", str(weights.parent))
    enc = build_encoder({"name": "efficientat"}, CPU)
    # No path in the spec: an artifact finds the weights in the loading machine's weights dir.
    assert enc.spec()["weights"] is None
    assert enc.spec()["weights_sha256"].startswith("899a8c62")


def test_missing_weights_name_the_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HARKEN_WEIGHTS_DIR", str(tmp_path / "empty"))
    with pytest.raises(UsageError, match=r"efficientat weights not found at .*mn04_as_mAP_432\.pt.*harken weights"):
        build_encoder({"name": "efficientat"}, CPU)
    with pytest.raises(UsageError, match="nowhere.pt"):
        build_encoder({"name": "efficientat", "weights": str(tmp_path / "nowhere.pt")}, CPU)


def test_wrong_shape_weights_are_refused_naming_the_file(weights, tmp_path):
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state["classifier.5.weight"] = state["classifier.5.weight"][:10]
    state["classifier.5.bias"] = state["classifier.5.bias"][:10]
    bad = tmp_path / "ten_classes.pt"
    torch.save(state, bad)
    with pytest.raises(UsageError, match=r"ten_classes\.pt: not EfficientAT mn04 weights: 2 wrong shapes"):
        build_encoder({"name": "efficientat", "weights": str(bad)}, CPU)

    del state["classifier.5.weight"]
    torch.save(state, bad)
    with pytest.raises(UsageError, match=r"ten_classes\.pt: .*1 missing \(e\.g\. classifier\.5\.weight\)"):
        build_encoder({"name": "efficientat", "weights": str(bad)}, CPU)


def test_truncated_or_foreign_files_are_refused_naming_the_file(weights, tmp_path):
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(weights.read_bytes()[: 1_000_000])
    with pytest.raises(UsageError, match=r"truncated\.pt: not a readable EfficientAT checkpoint"):
        build_encoder({"name": "efficientat", "weights": str(cut)}, CPU)

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(UsageError, match=r"notes\.pt: not a readable EfficientAT checkpoint"):
        build_encoder({"name": "efficientat", "weights": str(text)}, CPU)

    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], listed)
    with pytest.raises(UsageError, match=r"list\.pt: not an EfficientAT state_dict"):
        build_encoder({"name": "efficientat", "weights": str(listed)}, CPU)


class _Payload:
    """Unpickling this would run code; weights_only must refuse it before that."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('pickled code ran')",))


def test_pickled_code_is_refused_not_executed(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"features.0.0.weight": _Payload()}, evil)
    with pytest.raises(UsageError, match=r"evil\.pt: not a readable EfficientAT checkpoint"):
        ea.load_efficientat(evil)


def test_bad_embedding_and_changed_weights_are_usage_errors(weights):
    with pytest.raises(UsageError, match="pooled384, hidden512, both"):
        build_encoder({"name": "efficientat", "weights": str(weights), "embedding": "pooled"}, CPU)
    with pytest.raises(UsageError, match="differ from the 000000000000... the model was trained with"):
        ea.load_efficientat(weights, expected_sha256="0" * 64)


def test_bf16_autocast_keeps_the_front_end_in_float32(encoder, reference_clips, tags):
    # harken bench / the daemon may run the encoder under bf16 autocast.
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        spec = encoder.front(reference_clips[:1])
        low = encoder.tag(reference_clips[:2]).float()
    assert spec.dtype == torch.float32
    assert int(low[0].argmax()) == SPEECH and int(low[1].argmax()) == MUSIC
    torch.testing.assert_close(low, tags[:2], atol=0.05, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_same_tags(weights, reference_clips, tags):
    enc = build_encoder({"name": "efficientat", "weights": str(weights)}, torch.device("cuda"))
    with torch.inference_mode():
        gpu = enc.tag(reference_clips.cuda()).cpu()
        vec = enc(reference_clips.cuda()).vector.cpu()
        cpu_vec = build_encoder({"name": "efficientat", "weights": str(weights)}, CPU)(
            reference_clips).vector
    assert gpu.argmax(1).tolist() == [SPEECH, MUSIC, int(tags[2].argmax())]
    torch.testing.assert_close(gpu, tags, atol=1e-3, rtol=0)
    torch.testing.assert_close(vec, cpu_vec, atol=1e-3, rtol=1e-3)


def test_cli_trains_and_evaluates_an_efficientat_knn_model(tone_data, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("HARKEN_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    proc = harken("train", "--data", str(tone_data), "--out", str(model), "--encoder", "efficientat",
                  "--weights", str(weights), "--scorer", "knn", "--device", "cpu", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_windows"] == 20
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["name"] == "efficientat+knn"
    assert manifest["encoder"]["weights_sha256"].startswith("899a8c62")
    assert manifest["normalisation"]["dim"] == 384

    proc = harken("evaluate", "--model", str(model), "--data", str(tone_data), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["n_normal"] == 8 and metrics["n_anomaly"] == 8
    # A 3 kHz whine plus clicks on a hum is far from the normal hums in AudioSet features.
    assert metrics["auc"] >= 0.9, metrics
