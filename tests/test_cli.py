"""The command line: help, report formats, top, check-config, exit codes, one-line errors."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import ROOT, report, run_cli, stamp, utc, write_log

START = utc(2026, 12, 3, 8, 0, 0)


@pytest.fixture
def db(tmp_path: Path, utc_config: Path) -> Path:
    t = stamp(START)
    t2 = stamp(START + timedelta(days=2))
    lines = []
    for i, sender in enumerate(["alice@campus.example"] * 3 + ["bob@campus.example"]):
        qid = f"C0FFEE{i}"
        lines += [
            f"{t} relay1 postfix/smtpd[10]: {qid}: client=web[10.0.0.{i}]",
            f"{t} relay1 postfix/qmgr[11]: {qid}: from=<{sender}>, size=1, nrcpt=1 (queue active)",
            f"{t} relay1 postfix/smtp[12]: {qid}: to=<r{i}@dest.example>, relay=mx[192.0.2.1]:25,"
            f" delay=1, delays=0/0/0/1, dsn=5.1.1, status=bounced (550 <b>no</b> such user)",
            f"{t} relay1 postfix/qmgr[11]: {qid}: removed",
        ]
    lines.append(
        f"{t2} relay1 postfix/qmgr[11]: C0FFEE9: from=<alice@campus.example>, size=1, "
        "nrcpt=1 (queue active)"
    )
    log = write_log(tmp_path / "mail.log", lines, mtime=START + timedelta(days=2, hours=1))
    path = tmp_path / "tally.db"
    run_cli("ingest", "--config", utc_config, "--db", path, log)
    return path


@pytest.mark.parametrize("command", ["", "ingest", "report", "top", "check-config", "run"])
def test_help_is_complete(command: str) -> None:
    proc = run_cli(*([command] if command else []), "--help")
    assert proc.returncode == 0
    assert "usage: mailtally" in proc.stdout
    assert "exit status" in proc.stdout
    if command == "report":
        for word in ("auth_blk", "auth_rcv", "--details", "--since", "default: today"):
            assert word in proc.stdout
    if command == "ingest":
        assert "gzip" in proc.stdout
        assert "twice" in proc.stdout


def test_report_json_has_every_day_and_a_total(db: Path, utc_config: Path) -> None:
    rep = report(db, utc_config, "Alice@Campus.Example", "2026-12-02", "2026-12-06", "--details")
    assert rep["sender"] == "alice@campus.example"
    assert (rep["since"], rep["until"]) == ("2026-12-02", "2026-12-06")
    assert [d["date"] for d in rep["days"]] == [f"2026-12-0{i}" for i in range(2, 7)]
    dec3 = rep["days"][1]
    assert (dec3["messages"], dec3["bounced"], dec3["sum"]) == (3, 3, 3)
    assert rep["days"][3]["messages"] == 1
    assert rep["days"][0] == {
        "date": "2026-12-02",
        "sum": 0,
        "auth_blk": 0,
        "auth_rcv": 0,
        "bounced": 0,
        "deferred": 0,
        "expired": 0,
        "sent": 0,
        "messages": 0,
    }
    assert rep["total"]["messages"] == 4
    assert rep["total"]["bounced"] == 3
    assert set(rep["total"]) == set(dec3) - {"date"}
    assert [d["no"] for d in rep["details"]] == [1, 2, 3]
    first = rep["details"][0]
    assert set(first) == {
        "no",
        "time",
        "sender_ip",
        "relay",
        "queue_id",
        "recipient",
        "status",
        "response",
    }
    assert first["time"] == "2026-12-03T08:00:00+00:00"
    assert (first["sender_ip"], first["relay"], first["status"]) == (
        "10.0.0.0",
        "relay1",
        "bounced",
    )
    assert "550 <b>no</b> such user" in first["response"]


def test_report_in_another_zone_moves_the_day(db: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "taipei.yaml"
    cfg.write_text("timezone: Asia/Taipei\n", encoding="utf-8")
    rep = report(db, cfg, "bob@campus.example", "2026-12-03", "2026-12-03", "--details")
    # Counters were cut by day in UTC at ingest; details are shown in the report's zone.
    assert rep["details"][0]["time"] == "2026-12-03T16:00:00+08:00"


def test_report_csv_and_table(db: Path, utc_config: Path) -> None:
    base = (
        "report",
        "--config",
        utc_config,
        "--db",
        db,
        "--sender",
        "alice@campus.example",
        "--since",
        "2026-12-03",
        "--until",
        "2026-12-04",
    )
    rows = list(csv.reader(io.StringIO(run_cli(*base, "--format", "csv").stdout)))
    assert rows[0] == [
        "date",
        "sum",
        "auth_blk",
        "auth_rcv",
        "bounced",
        "deferred",
        "expired",
        "sent",
        "messages",
    ]
    assert rows[1][0] == "2026-12-03"
    assert rows[-1][0] == "Total"
    assert rows[-1][-1] == "3"
    table = run_cli(*base).stdout
    assert "Auth_blk" in table
    assert "Total" in table
    assert table.count("\n") >= 5


def test_top_ranks_senders(db: Path, utc_config: Path) -> None:
    out = run_cli(
        "top", "--config", utc_config, "--db", db, "--day", "2026-12-03", "--format", "json"
    ).stdout
    top = json.loads(out)
    assert [s["sender"] for s in top["senders"]] == ["alice@campus.example", "bob@campus.example"]
    assert top["senders"][0]["messages"] == 3
    out = run_cli(
        "top",
        "--config",
        utc_config,
        "--db",
        db,
        "--day",
        "2026-12-03",
        "--limit",
        "1",
        "--by",
        "bounced",
    ).stdout
    assert "alice@campus.example" in out
    assert "bob@campus.example" not in out


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (("report", "--sender", "a@b", "--since", "2026-13-01"), 2, "expected YYYY-MM-DD"),
        (
            ("report", "--sender", "a@b", "--since", "2026-12-05", "--until", "2026-12-01"),
            2,
            "is after --until",
        ),
        (("top", "--limit", "0"), 2, "expected a positive integer"),
        (("report", "--sender", "a@b", "--db", "/nonexistent/x.db"), 1, "no such database"),
        (("ingest", "--db", "{tmp}/x.db", "/nonexistent/mail.log"), 1, "cannot read"),
        (("report",), 2, "--sender"),
    ],
)
def test_errors_are_one_line_with_the_right_exit_code(
    tmp_path: Path, args: tuple[str, ...], code: int, text: str
) -> None:
    args = tuple(a.replace("{tmp}", str(tmp_path)) for a in args)
    proc = run_cli(*args, check=False)
    assert proc.returncode == code
    assert text in proc.stderr
    if code == 1:
        assert proc.stderr.count("\n") == 1
        assert "Traceback" not in proc.stderr


def test_check_config_names_file_line_and_key(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "timezone: UTC\ncorrelate:\n  max_open: 1000\n  max_age: 6d\n", encoding="utf-8"
    )
    assert run_cli("check-config", good).stdout.strip() == f"{good}: ok"

    cases = {
        "timezone: UTC\ncorrelate:\n  max_open: ten\n": "3: correlate.max_open: expected a "
        "positive integer, got 'ten'",
        "timezone: UTC\nidentiy: sasl\n": "2: identiy: unknown key",
        "timezone: Mars/Olympus\n": "1: timezone: unknown time zone 'Mars/Olympus'",
        "sources:\n  - file: /var/log/mail.log\n  - journl: {}\n": "3: sources[1]",
        "timezone: [\n": "invalid YAML",
        "correlate:\n  max_age: soon\n": "2: correlate.max_age: expected a duration",
    }
    for text, expected in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text, encoding="utf-8")
        proc = run_cli("check-config", bad, check=False)
        assert proc.returncode == 2, text
        assert expected in proc.stderr, (text, proc.stderr)
        assert proc.stderr.count("\n") == 1
        assert str(bad) in proc.stderr


def test_example_config_is_valid() -> None:
    proc = run_cli("check-config", ROOT / "etc" / "mailtally.yaml")
    assert proc.stdout.strip().endswith(": ok")


def test_report_looks_the_sender_up_as_it_was_counted(tmp_path: Path) -> None:
    cfg = tmp_path / "strip.yaml"
    cfg.write_text("timezone: UTC\ncorrelate: {strip_extension: true}\n", encoding="utf-8")
    t = stamp(START)
    log = write_log(
        tmp_path / "mail.log",
        [
            f"{t} relay1 postfix/qmgr[11]: C0FFEE1: from=<Alice+Lists@Campus.Example>, size=1, "
            "nrcpt=1 (queue active)"
        ],
        mtime=START + timedelta(hours=1),
    )
    db = tmp_path / "tally.db"
    run_cli("ingest", "--config", cfg, "--db", db, log)
    rep = report(db, cfg, "<alice+news@campus.example>", "2026-12-03", "2026-12-03")
    assert rep["sender"] == "alice@campus.example"
    assert rep["days"][0]["messages"] == 1
