"""`harken bench`: windows per second, latency and memory of harken's inference path next to the
plain reference pipeline, run in the same process on the same inputs.

Weights are random-initialised unless real ones are at hand (timing does not depend on them);
the output says which. The reference pipelines run at batch 1 and fp32, the way their projects'
examples do. CUDA graphs and torch.compile on CUDA are untested here (no GPU on the development
machine); on the CPU bf16 autocast is measured, not assumed to win.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from monitor.audio import SAMPLE_RATE_HZ, WINDOW_S
from monitor.detector import resolve_device
from monitor.errors import UsageError

N_SAMPLES = int(SAMPLE_RATE_HZ * WINDOW_S)


@dataclass(frozen=True)
class BenchRow:
    encoder: str
    path: str  # "harken" or "reference"
    device: str
    precision: str
    batch: int
    windows_per_s: float
    batch_p50_ms: float
    batch_p95_ms: float
    window_ms: float  # p50 batch latency / batch size
    peak_rss_mb: float
    cuda_max_alloc_mb: float | None
    weights: str


@dataclass(frozen=True)
class Contender:
    """One way of turning a (batch, samples) numpy batch into embeddings."""

    run: Callable[[np.ndarray], object]
    batches: tuple[int, ...]  # the reference pipelines run at batch 1 only
    precision: str
    weights: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_contender(c: Contender, batch: int, device: torch.device, seconds: float,
                   rng: np.random.Generator, min_iters: int = 3) -> tuple[float, list[float]]:
    """Run for about `seconds` after one warm-up call; returns (windows/s, batch latencies ms)."""
    x = (0.1 * rng.standard_normal((batch, N_SAMPLES))).astype(np.float32)
    c.run(x)  # warm-up: kernel caches, allocator, lazy init
    _sync(device)
    lat: list[float] = []
    start = time.perf_counter()
    while len(lat) < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        c.run(x)
        _sync(device)
        lat.append((time.perf_counter() - t0) * 1000.0)
    total = time.perf_counter() - start
    return batch * len(lat) / total, lat


# --------------------------------------------------------------------------- contenders per encoder


def _harken_path(encoder, device: torch.device, precision: str) -> Callable[[np.ndarray], object]:
    """What Detector.features does: one transfer per batch, inference mode, optional autocast."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    pin = device.type == "cuda"

    def run(x: np.ndarray):
        t = torch.from_numpy(x)
        if pin:
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return encoder(t).vector

    return run


def contenders(name: str, device: torch.device, batches: tuple[int, ...],
               precisions: tuple[str, ...], weights_path: str | None = None) -> dict[str, Contender]:
    """harken's path at each precision, and the reference pipeline, for one encoder."""
    builder = BENCH_ENCODERS.get(name)
    if builder is None:
        raise UsageError(f"no benchmark for encoder {name!r}; available: {', '.join(BENCH_ENCODERS)}")
    encoder, reference, weights = builder(device, weights_path)
    out = {f"harken-{p}": Contender(_harken_path(encoder, device, p), batches, p, weights)
           for p in precisions}
    out["reference"] = Contender(reference, (1,), "fp32", weights)
    return out


def _bench_mel(device, weights_path=None):
    import torchaudio

    from monitor.encoders.mel import MelImageEncoder

    enc = MelImageEncoder().to(device).eval()
    mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE_HZ, n_fft=512, hop_length=160, n_mels=128)

    def reference(x):  # the DCASE-baseline way: one clip at a time on the CPU, then to the device
        outs = []
        with torch.no_grad():
            for clip in x:
                m = torch.log(mel(torch.from_numpy(clip)) + 1e-6)
                img = torch.nn.functional.adaptive_avg_pool1d(m[None], 64)[0]
                outs.append(img.flatten().to(device))
        return outs

    return enc, reference, "none (no weights)"


def _bench_stats(device, weights_path=None):
    from monitor.encoders.stats import StatsEncoder

    enc = StatsEncoder().to(device).eval()

    def reference(x):  # one clip at a time, as a per-file feature function would
        with torch.no_grad():
            return [enc(torch.from_numpy(clip)[None].to(device)).vector for clip in x]

    return enc, reference, "none (no weights)"


def _bench_efficientat(device, weights_path=None):
    from monitor.encoders import efficientat as ea

    try:  # --weights, else the weights directory ($HARKEN_WEIGHTS_DIR)
        enc = ea.load_efficientat(weights_path, device=device)
        weights = "real (EfficientAT mn04)"
    except UsageError:
        if weights_path:
            raise
        enc = ea.EfficientATEncoder(ea.EfficientATNet()).to(device).eval()
        weights = "random-initialised"
    net = enc.net if hasattr(enc, "net") else enc
    front = ea.EfficientATFrontEnd(input_rate_hz=SAMPLE_RATE_HZ)

    def reference(x):  # per clip on the CPU: resample, front end, network, then move on
        outs = []
        with torch.no_grad():
            for clip in x:
                spec = front(torch.from_numpy(clip)[None]).to(device)
                outs.append(net(spec)["pooled"])
        return outs

    return enc, reference, weights


def _bench_ast(device, weights_path=None):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    from monitor.encoders import ast as ast_mod

    cfg = ASTConfig()  # AST-base: 768 wide, 12 layers, 1214 patches for 10 s
    fast_model = ASTModel(ASTConfig(attn_implementation="sdpa")).eval()
    enc = ast_mod.ASTEncoder(fast_model).to(device).eval()
    ref_model = ASTModel(cfg)
    ref_model.load_state_dict(fast_model.state_dict())
    ref_model.config._attn_implementation = "eager"
    ref_model = ref_model.to(device).eval()
    fe = ASTFeatureExtractor()

    def reference(x):  # Hugging Face's documented way: feature extractor, fp32 model, one clip
        outs = []
        with torch.no_grad():
            for clip in x:
                feats = fe(clip, sampling_rate=SAMPLE_RATE_HZ, return_tensors="pt")
                outs.append(ref_model(feats["input_values"].to(device)).pooler_output)
        return outs

    return enc, reference, "random-initialised (AST-base shape)"


BENCH_ENCODERS: dict[str, Callable] = {"stats": _bench_stats, "mel": _bench_mel,
                                       "efficientat": _bench_efficientat,
                                       "ast": _bench_ast}


def run_bench(encoders: list[str], device: str = "cpu", batches: tuple[int, ...] = (1, 8, 32),
              seconds: float = 5.0, precisions: tuple[str, ...] | None = None,
              threads: int | None = None, weights: str | None = None,
              log=print) -> list[BenchRow]:
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    if precisions is None:
        precisions = ("fp32", "bf16")
    for p in precisions:
        if p not in ("fp32", "bf16", "fp16"):
            raise UsageError(f"--precision takes fp32, bf16 or fp16, got {p!r}")
        if p == "fp16" and dev.type != "cuda":
            raise UsageError("--precision fp16 needs --device cuda")
    if not batches or min(batches) < 1:
        raise UsageError(f"--batch sizes must be >= 1, got {batches}")
    if seconds <= 0:
        raise UsageError(f"--seconds must be > 0, got {seconds}")
    rng = np.random.default_rng(0)
    rows: list[BenchRow] = []
    for name in encoders:
        for label, c in contenders(name, dev, batches, precisions, weights).items():
            for b in c.batches:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                wps, lat = time_contender(c, b, dev, seconds, rng)
                p50 = statistics.median(lat)
                p95 = float(np.percentile(lat, 95))
                row = BenchRow(name, "reference" if label == "reference" else "harken", str(dev),
                               c.precision, b, wps, p50, p95, p50 / b, peak_rss_mb(),
                               torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
                               c.weights)
                rows.append(row)
                log(f"  {name:12s} {row.path:9s} {row.precision:5s} batch {b:3d}: "
                    f"{wps:8.1f} windows/s  p50 {p50:8.1f} ms  p95 {p95:8.1f} ms  "
                    f"({row.window_ms:.1f} ms/window)")
    return rows


def speedups(rows: list[BenchRow]) -> dict[str, dict]:
    """Best harken windows/s over the reference's, per encoder (the b/a ratio, inverted to a/b)."""
    out = {}
    for name in dict.fromkeys(r.encoder for r in rows):
        ref = [r for r in rows if r.encoder == name and r.path == "reference"]
        fast = [r for r in rows if r.encoder == name and r.path == "harken"]
        if ref and fast:
            best = max(fast, key=lambda r: r.windows_per_s)
            out[name] = {"reference_windows_per_s": ref[0].windows_per_s,
                         "best_windows_per_s": best.windows_per_s,
                         "best": f"{best.precision} batch {best.batch}",
                         "speedup": best.windows_per_s / ref[0].windows_per_s,
                         "reference_over_harken_time": ref[0].window_ms / best.window_ms}
    return out


def environment() -> dict:
    import transformers

    return {"machine": platform.machine(), "processor": platform.processor() or "unknown",
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d"),
            "note": "weights random-initialised unless a row's `weights` says real; "
                    "CUDA targets not measured on a CPU-only machine"}


def to_json(rows: list[BenchRow]) -> str:
    return json.dumps({"environment": environment(), "rows": [asdict(r) for r in rows],
                       "speedup": speedups(rows)}, indent=2)


def daemon_bench(encoder: str, *, candidates: tuple[int, ...] | None, seconds: float,
                 time_scale: float, budget_s: float, weights: str | None = None,
                 device: str = "cpu", threads: int | None = None, log=print) -> dict:
    """`harken bench --daemon`: build a small artifact for `encoder`, then search the largest
    number of simulated real-time sources the whole daemon scores without drops."""
    import tempfile
    from pathlib import Path

    from bench.daemon_bench import build_bench_model, search_sources

    if encoder not in ("mel", "efficientat"):
        raise UsageError(f"--daemon benchmarks mel or efficientat, got {encoder!r}")
    if encoder == "efficientat":
        from monitor.weights.store import locate

        try:
            path = locate("efficientat", weights)
        except UsageError as exc:
            if weights:  # an explicit path that is wrong is a mistake, not a skip
                raise
            log(f"daemon bench for efficientat skipped: {exc}")
            return {"encoder": encoder, "skipped": str(exc)}
        if not Path(path).is_file():
            raise UsageError(f"{path}: efficientat weights must be a file")
    with tempfile.TemporaryDirectory(prefix="harken-bench-model-") as tmp:
        log(f"building a small {encoder} model from synthetic clips ...")
        model = build_bench_model(encoder, Path(tmp), weights=weights, device=device)
        result = search_sources(model, candidates=candidates, seconds=seconds,
                                time_scale=time_scale, budget_s=budget_s, device=device,
                                threads=threads, log=log)
    return {"encoder": encoder, "device": device, "threads": torch.get_num_threads(),
            **result, "environment": environment()}
