"""A fitted detector: front end + encoder + standardiser + scorers + fusion + threshold.

The one scoring path for evaluate, replay and the daemon: `score_windows` takes a batch of
16 kHz mono windows and returns one score per window.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monitor.artifact import Artifact, load_artifact
from monitor.manifest import Manifest
from monitor.calibration import Calibration, load_calibration
from monitor.audio import SAMPLE_RATE_HZ, LogMel, MelParams
from monitor.encoders.base import Encoder
from monitor.encoders.registry import build_encoder
from monitor.errors import ArtifactError, UsageError
from monitor.decoders import pool_map
from monitor.encoders.mel import MelImageEncoder
from monitor.scorers import Features, Fusion, Scorer, Standardizer, load_scorer


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name (None: plain fp32).

    bf16 autocast works on CPU and CUDA. On the CPU it wins only where matrix units do the work
    (AST on a CPU with AMX: about 3x); for efficientat's small convolutions it measured slower
    than fp32 (`harken bench`), so fp32 stays the default. fp16 is CUDA only.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return PRECISIONS[precision]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


class Detector:
    def __init__(self, encoder: Encoder, standardizer: Standardizer, scorers: dict[str, Scorer],
                 fusion: Fusion, threshold: float, manifest: Manifest, device: torch.device,
                 precision: str = "fp32", compile: bool = False):
        self.precision = precision
        self.autocast_dtype = resolve_precision(precision, device)
        # Pinned host memory lets the copy to the GPU overlap; pointless (and slower) on the CPU.
        self.pin_memory = device.type == "cuda"
        self.encoder = encoder
        self.vector_is_image = bool(getattr(encoder, "vector_is_image", False))
        if compile:
            # Optional; on CUDA "reduce-overhead" also captures CUDA graphs for each fixed batch
            # shape. Untested on a GPU here (no GPU on the development machine).
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            self.encoder = torch.compile(encoder, mode=mode, dynamic=False)
        self.standardizer = standardizer
        self.scorers = scorers
        self.fusion = fusion
        self.threshold = float(threshold)
        # Per machine ID thresholds (manifest threshold.per_id, keys "00", "01", ...): one
        # machine's normal scores can sit well above or below another's.
        self.thresholds_per_id = manifest.thresholds_per_id
        self.manifest = manifest
        self.device = device
        self.sample_rate_hz = int(manifest.sample_rate_hz)
        self.window_s = float(manifest.window_s)
        self.name = manifest.name or f"{manifest.encoder['name']}+" + "+".join(scorers)
        self._log_mel: LogMel | None = None
        self.calibration: Calibration | None = None  # set by from_artifact
        self._mel_image: MelImageEncoder | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto", *,
             precision: str = "fp32", compile: bool = False) -> Detector:
        """precision: fp32 (default), bf16 (autocast, CPU or CUDA) or fp16 (CUDA autocast);
        compile: wrap the encoder in torch.compile (optional, first batch of each shape is slow)."""
        return cls.from_artifact(load_artifact(path), device, precision=precision, compile=compile)

    @classmethod
    def from_artifact(cls, art: Artifact, device: str | torch.device = "auto", *,
                      precision: str = "fp32", compile: bool = False) -> Detector:
        dev = resolve_device(device)
        resolve_precision(precision, dev)  # a bad name fails before the weights load
        m = art.manifest
        where = art.path / "manifest.json"
        if int(m.sample_rate_hz) != SAMPLE_RATE_HZ:
            raise ArtifactError(
                f"{where}: trained at {m.sample_rate_hz} Hz but this harken runs at "
                f"{SAMPLE_RATE_HZ} Hz; retrain the model"
            )
        try:
            encoder = build_encoder(m.encoder, dev)
            if m.encoder.get("fine_tuned"):
                load_tuned_encoder(encoder, art.tensors)  # errors get `where` below
            std = Standardizer(art.tensors["standardizer.mean"], art.tensors["standardizer.std"])
            scorers: dict[str, Scorer] = {}
            for cfg in m.scorers:
                prefix = f"scorer.{cfg['name']}."
                own = {k[len(prefix):]: v for k, v in art.tensors.items() if k.startswith(prefix)}
                scorers[cfg["name"]] = load_scorer(cfg, own)
                if cfg.get("exemplars"):  # judged-normal windows, from `harken model export`
                    from monitor.overlay import ExemplarGaussianScorer

                    scorers[cfg["name"]] = ExemplarGaussianScorer(scorers[cfg["name"]],
                                                                  own["exemplars"].float())
        except KeyError as exc:
            raise ArtifactError(f"{where}: missing entry {exc} (artifact incomplete or corrupted)") from None
        except (TypeError, ValueError, AttributeError, IndexError) as exc:  # hand-edited entries
            raise ArtifactError(f"{where}: invalid entry ({str(exc)[:200]}); artifact corrupted") from None
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc}") from None
        if std.mean.shape[0] != encoder.embedding_dim:
            raise ArtifactError(
                f"{where}: normalisation has {std.mean.shape[0]} dims but encoder "
                f"{m.encoder['name']} gives {encoder.embedding_dim}"
            )
        for s in scorers.values():
            if hasattr(s, "model"):
                s.model.to(dev)
        fusion = Fusion.from_json(m.fusion_spec)
        det = cls(encoder, std, scorers, fusion, m.threshold_value, m, dev,
                  precision=precision, compile=compile)
        # Out-of-fold normal scores and their tail (None for models trained before them).
        det.calibration = load_calibration(m, art.tensors, where)
        return det

    def threshold_for(self, machine_id: int | None) -> float:
        """The machine ID's own threshold when training saw that ID, else the pooled one."""
        if machine_id is None:
            return self.threshold
        return self.thresholds_per_id.get(int(machine_id), self.threshold)

    # ------------------------------------------------------------------ scoring

    @property
    def needs_map(self) -> bool:
        return any(getattr(s, "needs_map", False) for s in self.scorers.values())

    @torch.inference_mode()
    def features(self, windows: np.ndarray | torch.Tensor) -> Features:
        """(batch, samples) 16 kHz -> raw features on the detector's device."""
        waves = torch.as_tensor(windows, dtype=torch.float32)
        if waves.ndim != 2:
            raise UsageError(f"expected (batch, samples) windows, got shape {tuple(waves.shape)}")
        if self.pin_memory and waves.device.type == "cpu":
            waves = waves.pin_memory()
        waves = waves.to(self.device, non_blocking=True)  # the whole batch in one transfer
        # Front ends opt out of autocast themselves (log of low-precision power loses the floor).
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            return encode(self.encoder, waves, with_map=self.needs_map, image=self._image_encoder())

    def embed(self, windows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(batch, samples) 16 kHz -> (batch, dim) raw embeddings."""
        return self.features(windows).vector

    @torch.inference_mode()
    def score_features(self, raw: Features,
                       machine_ids: Sequence[int | None] | None = None) -> dict[str, torch.Tensor]:
        """Per-scorer scores plus the fused `score` for a batch of raw features."""
        ids = list(machine_ids) if machine_ids is not None else [None] * raw.vector.shape[0]
        raw = raw.to(self.device)
        f = Features(self.standardizer(raw.vector), raw.map, raw.image)
        parts = {name: s.score(f, ids) for name, s in self.scorers.items()}
        return {**parts, "score": self.fusion.combine(parts, ids)}

    def score_windows(self, windows: np.ndarray,
                      machine_ids: Sequence[int | None] | None = None) -> np.ndarray:
        """(batch, samples) float32 16 kHz -> (batch,) float64 scores; higher = more anomalous."""
        if len(windows) == 0:
            return np.zeros(0)
        out = self.score_features(self.features(windows), machine_ids)["score"]
        return out.double().cpu().numpy()

    # ------------------------------------------------------------------ evidence

    def _image_encoder(self) -> MelImageEncoder | None:
        if not self.needs_map:
            return None
        if self._mel_image is None:
            self._mel_image = MelImageEncoder().to(self.device).eval()
        return self._mel_image

    def log_mel(self, window: np.ndarray) -> np.ndarray:
        """(samples,) -> (128, frames) log-mel for plots."""
        if self._log_mel is None:
            self._log_mel = LogMel(MelParams())
        with torch.inference_mode():
            return self._log_mel(torch.as_tensor(window, dtype=torch.float32)[None])[0].numpy()

    @torch.inference_mode()
    def error_map(self, window: np.ndarray, machine_id: int | None = None) -> np.ndarray | None:
        """(128, 64) squared reconstruction error over the log-mel image, for models that
        reconstruct one (mel+mlp, any encoder + cnn); None for the others."""
        recon = self.scorers.get("recon")
        if recon is None:
            return None
        raw = self.features(window[None])
        f = Features(self.standardizer(raw.vector), raw.map, raw.image)
        err = recon.errors(f)[0]
        if recon.needs_map:
            return err.cpu().numpy()
        if self.vector_is_image:
            return err.reshape(128, -1).cpu().numpy()
        return None

    @property
    def reconstructs_image(self) -> bool:
        """Whether `error_map` gives a map: a recon scorer over a map or over the image itself."""
        recon = self.scorers.get("recon")
        return recon is not None and (recon.needs_map or self.vector_is_image)


def load_tuned_encoder(encoder: Encoder, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the pretrained parameters with the artifact's `encoder.<name>` tensors (written by
    `harken train --fine-tune`); every parameter must be there with its shape, and nothing else."""
    own = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    params = dict(encoder.named_parameters()) if isinstance(encoder, torch.nn.Module) else {}
    missing = sorted(set(params) - set(own))
    extra = sorted(set(own) - set(params))
    if missing or extra or not params:
        what = (f"{len(missing)} missing (first {missing[0]!r})" if missing else
                f"{len(extra)} unexpected (first {extra[0]!r})" if extra else "none stored")
        raise ArtifactError(f"fine-tuned {getattr(encoder, 'name', 'encoder')} weights do "
                            f"not match the encoder: {what}")
    for k, p in params.items():
        if own[k].shape != p.shape:
            raise ArtifactError(f"fine-tuned encoder tensor {k!r} has shape "
                                f"{tuple(own[k].shape)}, the encoder expects {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(own[k].to(p.dtype))


def encode(encoder: Encoder, waves: torch.Tensor, *, with_map: bool,
           image: MelImageEncoder | None) -> Features:
    """Run an encoder on a batch; with_map adds the pooled feature map and the mel image."""
    out = encoder(waves)
    if not with_map:
        return Features(out.vector.float())
    if out.feature_map is None:
        raise UsageError(f"encoder {encoder.name} has no feature map for the cnn decoder")
    img = image.image(waves) if image is not None else None
    return Features(out.vector.float(), pool_map(out.feature_map.float()), img)
