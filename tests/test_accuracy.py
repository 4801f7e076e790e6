"""Ingest real Postfix logs from scenario/run.py and compare every counter with its truth.

tests/data/scenario/ holds one full run (see scenario/README.md): the same events in
three log formats and truth.json, derived from what the clients did and what the
sink answered. The `postfix` test makes a fresh short run and checks it the same way;
it uses Postfix's long queue ids (enable_long_queue_ids), the committed run the short
hex ones, so both forms are covered by real output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import report, run_cli

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_DATA = ROOT / "tests" / "data" / "scenario"
RUN_SCENARIO = ROOT / "scenario" / "run.py"
LOG_FORMATS = ("mail.log", "mail.log.rfc3339", "maillog_file.log")
SUMMED = ("auth_blk", "auth_rcv", "bounced", "deferred", "expired", "sent")


def last_stamp(rfc3339_log: Path) -> datetime:
    """Return the exact time of the last line of an RSYSLOG_FileFormat file."""
    last = rfc3339_log.read_text(encoding="utf-8").splitlines()[-1]
    return datetime.fromisoformat(last.split(" ", 1)[0])


def copy_log(src_dir: Path, name: str, dest_dir: Path) -> Path:
    """Copy one log file, dated shortly after its last line (the CLI takes the year from it)."""
    dest = dest_dir / name
    shutil.copyfile(src_dir / name, dest)
    mtime = (last_stamp(src_dir / "mail.log.rfc3339") + timedelta(minutes=1)).timestamp()
    os.utime(dest, (mtime, mtime))
    return dest


def write_config(tmp_path: Path) -> Path:
    """Write the smallest config the comparison needs: UTC days and a private database."""
    config = tmp_path / "mailtally.yaml"
    config.write_text(f"timezone: UTC\ndatabase: {tmp_path / 'tally.db'}\n", encoding="utf-8")
    return config


def mismatches(
    sender: str, truth_days: dict[str, dict[str, int]], got: dict[str, Any]
) -> list[str]:
    """Return one line per counter that differs between truth and a report."""
    problems = []
    days = {day["date"]: day for day in got["days"]}
    for date, want in truth_days.items():
        day = days.get(date)
        if day is None:
            problems.append(f"{sender} {date}: day missing from report")
            continue
        problems += [
            f"{sender} {date} {key}: report {day.get(key)}, truth {value}"
            for key, value in want.items()
            if day.get(key) != value
        ]
        if day.get("sum") != sum(day.get(key, 0) for key in SUMMED):
            problems.append(f"{sender} {date} sum: {day.get('sum')} is not the six columns' sum")
    for key in next(iter(truth_days.values())):
        want_total = sum(want[key] for want in truth_days.values())
        if got["total"].get(key) != want_total:
            problems.append(
                f"{sender} total {key}: report {got['total'].get(key)}, truth {want_total}"
            )
    return problems


def check_against_truth(log_dir: Path, name: str, tmp_path: Path) -> None:
    """Ingest `log_dir/name` into a fresh database and compare every sender with truth."""
    truth = json.loads((log_dir / "truth.json").read_text(encoding="utf-8"))
    assert truth["timezone"] == "UTC"
    config = write_config(tmp_path)
    db = tmp_path / "tally.db"
    run_cli("ingest", "--config", config, "--db", db, copy_log(log_dir, name, tmp_path))

    problems = []
    for sender, truth_days in truth["senders"].items():
        got = report(db, config, sender, min(truth_days), max(truth_days))
        assert got["sender"].lower() == sender
        problems += mismatches(sender, truth_days, got)
    assert not problems, f"{name}: {len(problems)} counters differ:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", LOG_FORMATS)
def test_committed_scenario_counts_match_truth(name: str, tmp_path: Path) -> None:
    check_against_truth(SCENARIO_DATA, name, tmp_path)


def test_committed_scenario_formats_hold_the_same_lines() -> None:
    bodies = []
    for name in LOG_FORMATS:
        # Drop the stamp: "Dec  3 10:51:04 " / "2026-...+00:00 " / "Dec 03 10:51:04 ".
        width = 1 if name.endswith("rfc3339") else 3
        lines = (SCENARIO_DATA / name).read_text(encoding="utf-8").splitlines()
        bodies.append([line.split(None, width)[width] for line in lines])
    assert bodies[0] == bodies[1] == bodies[2]


@pytest.mark.postfix
def test_live_short_scenario_counts_match_truth(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the scenario runs Postfix and owns /dev/log: needs root")
    missing = [cmd for cmd in ("postfix", "rsyslogd", "saslpasswd2") if not shutil.which(cmd)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (tools/setup-debian.sh)")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(RUN_SCENARIO), "--short", "--long-queue-ids", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    if proc.returncode == 2 and "midnight" in proc.stderr:
        pytest.skip(proc.stderr.strip())  # one run must not straddle two days
    assert proc.returncode == 0, f"scenario/run.py failed:\n{proc.stderr[-4000:]}"

    for name in LOG_FORMATS:
        work = tmp_path / name
        work.mkdir()
        check_against_truth(out, name, work)
