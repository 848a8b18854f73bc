import csv

from tests.helpers import harken


def test_compare_end_to_end_with_a_missing_encoder(tone_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HARKEN_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tmp_path / "t.yaml"
    cfg.write_text("train:\n  max_epochs: 3\n  batch_size: 8\n")
    out = tmp_path / "cmp"
    proc = harken("compare", "--data", str(tone_data), "--out", str(out), "--encoders", "mel,conv",
                  "--decoders", "mlp,cnn", "--scorers", "recon,knn", "--seeds", "2",
                  "--config", str(cfg), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "compare.csv")))
    by = {(r["encoder"], r["decoder"], r["scorer"]): r for r in rows}
    ran = [k for k, r in by.items() if not r["skipped"]]
    assert sorted(ran) == [("conv", "cnn", "recon"), ("mel", "-", "knn"), ("mel", "mlp", "recon")]
    assert "only with the cnn decoder" in by[("conv", "mlp", "recon")]["skipped"]
    assert "same network as conv+cnn" in by[("mel", "cnn", "recon")]["skipped"]
    for k in ran:
        assert by[k]["seeds"] == "2"
        assert 0.0 <= float(by[k]["auc"]) <= 1.0 and float(by[k]["auc_sd"]) >= 0.0
        assert by[k]["auc_id_00"] and by[k]["auc_id_01"]
    assert float(by[("mel", "-", "knn")]["auc"]) > 0.9
    md = (out / "compare.md").read_text()
    assert "| mel+knn |" in md and "Skipped:" in md
    assert "- conv+mlp, conv+knn: conv is the from-scratch" in md  # one line per reason
    assert (out / "compare.png").stat().st_size > 0
    assert "mel+knn" in proc.stdout
