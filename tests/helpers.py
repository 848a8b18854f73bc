"""Helpers for tests: seeded synthetic audio and running the CLI as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
RATE = 16_000


def tone_clip(rng: np.random.Generator, machine_id: int, anomalous: bool, seconds: float = 10.0,
              rate: int = RATE) -> np.ndarray:
    """A hum with harmonics plus noise; anomalies add a 3 kHz whine and clicks."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120.0 + 40.0 * machine_id + rng.uniform(-2, 2)
    x = sum(0.08 / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.28)) for k in (1, 2, 3))
    x = x + 0.01 * rng.standard_normal(t.shape)
    if anomalous:
        x = x + 0.03 * np.sin(2 * np.pi * 3000 * t)
        x[:: rate // 4] += 0.5
    return x.astype(np.float32)


def write_tone_dataset(root: Path, ids=(0, 1), n_train=10, n_test=4, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, label, n in (("train", "normal", n_train), ("test", "normal", n_test),
                            ("test", "anomaly", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for mid in ids:
            for i in range(n):
                clip = tone_clip(rng, mid, label == "anomaly")
                sf.write(root / split / f"{label}_id_{mid:02d}_{i:08d}.wav", clip, RATE,
                         subtype="PCM_16")
    return root


# The seed's log-mel MLP autoencoder, kept small: the daemon and artifact tests need a model
# with a reconstruction (error map); tests of the default detector train it without a config.
TINY_TRAIN_YAML = """\
train:
  encoder: mel
  scorers: [recon]
  decoder_dims: [8192, 64, 16]
  max_epochs: 6
  early_stop_patience: 3
"""


def harken(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI as users do, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=timeout)




class MountedFs:
    """A tmpfs of a given size (ENOSPC when full) or read-only, at a test's path; unmounted on
    exit. Needs CAP_SYS_ADMIN (root in a container); `available()` says whether it works here."""

    def __init__(self, where: Path, *, size: str = "1m", read_only: bool = False):
        self.path = Path(where)
        self.options = f"size={size}" + (",ro" if read_only else "")
        self.mounted = False

    @staticmethod
    def available(probe: Path) -> bool:
        probe.mkdir(parents=True, exist_ok=True)
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return ok

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", self.options, "tmpfs", str(self.path)],
                       check=True, capture_output=True)
        self.mounted = True
        return self.path

    def __exit__(self, *exc) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
