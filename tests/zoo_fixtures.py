"""Tiny random-initialised pretrained-encoder weights in the real on-disk formats.

Each writer produces what `harken weights fetch` would put on disk, at a size a test can afford:
a Hugging Face model directory (config.json + model.safetensors + preprocessor_config.json,
saved with `save_pretrained` from the same head class as the published checkpoint) or a PANNs
`.pth` holding `{'model': state_dict}` with CNN14's real key names.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_PANNS_WIDTHS = (4, 8, 8, 16, 16, 32)
TINY_DIMS = {"ast": 32, "wav2vec2": 32, "resnet50": 32, "panns": 32}


def write_tiny_ast(out: Path, seed: int = 0) -> Path:
    """ASTForAudioClassification, as MIT/ast-finetuned-audioset-10-10-0.4593 is saved."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(seed)
    cfg = ASTConfig(hidden_size=TINY_DIMS["ast"], num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=4)
    model = ASTForAudioClassification(cfg).eval()
    with torch.no_grad():  # HF zero-initialises these; random values make the test stricter
        emb = model.audio_spectrogram_transformer.embeddings
        for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    ASTFeatureExtractor().save_pretrained(out)
    return Path(out)


def write_tiny_wav2vec2(out: Path, seed: int = 0) -> Path:
    """Wav2Vec2ForPreTraining, as facebook/wav2vec2-base is saved."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(hidden_size=TINY_DIMS["wav2vec2"], num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7,
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                         num_codevectors_per_group=8, codevector_dim=16, proj_codevector_dim=16)
    Wav2Vec2ForPreTraining(cfg).eval().save_pretrained(out)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(out)
    return Path(out)


def write_tiny_resnet50(out: Path, seed: int = 0) -> Path:
    """ResNetForImageClassification (bottleneck blocks), as microsoft/resnet-50 is saved."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, TINY_DIMS["resnet50"]],
                       depths=[1, 1, 1, 1], layer_type="bottleneck", num_labels=3)
    ResNetForImageClassification(cfg).eval().save_pretrained(out)
    return Path(out)


def write_tiny_panns(out: Path, seed: int = 0) -> Path:
    """A 16 kHz CNN14 checkpoint with PANNs' keys at tiny widths: {'model': state_dict}."""
    from monitor.encoders.panns import Cnn14Net

    torch.manual_seed(seed)
    net = Cnn14Net(widths=TINY_PANNS_WIDTHS, embedding_dim=TINY_DIMS["panns"])
    with torch.no_grad():  # BatchNorm statistics as a trained model has them, not 0/1
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "iteration": 0}, out)
    return out


WRITERS = {"ast": write_tiny_ast, "wav2vec2": write_tiny_wav2vec2,
           "resnet50": write_tiny_resnet50, "panns": write_tiny_panns}


def write_tiny(encoder: str, root: Path) -> Path:
    """Tiny weights for `encoder` under root, named as the weights directory names them."""
    from monitor.weights.store import KNOWN

    return WRITERS[encoder](Path(root) / KNOWN[encoder].name)
