"""`harken weights list | fetch | import | verify`, and training, evaluating and comparing with the
pretrained encoders on tiny weights, all through the CLI. No network anywhere."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
import torch

from monitor.encoders.registry import ENCODERS, build_encoder
from monitor.weights.store import KNOWN
from tests.helpers import harken
from tests.zoo_fixtures import TINY_DIMS, write_tiny

ZOO = ("ast", "panns", "wav2vec2", "resnet50")

BLOCK_NETWORK = """\
import socket
def _refuse(*args, **kwargs):
    raise OSError("network blocked by the test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.getaddrinfo = _refuse
socket.create_connection = _refuse
"""


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HARKEN_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HARKEN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-zoo-src")
    return {name: write_tiny(name, root) for name in ZOO}


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(capsys, *args: str) -> Result:
    """The CLI in this process (same code as `harken ...`; subprocesses cost seconds each)."""
    from monitor.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return Result(rc, out.out, out.err)


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert lines and lines[-1].startswith("harken: error: "), proc.stderr
    return lines[-1]


def test_list_shows_every_encoder_and_where_its_weights_belong(tmp_path):
    proc = harken("weights", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["weights_dir"] == str(tmp_path / "weights")
    rows = {r["encoder"]: r for r in out["encoders"]}
    assert set(rows) == set(ENCODERS)
    assert rows["mel"]["sha256"] == rows["conv"]["sha256"] == "none needed"
    for name in KNOWN:
        assert rows[name] == {"encoder": name, "path": str(tmp_path / "weights" / KNOWN[name].name),
                              "present": False, "size_bytes": None, "sha256": "absent",
                              "problems": []}


def test_import_list_verify_and_default_lookup(tiny, tmp_path, capsys):
    weights = tmp_path / "weights"
    for name in ZOO:
        proc = cli(capsys, "weights", "import", name, str(tiny[name]))
        assert proc.returncode == 0, proc.stderr
        dest = weights / KNOWN[name].name
        assert dest.exists() and (weights / f"{KNOWN[name].name}.harken.json").is_file()
    rows = {r["encoder"]: r for r in json.loads(cli(capsys, "weights", "list", "--json").stdout)["encoders"]}
    for name in ZOO:
        assert rows[name]["present"] and rows[name]["sha256"] == "ok" and rows[name]["size_bytes"] > 0
    assert rows["efficientat"]["sha256"] == "absent"
    proc = cli(capsys, "weights", "verify")
    assert proc.returncode == 0, proc.stderr
    assert "ast: ok" in proc.stdout and "efficientat: absent" in proc.stdout

    for name in ZOO:  # the default lookup users get without --weights
        enc = build_encoder({"name": name}, torch.device("cpu"))
        assert enc.embedding_dim == TINY_DIMS[name] and enc.spec()["weights"] is None

    # one flipped byte: verify fails naming the file; the other encoders still pass
    st = weights / KNOWN["ast"].name / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF
    st.write_bytes(bytes(data))
    proc = harken("weights", "verify", "ast")
    assert proc.returncode == 1
    assert f"{st}: sha256 differs" in proc.stderr
    assert "weights verification failed" in _one_error_line(proc)
    assert cli(capsys, "weights", "verify", "panns").returncode == 0
    pth = weights / KNOWN["panns"].name
    pth.write_bytes(pth.read_bytes()[:-100])
    proc = cli(capsys, "weights", "verify")
    assert proc.returncode == 1 and str(pth) in proc.stderr and str(st) in proc.stderr


def test_import_refuses_bad_input_and_copies_nothing(tiny, tmp_path, capsys):
    weights = tmp_path / "weights"
    proc = harken("weights", "import", "ast", str(tiny["panns"]))
    assert proc.returncode == 2 and "Hugging Face model directory" in _one_error_line(proc)
    proc = cli(capsys, "weights", "import", "panns", str(tiny["ast"]))
    assert proc.returncode == 2 and "single checkpoint file" in _one_error_line(proc)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    proc = harken("weights", "import", "panns", str(bad))
    assert proc.returncode == 2 and f"{bad}: not a readable PANNs checkpoint" in _one_error_line(proc)
    proc = cli(capsys, "weights", "import", "mel", str(bad))
    assert proc.returncode == 2 and "no pretrained weights" in _one_error_line(proc)
    proc = cli(capsys, "weights", "import", "wav2vec2", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "no such file or directory" in _one_error_line(proc)
    assert not weights.exists() or not any(weights.iterdir())

    assert cli(capsys, "weights", "import", "panns", str(tiny["panns"])).returncode == 0
    proc = cli(capsys, "weights", "import", "panns", str(tiny["panns"]))
    assert proc.returncode == 2 and "--force" in _one_error_line(proc)
    assert cli(capsys, "weights", "import", "panns", str(tiny["panns"]), "--force").returncode == 0


def test_verify_of_absent_weights_says_how_to_get_them():
    proc = harken("weights", "verify", "wav2vec2")
    assert proc.returncode == 2
    assert "harken weights import wav2vec2 PATH" in _one_error_line(proc)


@pytest.mark.parametrize("name", ["ast", "panns"])
def test_fetch_refuses_cleanly_offline(name, tmp_path, monkeypatch):
    proc = harken("weights", "fetch", name)  # HF_HUB_OFFLINE=1 from the fixture
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert f"cannot download {name} weights" in line and "machine with internet access" in line

    # no offline flag, but no network either: one quick probe, the same one line
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_NETWORK)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setenv("PYTHONPATH", str(site))
    proc = harken("weights", "fetch", name)
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "unreachable: network blocked by the test" in line
    weights = tmp_path / "weights"
    assert not weights.exists() or not any(weights.iterdir())


# --------------------------------------------------------------------------- end to end


TRAIN_YAML = "train:\n  max_epochs: 3\n  batch_size: 8\n"


def test_train_and_evaluate_with_a_tiny_ast(tiny, tone_data, tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TRAIN_YAML)
    model = tmp_path / "ast-mlp"
    proc = harken("train", "--data", str(tone_data), "--out", str(model), "--encoder", "ast",
                  "--weights", str(tiny["ast"]), "--decoder", "mlp", "--config", str(cfg),
                  "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["encoder"]["name"] == "ast"
    assert manifest["encoder"]["weights"] == str(tiny["ast"].resolve())
    assert len(manifest["encoder"]["weights_sha256"]) == 64
    report = tmp_path / "report"
    proc = harken("evaluate", "--model", str(model), "--data", str(tone_data), "--json",
                  "--device", "cpu", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["n_anomaly"] == 8
    # the mlp has no error map, so evidence exists only because of the attention rollout
    evidence = metrics["report"]["evidence"]
    assert len(evidence) == 4 and all(Path(p).stat().st_size > 0 for p in evidence)


def test_train_panns_with_the_cnn_decoder_from_the_weights_dir(tiny, tone_data, tmp_path, capsys):
    assert cli(capsys, "weights", "import", "panns", str(tiny["panns"])).returncode == 0
    model = tmp_path / "panns-cnn"
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TRAIN_YAML)
    proc = harken("train", "--data", str(tone_data), "--out", str(model), "--encoder", "panns",
                  "--decoder", "cnn", "--config", str(cfg), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((model / "manifest.json").read_text())["encoder"]["weights"] is None
    proc = harken("evaluate", "--model", str(model), "--data", str(tone_data), "--json",
                  "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert 0.0 <= json.loads(proc.stdout)["auc"] <= 1.0


def test_compare_runs_the_encoders_whose_weights_are_there(tiny, tone_data, tmp_path, capsys):
    for name in ("ast", "panns"):
        assert cli(capsys, "weights", "import", name, str(tiny[name])).returncode == 0
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TRAIN_YAML)
    out = tmp_path / "cmp"
    proc = harken("compare", "--data", str(tone_data), "--out", str(out),
                  "--encoders", "ast,panns,wav2vec2", "--decoders", "mlp", "--scorers", "knn",
                  "--config", str(cfg), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    by = {(r["encoder"], r["scorer"]): r for r in csv.DictReader(open(out / "compare.csv"))}
    for key in (("ast", "knn"), ("panns", "knn")):
        assert not by[key]["skipped"] and 0.0 <= float(by[key]["auc"]) <= 1.0
    assert "wav2vec2 weights not found" in by[("wav2vec2", "knn")]["skipped"]
    assert "| ast+knn |" in (out / "compare.md").read_text()
