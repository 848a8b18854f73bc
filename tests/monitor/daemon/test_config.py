"""The daemon config loader: every problem at once, each with its dotted path."""

from pathlib import Path

import pytest
import yaml

from monitor.daemon.config import (ConfigError, DaemonConfig, SourceConfig, config_problems,
                                   load_config, resolve_mqtt_password, MqttConfig)
from tests.helpers import harken

REPO = Path(__file__).resolve().parents[3]


def folder_source(tmp_path, **extra):
    return {"id": "s1", "kind": "folder", "path": str(tmp_path), "model": str(tmp_path / "m"), **extra}


def problems_of(data):
    cfg, problems = config_problems(data, check_models=False)
    return problems


def test_minimal_config_loads_into_frozen_dataclasses(tmp_path):
    cfg, problems = config_problems({"node": "n1", "sources": [folder_source(tmp_path, hop_s=1)],
                                     "alarm": {"k": 1, "n": 1, "hold_s": 0}}, check_models=False)
    assert problems == []
    assert isinstance(cfg, DaemonConfig) and isinstance(cfg.sources[0], SourceConfig)
    assert cfg.sources[0].hop_s == 1.0 and isinstance(cfg.sources[0].hop_s, float)
    assert cfg.alarm.k == 1 and cfg.mqtt is None


def test_unknown_key_is_named_by_its_dotted_path(tmp_path):
    problems = problems_of({"sources": [folder_source(tmp_path), folder_source(tmp_path, id="s2", hopp_s=1)],
                            "mqtt": {"host": "h", "tls": {"ca": "x"}}})
    assert any(p.startswith("sources[1].hopp_s: unknown key") for p in problems), problems
    assert any(p.startswith("mqtt.tls.ca: unknown key") for p in problems), problems


def test_wrong_types_and_unions(tmp_path):
    problems = problems_of({"sources": [folder_source(tmp_path, hop_s="fast", watch="yes"),
                                        {"id": "m", "kind": "mic", "model": "x", "device": 2.5,
                                         "select_channels": [0, "one"], "channels": 2}],
                            "batch_max": True})
    assert "sources[0].hop_s: expected a number, got a string ('fast')" in problems
    assert "sources[0].watch: expected true/false, got a string ('yes')" in problems
    assert any(p.startswith("sources[1].device: expected a string or an integer") for p in problems)
    assert any(p.startswith("sources[1].select_channels[1]: expected an integer") for p in problems)
    assert any(p.startswith("batch_max: expected an integer, got true/false") for p in problems)
    # str | int takes both
    assert problems_of({"sources": [{"id": "m", "kind": "mic", "model": "x", "device": 3}]}) == []
    assert problems_of({"sources": [{"id": "m", "kind": "mic", "model": "x", "device": "USB"}]}) == []


def test_value_checks_report_every_problem_at_once(tmp_path):
    problems = problems_of({"sources": [folder_source(tmp_path),
                                        folder_source(tmp_path, id="s2", hop_s=12.0,
                                                      alarm={"k": 4, "n": 3}),
                                        {"id": "s3", "kind": "usb", "model": "x"},
                                        {"id": "s4", "kind": "folder", "model": "x"}],
                            "alarm": {"k": 5, "n": 2}})
    assert "sources[1].hop_s: must be <= window_s (got 12.0 > 10.0)" in problems
    assert "sources[1].alarm.k: must be <= n (got 4 > 3)" in problems
    assert "alarm.k: must be <= n (got 5 > 2)" in problems
    assert any(p.startswith("sources[2].kind: unknown source kind 'usb'") for p in problems)
    assert "sources[3].path: required for a folder source" in problems
    assert len(problems) == 5, problems


@pytest.mark.parametrize("bad_id", ["a/b", "a+b", "a#", "with space", ""])
def test_source_ids_must_be_topic_safe(tmp_path, bad_id):
    problems = problems_of({"sources": [folder_source(tmp_path, id=bad_id)]})
    assert len(problems) == 1 and problems[0].startswith("sources[0].id: must use only"), problems


def test_required_keys_and_kind_specific_keys(tmp_path):
    problems = problems_of({"sources": [{"kind": "folder"}, {"id": "q", "kind": "mqtt", "model": "x"},
                                        {"id": "m", "kind": "mic", "model": "x", "watch": True}]})
    assert "sources[0].id: required key is missing" in problems
    assert "sources[0].model: required key is missing" in problems
    assert "sources[1].kind: an mqtt source needs the top-level mqtt: section" in problems
    assert "sources[1].topic: required for an mqtt source" in problems
    assert "sources[2].watch: only a folder source takes this key" in problems
    # issue 17: `sources` may be absent (role worker / alarms); role all still needs one
    assert problems_of({"node": "x"}) == ["sources: at least one source is needed"]
    dup = problems_of({"sources": [folder_source(tmp_path), folder_source(tmp_path)]})
    assert dup == ["sources[1].id: 's1' is already used by sources[0]"]


def test_model_artifacts_are_loaded_and_checked(tmp_path, tiny_model):
    good = {"sources": [folder_source(tmp_path, model=str(tiny_model))]}
    assert config_problems(good)[1] == []
    missing = config_problems({"sources": [folder_source(tmp_path, model=str(tmp_path / "nope"))]})[1]
    assert len(missing) == 1 and missing[0].startswith("sources[0].model:") and "does not exist" in missing[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    with open(broken / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    corrupted = config_problems({"sources": [folder_source(tmp_path, model=str(broken))]})[1]
    assert len(corrupted) == 1 and "corrupted" in corrupted[0], corrupted
    short = config_problems({"sources": [folder_source(tmp_path, model=str(tiny_model),
                                                       window_s=5.0, hop_s=5.0)]})[1]
    assert short == ["sources[0].window_s: the model was trained on 10.0 s windows (got 5.0)"]


def test_load_config_raises_one_error_with_all_problems(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"sources": [folder_source(tmp_path, hop_s=20, id="a/b")]}))
    with pytest.raises(ConfigError) as err:
        load_config(f, check_models=False)
    assert err.value.exit_code == 2
    assert len(err.value.problems) == 2
    assert "\n" not in str(err.value)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(Exception, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_example_config_passes_check_config(tmp_path, tiny_model):
    data = yaml.safe_load((REPO / "config" / "harken.example.yaml").read_text())
    data["state_dir"] = str(tmp_path / "state")  # /var/lib/harken is the service's, not ours
    for s in data["sources"]:
        s["model"] = str(tiny_model)
        if s["kind"] == "folder":
            s["path"] = str(tmp_path)
    f = tmp_path / "harken.yaml"
    f.write_text(yaml.safe_dump(data))
    proc = harken("check-config", str(f))
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "slider3 (folder)" in proc.stdout


def test_check_config_prints_one_line_per_problem(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"sources": [folder_source(tmp_path, hop_s=12.0, bogus=1),
                                             folder_source(tmp_path, id="x+y")]}))
    proc = harken("check-config", str(f))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert f"{f}: sources[0].bogus: unknown key" in lines[0]
    assert any("sources[1].id: must use only" in ln for ln in lines)
    assert "Traceback" not in proc.stderr
    proc = harken("check-config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_mqtt_password_sources_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("HARKEN_MQTT_PASSWORD", raising=False)
    assert resolve_mqtt_password(MqttConfig()) is None
    monkeypatch.setenv("HARKEN_MQTT_PASSWORD", "from-env")
    assert resolve_mqtt_password(MqttConfig()) == "from-env"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert resolve_mqtt_password(MqttConfig()) == "from-credential"
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    assert resolve_mqtt_password(MqttConfig(password_file=str(pw))) == "from-file"
    # the YAML has no place for a password
    assert problems_of({"sources": [folder_source(tmp_path)], "mqtt": {"password": "x"}})[0].startswith(
        "mqtt.password: unknown key")


def test_precision_is_checked_and_reaches_the_detectors(tmp_path, tiny_model):
    assert problems_of({"precision": "fp8", "sources": [folder_source(tmp_path)]}) == [
        "precision: must be one of fp32, bf16, fp16, got 'fp8'"]
    cfg, problems = config_problems({"precision": "bf16", "sources": [
        folder_source(tmp_path, model=str(tiny_model))]})
    assert problems == [] and cfg.precision == "bf16"


def test_replay_and_evaluate_take_a_precision(tmp_path, tiny_model, tone_data):
    out = tmp_path / "bf16.jsonl"
    r = harken("replay", "--model", str(tiny_model), "--precision", "bf16", "--out", str(out),
               str(tone_data / "test"))
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 16
    bad = harken("evaluate", "--model", str(tiny_model), "--data", str(tone_data), "--precision", "fp8")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


def test_nan_and_infinite_numbers_are_rejected_by_name(tmp_path):
    problems = problems_of({"sources": [folder_source(tmp_path, hop_s=float("nan"))],
                            "alarm": {"hold_s": float("inf")}})
    assert "sources[0].hop_s: must be a finite number, got nan" in problems, problems
    assert "alarm.hold_s: must be a finite number, got inf" in problems, problems


def test_a_key_of_another_source_kind_is_refused_naming_the_kind(tmp_path):
    problems = problems_of({"sources": [
        folder_source(tmp_path, topic="a/b"),
        {"id": "m", "kind": "mic", "model": "x", "watch": True},
        {"id": "q", "kind": "mqtt", "model": "x", "topic": "a/b", "device": 3}],
        "mqtt": {}})
    assert problems == ["sources[0].topic: only an mqtt source takes this key",
                        "sources[1].watch: only a folder source takes this key",
                        "sources[2].device: only a mic source takes this key"]


def test_several_problems_of_one_file_are_all_reported(tmp_path):
    from monitor.daemon.config import FolderSourceConfig, MqttSourceConfig

    problems = problems_of({"batch_max": 0, "sources": [
        folder_source(tmp_path, hop_s=20.0, speed="fast"),
        {"id": "q", "kind": "mqtt", "model": "x", "topic": "a/+", "channels": 0, "bogus": 1}]})
    assert "batch_max: must be >= 1, got 0" in problems
    assert "sources[0].hop_s: must be <= window_s (got 20.0 > 10.0)" in problems
    assert "sources[0].speed: must be one of max, realtime, got 'fast'" in problems
    assert any(p.startswith("sources[1].bogus: unknown key (known: ") for p in problems)
    assert "sources[1].channels: must be >= 1, got 0" in problems
    assert "sources[1].topic: must not contain MQTT wildcards, got 'a/+'" in problems
    assert "sources[1].kind: an mqtt source needs the top-level mqtt: section" in problems
    cfg, _ = config_problems({"sources": [folder_source(tmp_path)]}, check_models=False)
    assert type(cfg.sources[0]) is FolderSourceConfig
    assert type(SourceConfig(id="q", kind="mqtt", model="x", topic="a")) is MqttSourceConfig


def test_many_long_problems_stay_one_short_line_and_the_rest_are_counted():
    from monitor.configload import ConfigError

    problems = [f"train.k{i}: unknown key " + "x" * 400 for i in range(30)]
    text = str(ConfigError("/some/train.yaml", problems))
    assert "\n" not in text and len(text) < 1000
    shown = text.count("unknown key")
    assert 1 <= shown < 30 and text.endswith(f"; and {30 - shown} more")
