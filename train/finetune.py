"""`harken train --fine-tune`: train a pretrained encoder and the cnn decoder end to end.

The frozen path (`train.fit`) embeds once and trains the decoder on cached feature maps. This
second phase starts from that decoder, keeps the training windows' waveforms in memory (float32,
10 s at 16 kHz = 640 kB a window: fine for the few hundred to few thousand windows one machine's
normal recordings give; a full DCASE section would need a streaming loader) and trains both on
waves. The target is the standardised log-mel image, which the encoder cannot change, so the
encoder cannot make the loss trivially small by collapsing its features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from monitor.audio import split_windows
from monitor.decoders import pool_map
from monitor.detector import encode
from monitor.encoders.base import Encoder
from monitor.errors import UsageError
from monitor.labels import ClipInfo
from monitor.logs import get_logger
from monitor.replay import SkipCounter, load_checked
from monitor.scorers import ReconScorer
from train.config import TrainConfig

# Encoders that have no weights of their own: the mel image, and `conv`, whose learnt stem is
# already part of the decoder and trained with it.
NOT_TUNABLE = ("mel", "conv")


@dataclass(frozen=True)
class FineTuneEpoch:
    epoch: int
    train_loss: float
    val_loss: float
    encoder_lr: float


@dataclass(frozen=True)
class FineTuneResult:
    history: list[FineTuneEpoch]
    val_loss_before: float  # held-out loss of the frozen encoder + warmed-up decoder
    val_loss_after: float  # held-out loss of the weights kept (the best epoch, or the start)
    best_epoch: int  # 0: no epoch beat the frozen start, the encoder is unchanged


def check_fine_tune_config(cfg: TrainConfig) -> None:
    """Fine-tuning needs a target the encoder cannot match by itself: the cnn decoder's mel image."""
    if not cfg.fine_tune:
        return
    if cfg.encoder in NOT_TUNABLE:
        raise UsageError(f"--fine-tune needs a pretrained encoder with weights to tune "
                         f"(efficientat, ast, panns, wav2vec2, resnet50); {cfg.encoder!r} has none")
    if cfg.decoder != "cnn" or cfg.scorer_names != ("recon",):
        raise UsageError(f"--fine-tune works only with --decoder cnn and the recon scorer alone "
                         f"(got decoder {cfg.decoder!r}, scorers {','.join(cfg.scorer_names)}): other "
                         f"targets are the encoder's own output, which tuning would collapse")


def trainable_parameters(encoder: Encoder) -> dict[str, torch.nn.Parameter]:
    params = dict(encoder.named_parameters()) if isinstance(encoder, torch.nn.Module) else {}
    if not params:
        raise UsageError(f"encoder {encoder.name} has no trainable parameters to fine-tune")
    return params


def tuned_encoder_tensors(encoder: Encoder) -> dict[str, torch.Tensor]:
    """The artifact's `encoder.<name>` tensors: every parameter (buffers such as BatchNorm
    statistics stay as the pretrained weights have them: the encoder is tuned in eval mode)."""
    return {f"encoder.{k}": p.detach().cpu().contiguous() for k, p in encoder.named_parameters()}


def load_window_waves(clips: list[ClipInfo], window_s: float, hop_s: float | None) -> torch.Tensor:
    """(windows, samples) float32 for the embedded set's clips, in its window order.

    `clips` has one entry per window (EmbeddedSet.clips), so the row count is checked against it.
    """
    log = get_logger(stage="finetune")
    skips = SkipCounter()
    parts: list[np.ndarray] = []
    for clip in dict.fromkeys(clips):  # unique clips, in the embedded order
        mono = load_checked(clip.path, skips, log)
        if mono is None:
            raise UsageError(f"{clip.path}: readable when embedded but not now; was it changed?")
        parts.append(split_windows(mono, window_s, hop_s).astype(np.float32, copy=False))
    waves = torch.from_numpy(np.concatenate(parts))
    if waves.shape[0] != len(clips):
        raise UsageError(f"{waves.shape[0]} windows loaded for fine-tuning but {len(clips)} were "
                         f"embedded; did the data change during training?")
    return waves


def _target(scorer: ReconScorer, images: torch.Tensor) -> torch.Tensor:
    st = scorer.stats
    return (images - st["image_mean"].to(images)[:, None]) / st["image_std"].to(images)[:, None]


def _decoder_input(scorer: ReconScorer, encoder: Encoder, waves: torch.Tensor) -> torch.Tensor:
    """The same path as ReconScorer.prepare, with gradients through the encoder."""
    out = encoder(waves)
    if out.feature_map is None:
        raise UsageError(f"encoder {encoder.name} has no feature map for the cnn decoder")
    fmap = pool_map(out.feature_map.float())  # (batch, C, f, t)
    st = scorer.stats
    return (fmap - st["map_mean"].to(fmap)[:, None, None]) / st["map_std"].to(fmap)[:, None, None]


def _held_out_loss(scorer: ReconScorer, encoder: Encoder, waves: torch.Tensor,
                   targets: torch.Tensor, device: torch.device, batch_size: int) -> float:
    scorer.model.eval()
    total = 0.0
    with torch.inference_mode():
        for i in range(0, waves.shape[0], batch_size):
            x = _decoder_input(scorer, encoder, waves[i : i + batch_size].to(device))
            y = targets[i : i + batch_size].to(device)
            total += float(((scorer.model(x) - y) ** 2).flatten(1).mean(dim=1).sum())
    return total / waves.shape[0]


def fine_tune_encoder(encoder: Encoder, scorer: ReconScorer, waves_train: torch.Tensor,
                      images_train: torch.Tensor, waves_val: torch.Tensor, images_val: torch.Tensor,
                      cfg: TrainConfig, device: torch.device, progress: bool = True) -> FineTuneResult:
    """Adam (encoder at fine_tune_lr, decoder at learning_rate), ReduceLROnPlateau and early
    stopping on the held-out loss; keeps the best encoder and decoder weights, which may be the
    frozen start. The decoder's map and image statistics stay fixed: the decoder was warmed up
    with them, and the tuned encoder learns to feed it through them.
    """
    log = get_logger(stage="finetune")
    params = trainable_parameters(encoder)
    model = scorer.model.to(device)
    # eval: BatchNorm keeps its pretrained statistics (batches of a few 10 s windows would
    # ruin them) and dropout stays off; the parameters still learn.
    encoder.eval()
    encoder.requires_grad_(True)
    y_train, y_val = _target(scorer, images_train), _target(scorer, images_val)
    opt = torch.optim.Adam([{"params": list(params.values()), "lr": cfg.fine_tune_lr},
                            {"params": list(model.parameters()), "lr": cfg.learning_rate}])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = cfg.fine_tune_batch_size

    def snapshot() -> tuple[dict, dict]:
        return ({k: p.detach().clone() for k, p in params.items()},
                {k: v.detach().clone() for k, v in model.state_dict().items()})

    before = _held_out_loss(scorer, encoder, waves_val, y_val, device, batch)
    best, best_epoch, best_state, since_best = before, 0, snapshot(), 0
    log.info("fine_tune_started", windows=int(waves_train.shape[0]), parameters=sum(
        p.numel() for p in params.values()), val_loss=round(before, 6), encoder_lr=cfg.fine_tune_lr)
    history: list[FineTuneEpoch] = []
    epochs = cfg.fine_tune_epochs or cfg.max_epochs
    bar = tqdm(range(1, epochs + 1), unit="epoch", desc="fine-tuning", disable=not progress,
               leave=False)
    try:
        for epoch in bar:
            model.train()
            order = torch.randperm(waves_train.shape[0], generator=gen)
            total, seen = 0.0, 0
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                if len(idx) < 2:
                    continue  # the decoder's BatchNorm cannot train on a batch of one
                x = _decoder_input(scorer, encoder, waves_train[idx].to(device))
                loss = ((model(x) - y_train[idx].to(device)) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                seen += len(idx)
            val = _held_out_loss(scorer, encoder, waves_val, y_val, device, batch)
            sched.step(val)
            entry = FineTuneEpoch(epoch, total / max(seen, 1), val, opt.param_groups[0]["lr"])
            history.append(entry)
            log.info("fine_tune_epoch_done", epoch=epoch, train_loss=round(entry.train_loss, 6),
                     val_loss=round(val, 6), encoder_lr=entry.encoder_lr)
            bar.set_postfix(train=f"{entry.train_loss:.4f}", val=f"{val:.4f}")
            if val < best - cfg.early_stop_min_delta:
                best, best_epoch, best_state, since_best = val, epoch, snapshot(), 0
            else:
                since_best += 1
                if since_best >= cfg.early_stop_patience:
                    log.info("fine_tune_early_stop", epoch=epoch, best_val_loss=round(best, 6))
                    break
    finally:
        bar.close()
        encoder.requires_grad_(False)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(best_state[0][k])
    model.load_state_dict(best_state[1])
    model.eval()
    encoder.eval()
    if best_epoch == 0:
        log.warning("fine_tune_no_gain", epochs=len(history), val_loss=round(before, 6),
                    hint="no epoch beat the frozen encoder; try a larger fine_tune_lr or more epochs")
    log.info("fine_tune_done", epochs=len(history), best_epoch=best_epoch,
             val_loss_before=round(before, 6), val_loss_after=round(best, 6))
    return FineTuneResult(history, before, best if math.isfinite(best) else before, best_epoch)


def re_embed(encoder: Encoder, waves: torch.Tensor, device: torch.device,
             batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors, pooled maps) of every window with the tuned encoder, on the CPU; never cached."""
    vectors, maps = [], []
    with torch.inference_mode():
        for i in range(0, waves.shape[0], batch_size):
            f = encode(encoder, waves[i : i + batch_size].to(device), with_map=True, image=None)
            vectors.append(f.vector.cpu())
            maps.append(f.map.cpu())
    return torch.cat(vectors), torch.cat(maps)
