"""Shared fixtures: seeded synthetic audio on disk and a tiny trained model.

Real recordings and weights come from ../shared/data (override with $HARKEN_SHARED_DATA). A
user's clone has no such folder: the tests that need it skip with one reason, counted in the
summary. CI sets HARKEN_REQUIRE_SHARED_DATA=1, which turns those skips into failures, so the
real-data tests can never be lost silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import TINY_TRAIN_YAML, write_tone_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HARKEN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tone_data(tmp_path_factory) -> Path:
    return write_tone_dataset(tmp_path_factory.mktemp("tone-data"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tone_data) -> Path:
    """A small mel+mlp model trained through the real training code path."""
    from train.config import load_train_config
    from train.fit import fit_model

    base = tmp_path_factory.mktemp("tiny-model")
    cfg_file = base / "train.yaml"
    cfg_file.write_text(TINY_TRAIN_YAML)
    out = base / "model"
    fit_model(tone_data, out, load_train_config(cfg_file), device="cpu", progress=False)
    return out


SHARED_SKIP_REASON = (f"needs the shared recordings and weights at {SHARED_DATA} "
                      "(absent; point HARKEN_SHARED_DATA at a copy to run these tests)")


def require_shared() -> bool:
    return os.environ.get("HARKEN_REQUIRE_SHARED_DATA", "") not in ("", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if require_shared():
            pytest.fail(f"HARKEN_REQUIRE_SHARED_DATA is set but {SHARED_DATA} does not exist; "
                        "set HARKEN_SHARED_DATA to the shared data folder")
        pytest.skip(SHARED_SKIP_REASON)
    return SHARED_DATA


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    n = sum(1 for r in skipped if SHARED_SKIP_REASON in str(getattr(r, "longrepr", "")))
    if n:
        terminalreporter.write_line(f"{n} tests skipped: {SHARED_SKIP_REASON}", yellow=True)


@pytest.fixture
def mount_fs(tmp_path):
    """mount_fs(size="1m", read_only=False) -> a path on a fresh tmpfs: a small disk that fills
    up (real ENOSPC) or a read-only file system. Skips where mounting is not permitted."""
    from tests.helpers import MountedFs

    if not MountedFs.available(tmp_path / ".probe"):
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN (root); injected-error tests cover this")
    mounts: list[MountedFs] = []

    def make(size: str = "1m", read_only: bool = False) -> Path:
        m = MountedFs(tmp_path / f"fs{len(mounts)}", size=size, read_only=read_only)
        mounts.append(m)
        return m.__enter__()

    yield make
    for m in reversed(mounts):
        m.__exit__(None, None, None)
