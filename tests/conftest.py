"""Shared helpers: write real log files, run the real CLI, read reports back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _check_compiled_modules() -> None:
    """Stop at once if a mypyc-compiled module is older than its source.

    Python imports the compiled parse/correlate/ingest before their .py files; after an
    edit they must be rebuilt (``sh tools/setup-debian.sh``), or the tests would test the old code.
    """
    package = ROOT / "daemon" / "mailtally"
    for compiled in package.rglob("*.so"):
        source = compiled.with_name(compiled.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
            pytest.exit(
                f"{compiled.name} is older than {source.name}: run 'sh tools/setup-debian.sh'", 2
            )


_check_compiled_modules()


def stamp(ts: datetime, form: str = "traditional") -> str:
    """Format a syslog header stamp the way rsyslog or postlogd writes it."""
    if form == "traditional":
        return f"{ts:%b} {ts.day:2d} {ts:%H:%M:%S}"
    if form == "postlogd":
        return f"{ts:%b %d %H:%M:%S}"
    return ts.isoformat(timespec="microseconds")


def write_log(path: Path, lines: Iterable[str], mtime: datetime | None = None) -> Path:
    """Write lines with newlines, as rsyslog does, and set the file's mtime."""
    with path.open("a", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    if mtime is not None:
        os.utime(path, (mtime.timestamp(), mtime.timestamp()))
    return path


def run_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real ``mailtally`` command in a child process."""
    proc = subprocess.run(
        [sys.executable, "-m", "mailtally", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mailtally {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def report(
    db: Path, config: Path, sender: str, since: str, until: str, *extra: str
) -> dict[str, Any]:
    out = run_cli(
        "report",
        "--config",
        config,
        "--db",
        db,
        "--sender",
        sender,
        "--since",
        since,
        "--until",
        until,
        "--format",
        "json",
        *extra,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.fixture
def utc_config(tmp_path: Path) -> Path:
    path = tmp_path / "mailtally.yaml"
    path.write_text(f"timezone: UTC\ndatabase: {tmp_path / 'tally.db'}\n", encoding="utf-8")
    return path


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)  # type: ignore[misc]


@pytest.fixture
def expected(tmp_path: Path) -> dict[str, Any]:
    """The database one uninterrupted `mailtally ingest` of the scenario log leaves."""
    from daemonproc import scenario_expected

    return scenario_expected(tmp_path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate for 127.0.0.1, made by openssl; (key, cert)."""
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", *request, *subject, "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return key, cert
