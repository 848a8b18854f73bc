"""Shared fixtures: seeded synthetic audio on disk and a tiny trained model.

Real recordings come from ../shared/data (override with $HARKEN_SHARED_DATA).
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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set HARKEN_SHARED_DATA")
    return SHARED_DATA
