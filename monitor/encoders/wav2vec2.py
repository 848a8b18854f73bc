"""`wav2vec2`: wav2vec 2.0 (Baevski et al., 2020) as a frozen encoder.

transformers' `Wav2Vec2Model` on local weights (default facebook/wav2vec2-base, self-supervised
on LibriSpeech). Each clip is normalised to zero mean and unit variance, as
`Wav2Vec2FeatureExtractor` does when `do_normalize` is set; the clip embedding is the mean of
the last hidden state over time, and the hidden states are also returned as a time-only
feature map (batch, hidden, 1, frames) for the cnn decoder.
"""

from __future__ import annotations

import torch

from monitor.audio import SAMPLE_RATE_HZ
from monitor.encoders.base import Embedding, PretrainedEncoder
from monitor.errors import UsageError
from monitor.logs import get_logger
from monitor.weights.store import check_pinned_sha256, locate, weights_sha256
from monitor.weights.checkpoints import load_hf_model, read_preprocessor_config


class Wav2Vec2Encoder(PretrainedEncoder):
    name = "wav2vec2"

    def __init__(self, model, weights: str | None = None, weights_sha256: str | None = None,
                 normalize: bool = True):
        super().__init__(weights, weights_sha256)
        self.model = model
        self.normalize = bool(normalize)
        self.embedding_dim = int(model.config.hidden_size)
        self.freeze()

    def forward(self, waves: torch.Tensor) -> Embedding:
        if waves.ndim != 2:
            raise UsageError(f"wav2vec2 expects (batch, samples) audio, got shape {tuple(waves.shape)}")
        x = waves.float()
        if self.normalize:  # Wav2Vec2FeatureExtractor: (x - mean) / sqrt(var + 1e-7), per clip
            x = (x - x.mean(dim=1, keepdim=True)) / torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + 1e-7)
        hidden = self.model(input_values=x).last_hidden_state  # (batch, frames, hidden)
        return Embedding(vector=hidden.mean(dim=1),
                         feature_map=hidden.transpose(1, 2).unsqueeze(2))  # (batch, hidden, 1, frames)

    def spec_params(self) -> dict:
        return {"normalize": self.normalize}


def build_wav2vec2(spec: dict, device: torch.device) -> Wav2Vec2Encoder:
    from transformers import Wav2Vec2Model

    path = locate("wav2vec2", spec.get("weights"))
    model = load_hf_model(Wav2Vec2Model, "wav2vec2", path, "wav2vec2", attn_implementation="sdpa")
    digest = weights_sha256(path)
    check_pinned_sha256("wav2vec2", path, digest, spec.get("weights_sha256"))
    pre = read_preprocessor_config(path)
    rate = int(pre.get("sampling_rate", SAMPLE_RATE_HZ))
    if rate != SAMPLE_RATE_HZ:
        raise UsageError(f"{path / 'preprocessor_config.json'}: model expects {rate} Hz audio but "
                         f"harken feeds {SAMPLE_RATE_HZ} Hz")
    enc = Wav2Vec2Encoder(model, str(spec["weights"]) if spec.get("weights") else None, digest,
                          normalize=bool(spec.get("normalize", pre.get("do_normalize", True))))
    get_logger(stage="encoder").info("encoder_loaded", encoder="wav2vec2", path=str(path),
                                     dim=enc.embedding_dim, device=str(device))
    return enc.to(device)
