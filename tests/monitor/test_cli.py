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


def test_monitor_scores_and_alarms_without_train(tmp_path, tiny_model, tone_data):
    """The line-side install: `harken monitor` on a folder of real WAVs with train/ and bench/
    unreachable, to the end of the folder, with scores and an alarm in its JSONL."""
    import json

    clips = tmp_path / "clips"
    clips.mkdir()
    picked = sorted((tone_data / "test").glob("anomaly_*.wav"))[:2] + \
        sorted((tone_data / "test").glob("normal_*.wav"))[:2]
    for p in picked:
        shutil.copy(p, clips / p.name)
    out = tmp_path / "out.jsonl"
    cfg = tmp_path / "harken.yaml"
    cfg.write_text(f"""\
node: n1
state_dir: {tmp_path / 'state'}
jsonl: {out}
device: cpu
alarm: {{k: 1, n: 1, hold_s: 0, threshold: -1000.0}}
sources:
  - id: line
    kind: folder
    model: {tiny_model}
    path: {clips}
    speed: max
""")
    proc = _runtime_only(tmp_path, "monitor", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]
    scored = {ln["file"].rsplit("/", 1)[-1] for ln in lines if "score" in ln and "file" in ln}
    assert scored == {p.name for p in picked}
    assert any(ln.get("type") == "start" for ln in lines), "every window is over a threshold of -1000"
