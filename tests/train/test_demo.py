"""The demo's optional pretrained step: used when efficientat's weights are in the weights
directory, skipped with the command that gets them otherwise (never a download)."""

from train.demo import run_pretrained_step


def test_pretrained_step_is_skipped_with_a_hint_without_weights(tmp_path, monkeypatch, tone_data):
    monkeypatch.setenv("HARKEN_WEIGHTS_DIR", str(tmp_path / "empty"))
    out = run_pretrained_step(tone_data, tmp_path / "m", progress=False)
    assert out["metrics"] is None and "harken weights fetch efficientat" in out["note"]
    assert not (tmp_path / "m").exists()


def test_pretrained_step_trains_efficientat_from_the_weights_directory(tmp_path, monkeypatch,
                                                                        tone_data, shared_data):
    monkeypatch.setenv("HARKEN_WEIGHTS_DIR", str(shared_data / "weights" / "efficientat"))
    monkeypatch.setenv("HARKEN_CACHE_DIR", str(tmp_path / "cache"))
    out = run_pretrained_step(tone_data, tmp_path / "m", progress=False)
    assert out["metrics"]["model"] == "efficientat+mahalanobis"
    assert out["metrics"]["auc"] > 0.9  # the tone anomalies are obvious to a pretrained tagger
