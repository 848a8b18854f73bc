"""`harken compare`: train and evaluate every encoder x decoder/scorer pair that can run here,
and write the table (Markdown + CSV) and a plot: the seed study's Figure 5 on the user's data."""

from __future__ import annotations

import csv
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from monitor.decoders import VECTOR_DECODERS
from monitor.detector import resolve_device
from monitor.encoders.registry import ENCODERS, build_encoder
from monitor.errors import HarkenError, UsageError
from monitor.logs import get_logger
from train.config import TrainConfig, default_scorers, load_train_config
from train.evaluate import evaluate
from train.fit import encoder_spec, fit_model

DEFAULT_DECODERS = ("mlp", "unet", "cnn")
# "default": the scorers `harken train` picks for the encoder when none are named (for stats
# the fused diag+diag@shape+mahalanobis); "a+b" is one fused system.
DEFAULT_SCORERS = ("default", "recon", "knn", "mahalanobis", "diag")


@dataclass(frozen=True)
class System:
    encoder: str
    decoder: str  # mlp | unet | cnn for recon; "-" for distance scorers
    scorer: str

    @property
    def scorers(self) -> tuple[str, ...] | None:
        return None if self.scorer == "default" else tuple(self.scorer.split("+"))

    @property
    def label(self) -> str:
        names = default_scorers(self.encoder) if self.scorer == "default" else self.scorers
        return f"{self.encoder}+" + "+".join(self.decoder if n == "recon" else n for n in names)


@dataclass
class Row:
    system: System
    aucs: list[float] = field(default_factory=list)
    paucs: list[float] = field(default_factory=list)
    per_id: dict[str, list[float]] = field(default_factory=dict)
    per_fault: dict[str, list[float]] = field(default_factory=dict)
    embed_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    parameters: int = 0
    skipped: str | None = None


def plan(encoders, decoders, scorers) -> list[tuple[System, str | None]]:
    """Every combination, with the reason when one makes no sense."""
    out = []
    labels: set[str] = set()
    for enc in encoders:
        for sc in scorers:
            uses_recon = sc == "recon" or (sc == "default" and "recon" in default_scorers(enc))
            for dec in (decoders if uses_recon else ("-",)):
                system = System(enc, dec, sc)
                if system.label in labels:
                    continue  # "default" that is one of the listed scorers: run it once
                labels.add(system.label)
                reason = None
                if enc == "stats" and uses_recon:
                    reason = "stats feeds density models; reconstruction is for the mel image and embeddings"
                elif enc == "conv" and not (uses_recon and dec == "cnn"):
                    reason = "conv is the from-scratch CNN autoencoder: only with the cnn decoder"
                elif enc == "mel" and sc == "recon" and dec == "cnn" and "conv" in encoders:
                    reason = "the same network as conv+cnn (the cnn decoder's stem encodes the mel image)"
                out.append((system, reason))
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(data: str | Path, out: str | Path, *, encoders=None, decoders=DEFAULT_DECODERS,
            scorers=DEFAULT_SCORERS, seeds: int = 1, base: TrainConfig | None = None,
            device: str = "auto", progress: bool = True) -> list[Row]:
    log = get_logger(stage="compare")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = base or load_train_config(None)
    encoders = list(encoders or ENCODERS)
    for enc in encoders:
        if enc not in ENCODERS:
            raise UsageError(f"unknown encoder {enc!r}; available: {', '.join(ENCODERS)}")
    for dec in decoders:
        if dec not in DEFAULT_DECODERS:
            raise UsageError(f"unknown decoder {dec!r}; available: {', '.join(DEFAULT_DECODERS)}")
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    dev = resolve_device(device)

    available: dict[str, str | None] = {}
    for enc in encoders:  # probe once: missing weights skip every pair of that encoder
        try:
            e = build_encoder(encoder_spec(_cfg(base, enc, "mlp", "recon", base.seed)), dev)
            available[enc] = None if e is not None else "could not be built"
        except HarkenError as exc:
            available[enc] = str(exc)

    rows: list[Row] = []
    work = plan(encoders, decoders, scorers)
    with tempfile.TemporaryDirectory(prefix="harken-compare-") as tmp:
        for n, (system, reason) in enumerate(work, 1):
            row = Row(system)
            rows.append(row)
            reason = reason or available[system.encoder]
            if reason:
                row.skipped = reason
                log.warning("pair_skipped", system=system.label, reason=reason)
                continue
            print(f"[{n}/{len(work)}] {system.label}", flush=True)
            for k in range(seeds):
                seed = base.seed + k
                cfg = _cfg(base, system.encoder, system.decoder, system.scorer, seed)
                model_dir = Path(tmp) / f"{system.label}-{seed}"
                try:
                    res = fit_model(data, model_dir, cfg, device=str(dev), progress=progress,
                                    cache_dir=out / "cache")
                    m = evaluate(model_dir, data, device=str(dev), progress=progress)
                except UsageError as exc:
                    row.skipped = str(exc)
                    log.warning("pair_skipped", system=system.label, reason=str(exc))
                    break
                row.aucs.append(m["auc"])
                row.paucs.append(m["pauc"])
                for key, v in m["per_id"].items():
                    if "auc" in v:
                        row.per_id.setdefault(key, []).append(v["auc"])
                for key, v in m.get("per_fault", {}).items():
                    row.per_fault.setdefault(key, []).append(v["auc"])
                row.embed_s.append(res["embed_seconds"])
                row.train_s.append(res["fit_seconds"])
                row.parameters = res["parameters"]
                print(f"      seed {seed}: AUC {m['auc']:.3f}  pAUC {m['pauc']:.3f}", flush=True)
    write_tables(out, rows, seeds)
    plot(out, rows)
    return rows


def _cfg(base: TrainConfig, encoder: str, decoder: str, scorer: str, seed: int) -> TrainConfig:
    from dataclasses import replace

    scorers = None if scorer == "default" else tuple(scorer.split("+"))
    return replace(base, encoder=encoder, decoder=decoder if decoder != "-" else base.decoder,
                   scorers=scorers, seed=seed, embedding_cache="on",
                   calibrate=False,  # a comparison ranks by AUC; no alarm thresholds needed
                   decoder_dims=base.decoder_dims if decoder in VECTOR_DECODERS else None)


def write_tables(out: Path, rows: list[Row], seeds: int) -> None:
    ids = sorted({k for r in rows for k in r.per_id})
    faults = sorted({k for r in rows for k in r.per_fault})
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["encoder", "decoder", "scorer", "auc", "auc_sd", "pauc", "pauc_sd",
                    *[f"auc_id_{i}" for i in ids], *[f"auc_{x}" for x in faults],
                    "embed_s", "train_s", "parameters", "seeds",
                    "skipped"])
        for r in rows:
            a, asd = _mean_sd(r.aucs)
            p, psd = _mean_sd(r.paucs)
            w.writerow([r.system.encoder, r.system.decoder, r.system.scorer,
                        *(f"{x:.4f}" if r.aucs else "" for x in (a, asd, p, psd)),
                        *(f"{_mean_sd(r.per_id.get(i, []))[0]:.4f}" if r.per_id.get(i) else "" for i in ids),
                        *(f"{_mean_sd(r.per_fault.get(x, []))[0]:.4f}" if r.per_fault.get(x) else ""
                          for x in faults),
                        f"{statistics.fmean(r.embed_s):.2f}" if r.embed_s else "",
                        f"{statistics.fmean(r.train_s):.2f}" if r.train_s else "",
                        r.parameters or "", len(r.aucs), r.skipped or ""])
    spread = " (mean ± sd over seeds)" if seeds > 1 else ""
    lines = [f"| system | AUC{spread} | pAUC | " + " | ".join(f"AUC id {i}" for i in ids)
             + "".join(f" | {x}" for x in faults)
             + " | embed s (uncached) | train s | decoder params |",
             "|" + " --- |" * (6 + len(ids) + len(faults))]
    done = sorted((r for r in rows if r.aucs), key=lambda r: -statistics.fmean(r.aucs))
    for r in done:
        a, asd = _mean_sd(r.aucs)
        p, psd = _mean_sd(r.paucs)
        auc_txt = f"{a:.3f} ± {asd:.3f}" if seeds > 1 else f"{a:.3f}"
        pauc_txt = f"{p:.3f} ± {psd:.3f}" if seeds > 1 else f"{p:.3f}"
        per = " | ".join(f"{_mean_sd(r.per_id[i])[0]:.3f}" if r.per_id.get(i) else "-" for i in ids)
        per += "".join(f" | {_mean_sd(r.per_fault[x])[0]:.3f}" if r.per_fault.get(x) else " | -"
                       for x in faults)
        lines.append(f"| {r.system.label} | {auc_txt} | {pauc_txt} | {per} | "
                     f"{statistics.fmean(r.embed_s):.1f} | {statistics.fmean(r.train_s):.1f} | "
                     f"{r.parameters:,} |")
    skipped = [r for r in rows if r.skipped]
    if skipped:
        # One line per reason: a missing encoder skips all of its pairs for the same reason.
        by_reason: dict[str, list[str]] = {}
        for r in skipped:
            by_reason.setdefault(r.skipped, []).append(r.system.label)
        lines += ["", "Skipped:", ""]
        lines += [f"- {', '.join(labels)}: {reason}" for reason, labels in by_reason.items()]
    (out / "compare.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((r for r in rows if r.aucs), key=lambda r: statistics.fmean(r.aucs))
    if not done:
        return
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(done) + 1.5))
    y = range(len(done))
    means = [statistics.fmean(r.aucs) for r in done]
    sds = [_mean_sd(r.aucs)[1] for r in done]
    ax.barh(list(y), means, xerr=sds, color="tab:blue", alpha=0.8, label="AUC")
    ax.barh(list(y), [statistics.fmean(r.paucs) for r in done], height=0.35, color="tab:orange",
            alpha=0.9, label="pAUC")
    ax.set_yticks(list(y), [r.system.label for r in done])
    ax.axvline(0.5, color="grey", ls=":")
    ax.set(xlim=(0, 1), xlabel="score", title="harken compare")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
