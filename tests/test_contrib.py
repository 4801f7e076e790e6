"""Shipped files an admin installs: systemd units pass systemd-analyze verify."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

UNITS = ROOT / "contrib" / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_units_verify(tmp_path: Path) -> None:
    mailtally = Path(sys.executable).with_name("mailtally")
    assert mailtally.exists(), "the package is not installed in this environment"
    for unit in ("mailtally.service", "mailtally-ingest.service", "mailtally-ingest.timer"):
        text = (UNITS / unit).read_text(encoding="utf-8")
        (tmp_path / unit).write_text(
            text.replace("/usr/local/bin/mailtally", str(mailtally)), encoding="utf-8"
        )
    proc = subprocess.run(
        ["systemd-analyze", "verify", *(str(p) for p in sorted(tmp_path.iterdir()))],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    # Other units installed on the machine may have warnings of their own.
    ours = [line for line in proc.stderr.splitlines() if "mailtally" in line]
    assert ours == []


def test_daemon_unit_is_hardened_and_notifies() -> None:
    unit = (UNITS / "mailtally.service").read_text(encoding="utf-8")
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in unit.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert settings["Type"] == "notify"
    assert settings["WatchdogSec"]
    assert settings["ProtectSystem"] == "strict"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["PrivateTmp"] == "yes"
    assert settings["StateDirectory"] == "mailtally"
    assert set(settings["SupplementaryGroups"].split()) == {"adm", "systemd-journal"}
    assert settings["KillMode"] == "mixed"  # the writer child must outlive the SIGTERM
    assert "run" in settings["ExecStart"].split()
