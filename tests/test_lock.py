"""The committed lock and pyproject.toml agree: every dependency of harken (and its train and test extras)
is locked at a version its specifier allows, with hashes, and torch/torchaudio are one exact
pair in both files. Refresh with `make lock` after editing pyproject.toml."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO


def _locked() -> dict[str, tuple[str, bool]]:
    """package -> (version, has hashes) from requirements.lock (one entry per marker variant)."""
    text = (REPO / "requirements.lock").read_text()
    out: dict[str, tuple[str, bool]] = {}
    for block in re.split(r"\n(?=\S)", text):
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s;\\]+)", block)
        if m:
            out.setdefault(canonicalize_name(m.group(1)), (m.group(2), "--hash=sha256:" in block))
    return out


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["train"] + extras["test"]]


def test_every_dependency_is_locked_within_its_specifier_with_hashes():
    locked = _locked()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in pyproject.toml but not in requirements.lock: make lock"
        version, hashed = locked[name]
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name}: lock has {version}, pyproject asks {req.specifier}: make lock")
        assert hashed, f"{req.name} has no hashes in the lock"


def test_torch_and_torchaudio_are_one_exact_pair_in_both_files():
    pins = {canonicalize_name(r.name): str(r.specifier) for r in _requirements()}
    locked = _locked()
    for name in ("torch", "torchaudio"):
        assert pins[name].startswith("=="), f"{name} must be pinned exactly in pyproject.toml"
        assert pins[name][2:] == locked[name][0]
    assert pins["torch"][2:].split(".")[:2] == pins["torchaudio"][2:].split(".")[:2]


def test_example_daemon_config_passes_check_config_without_models():
    from tests.helpers import harken

    proc = harken("check-config", str(REPO / "config" / "harken.example.yaml"), "--no-models")
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
