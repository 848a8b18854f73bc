"""The fast inference path (`Detector.features` / `score_windows`): bf16 autocast against fp32,
batched against one window at a time, and the precision option's errors.

Tolerance of the bf16 path (stated in the README too): every score of a bf16 detector lies
within BF16_SCORE_RTOL (5 %) of the fp32 detector's score for the same window, relative to the
larger of that score and the detector's threshold. bf16 keeps 8 mantissa bits (about 0.4 %
per operation); the front ends stay in fp32 under autocast, so the error comes from the network.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.audio import load_audio
from monitor.detector import Detector
from monitor.errors import UsageError
from tests.zoo_fixtures import write_tiny_ast

BF16_SCORE_RTOL = 0.05
BATCH_RTOL = 1e-4  # batched vs single windows in fp32: summation order only


def _fit(data, out, **cfg) -> Detector:
    from train.config import TrainConfig
    from train.fit import fit_model

    config = TrainConfig(scorers=("knn", "mahalanobis"), embedding_cache="off", **cfg).validate()
    fit_model(data, out, config, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def efficientat_model(tmp_path_factory, tone_data, shared_data):
    weights = shared_data / "weights" / "efficientat" / "mn04_as_mAP_432.pt"
    assert weights.is_file(), f"real EfficientAT weights missing at {weights}"
    return _fit(tone_data, tmp_path_factory.mktemp("ea") / "model", encoder="efficientat",
                weights=str(weights))


@pytest.fixture(scope="module")
def tiny_ast_model(tmp_path_factory, tone_data):
    root = tmp_path_factory.mktemp("ast")
    weights = write_tiny_ast(root / "ast-weights")
    return _fit(tone_data, root / "model", encoder="ast", weights=str(weights))


@pytest.fixture(scope="module")
def windows(shared_data, tone_data):
    """Real everyday sounds and a machine recording, plus two training-like tones."""
    ref = shared_data / "audio" / "reference"
    clips = [load_audio(ref / f"{n}.wav")[:160_000] for n in ("speech", "music", "typing")]
    fan = sorted((shared_data / "audio" / "dcase2020-dev-sample").glob("fan__*.wav"))[0]
    clips.append(load_audio(fan)[:160_000])
    clips += [load_audio(p)[:160_000] for p in sorted((tone_data / "test").glob("*.wav"))[:2]]
    return np.stack(clips).astype(np.float32)


def _assert_close_scores(fast: np.ndarray, exact: np.ndarray, threshold: float, rtol: float):
    scale = np.maximum(np.abs(exact), abs(threshold))
    worst = float(np.max(np.abs(fast - exact) / scale))
    assert worst <= rtol, f"scores differ by {worst:.4f} (relative) > {rtol}: {fast} vs {exact}"


@pytest.mark.parametrize("model", ["efficientat_model", "tiny_ast_model"])
def test_bf16_scores_match_fp32_within_tolerance(request, model, windows):
    path = request.getfixturevalue(model)
    exact = Detector.load(path, device="cpu")
    fast = Detector.load(path, device="cpu", precision="bf16")
    s32 = exact.score_windows(windows)
    s16 = fast.score_windows(windows)
    assert s16.dtype == np.float64 and s16.shape == (len(windows),)
    _assert_close_scores(s16, s32, exact.threshold, BF16_SCORE_RTOL)
    # The autocast really ran: bf16 embeddings are not bit-identical to fp32 ones.
    assert not torch.equal(fast.embed(windows[:2]), exact.embed(windows[:2]))


@pytest.mark.parametrize("model", ["efficientat_model", "tiny_ast_model"])
def test_batched_scores_equal_single_window_scores(request, model, windows):
    det = Detector.load(request.getfixturevalue(model), device="cpu")
    batched = det.score_windows(windows)
    single = np.concatenate([det.score_windows(w[None]) for w in windows])
    _assert_close_scores(batched, single, det.threshold, BATCH_RTOL)


def test_precision_option_rejects_bad_values(tiny_model):
    with pytest.raises(UsageError, match="precision must be one of"):
        Detector.load(tiny_model, device="cpu", precision="int8")
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        Detector.load(tiny_model, device="cpu", precision="fp16")
    det = Detector.load(tiny_model, device="cpu", precision="bf16")
    assert det.precision == "bf16" and det.autocast_dtype is torch.bfloat16
    assert not det.pin_memory  # pinned host memory only for CUDA transfers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_scores_match_fp32(efficientat_model, windows):  # untested here: no GPU
    exact = Detector.load(efficientat_model, device="cpu")
    fast = Detector.load(efficientat_model, device="cuda", precision="fp16")
    _assert_close_scores(fast.score_windows(windows), exact.score_windows(windows),
                         exact.threshold, BF16_SCORE_RTOL)
