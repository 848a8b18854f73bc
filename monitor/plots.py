"""Evidence pictures: the log-mel of a window with what the model saw in it (reconstruction
error map, attention rollout). Used by `evaluate --report` and by the daemon on alarms."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_evidence_png(path: str | Path, log_mel: np.ndarray, *, error_map: np.ndarray | None = None,
                      attention: np.ndarray | None = None, title: str = "") -> Path:
    """log_mel (128, frames); error_map (bands, cells) and attention (f, t) are stretched onto
    the same time axis (0-10 s). Writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("log-mel", log_mel, "magma")]
    if error_map is not None:
        panels.append(("reconstruction error", error_map, "inferno"))
    if attention is not None:
        panels.append(("attention rollout", attention, "viridis"))
    seconds = log_mel.shape[1] * 0.01
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.3 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, img, cmap) in zip(axes[:, 0], panels):
        im = ax.imshow(img, origin="lower", aspect="auto", cmap=cmap, extent=(0, seconds, 0, img.shape[0]))
        ax.set_ylabel(f"{name}\n(bin)")
        fig.colorbar(im, ax=ax, pad=0.01)
    axes[-1, 0].set_xlabel("time (s)")
    if title:
        axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
