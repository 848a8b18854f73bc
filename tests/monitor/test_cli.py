"""The runtime's `harken` without `train/` or `bench/`: monitor/ copied alone to a temporary
directory, and a meta-path blocker refusing `train` and `bench` wherever else they could come from
(an editable install puts the source tree on the path)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.helpers import REPO

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("train", "bench"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from monitor.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _runtime_only(tmp_path, *args):
    if not (tmp_path / "monitor").exists():
        shutil.copytree(REPO / "monitor", tmp_path / "monitor",
                        ignore=shutil.ignore_patterns("__pycache__"))
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300, env={"PATH": "/usr/bin:/bin",
                                                                 "PYTHONPATH": str(tmp_path)})


def test_runtime_commands_work_without_train(tmp_path):
    proc = _runtime_only(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("monitor", "check-config", "replay", "weights"):
        assert command in proc.stdout
    for command in ("synth", "train", "evaluate", "bench"):
        assert f"\n    {command} " not in proc.stdout
    proc = _runtime_only(tmp_path, "check-config", str(REPO / "config" / "harken.example.yaml"),
                         "--no-models")
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def test_weights_fetch_is_a_train_action(tmp_path):
    proc = _runtime_only(tmp_path, "weights", "fetch", "ast")
    assert proc.returncode == 2
    assert "invalid choice: 'fetch'" in proc.stderr
