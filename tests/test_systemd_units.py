"""The systemd units in systemd/: they run the real `harken` commands on configs we ship, keep the
hardening, the worker template uses its instance, and `systemd-analyze verify` accepts them."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from monitor.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))
# /etc/harken/<name> in a unit is installed from config/<example> (README "Install").
SHIPPED = {"harken.yaml": "harken.example.yaml", "worker.yaml": "harken.worker.example.yaml"}
HARDENING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges", "DevicePolicy",
             "ProtectKernelTunables", "ProtectKernelModules", "RestrictNamespaces",
             "RestrictAddressFamilies", "SystemCallFilter", "User")


def _service(unit: Path) -> dict[str, list[str]]:
    """The [Service] section, each key to all its values (systemd keys repeat: DeviceAllow=)."""
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                   comment_prefixes=("#", ";"), dict_type=_MultiDict)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read(unit)
    return {k: v.split("\n") for k, v in cp["Service"].items()}


class _MultiDict(dict):
    """configparser's section dict that joins repeated keys with newlines instead of overwriting."""

    def __setitem__(self, key, value):
        if isinstance(value, list) and key in self:
            value = self[key] + value
        super().__setitem__(key, value)


def test_units_exist():
    names = {u.name for u in UNITS}
    assert {"harken.service", "harken-worker@.service"} <= names


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_exec_lines_are_real_commands_on_shipped_configs(unit):
    svc = _service(unit)
    parser = build_parser()
    for key in ("ExecStartPre", "ExecStart"):
        for line in svc[key]:
            argv = shlex.split(line)
            assert argv[0] == "/usr/local/bin/harken", line
            args = parser.parse_args(argv[1:])  # SystemExit (a failure) on an unknown command
            assert callable(args.func)
            config = Path(getattr(args, "config", None) or args.file)
            assert config.parent == Path("/etc/harken"), line
            assert (ROOT / "config" / SHIPPED[config.name]).is_file(), line


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_hardening_present(unit):
    svc = _service(unit)
    missing = [k for k in HARDENING if k not in svc]
    assert not missing, f"{unit.name} lacks {missing}"
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["NoNewPrivileges"] == ["yes"]
    assert svc["RestartPreventExitStatus"] == ["2"]  # UsageError exits 2


def test_worker_template_uses_instance():
    svc = _service(ROOT / "systemd" / "harken-worker@.service")
    assert "HARKEN_INSTANCE=%i" in svc["Environment"]
    assert any("%i" in v for v in svc["StateDirectory"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify(unit, tmp_path):
    target = unit
    if unit.name.endswith("@.service"):  # a template verifies as one instance of it
        target = tmp_path / unit.name.replace("@.", "@0.")
        target.write_text(unit.read_text())
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(target)],
                       capture_output=True, text=True, timeout=60)
    # /usr/local/bin/harken is not installed here; anything else it reports is a real fault.
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()
              and "Command /usr/local/bin/harken is not executable" not in ln]
    assert not errors, r.stderr
