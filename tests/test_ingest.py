"""Ingest and store: idempotence, appends, rotation, gzip, bad bytes, crash safety."""

from __future__ import annotations

import gzip
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import ROOT, report, run_cli, stamp, utc, write_log
from mailtally.config import Config
from mailtally.ingest import Ingester
from mailtally.store import MIGRATIONS, open_reader, open_store

START = utc(2026, 12, 3, 8, 0, 0)


def message_lines(
    n: int,
    sender: str = "alice@campus.example",
    start_index: int = 0,
    form: str = "traditional",
    start: datetime = START,
) -> list[str]:
    """n complete messages, one second apart: client, qmgr, one delivery, removed."""
    out = []
    for i in range(start_index, start_index + n):
        t = stamp(start + timedelta(seconds=i), form)
        qid = f"{0xA0000 + i:X}"
        out += [
            f"{t} relay1 postfix/smtpd[10]: {qid}: client=web.campus.example[10.0.0.5]",
            f"{t} relay1 postfix/qmgr[11]: {qid}: from=<{sender}>, size=1, nrcpt=1 (queue active)",
            f"{t} relay1 postfix/smtp[12]: {qid}: to=<r{i}@dest.example>, relay=mx[192.0.2.1]:25,"
            f" delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)",
            f"{t} relay1 postfix/qmgr[11]: {qid}: removed",
        ]
    return out


def day(db: Path, cfg: Path, sender: str = "alice@campus.example") -> dict[str, int]:
    rep = report(db, cfg, sender, "2026-12-03", "2026-12-03")
    result: dict[str, int] = rep["days"][0]
    return result


def test_ingesting_twice_counts_nothing_twice(tmp_path: Path, utc_config: Path) -> None:
    log = write_log(tmp_path / "mail.log", message_lines(10), mtime=START + timedelta(hours=1))
    db = tmp_path / "tally.db"
    run_cli("ingest", "--config", utc_config, "--db", db, log)
    run_cli("ingest", "--config", utc_config, "--db", db, log)
    assert (day(db, utc_config)["messages"], day(db, utc_config)["sent"]) == (10, 10)


def test_appended_lines_are_counted_once(tmp_path: Path, utc_config: Path) -> None:
    log = write_log(tmp_path / "mail.log", message_lines(5), mtime=START + timedelta(hours=1))
    db = tmp_path / "tally.db"
    run_cli("ingest", "--config", utc_config, "--db", db, log)
    write_log(log, message_lines(7, start_index=5), mtime=START + timedelta(hours=1))
    run_cli("ingest", "--config", utc_config, "--db", db, log)
    assert day(db, utc_config)["messages"] == 12


def test_partial_last_line_waits_for_its_newline(tmp_path: Path, utc_config: Path) -> None:
    lines = message_lines(2)
    log = tmp_path / "mail.log"
    text = "\n".join(lines)  # the last line has no newline yet
    head, tail = text[:-20], text[-20:]
    log.write_text(head, encoding="utf-8")
    db = tmp_path / "tally.db"
    run_cli("ingest", "--config", utc_config, "--db", db, log)
    assert day(db, utc_config)["messages"] == 2  # the removed line is the one held back
    with log.open("a", encoding="utf-8") as f:
        f.write(tail + "\n")
    run_cli("ingest", "--config", utc_config, "--db", db, log)
    db_rows = (
        sqlite3.connect(db)
        .execute("SELECT count(*) FROM open_messages WHERE removed_ts IS NULL")
        .fetchone()[0]
    )
    assert db_rows == 0  # the completed "removed" line closed the message
    assert day(db, utc_config)["sent"] == 2


def test_rotated_and_compressed_copy_resumes_where_the_original_stopped(
    tmp_path: Path, utc_config: Path
) -> None:
    db = tmp_path / "tally.db"
    log = write_log(tmp_path / "mail.log", message_lines(4), mtime=START + timedelta(hours=1))
    run_cli("ingest", "--config", utc_config, "--db", db, log)
    # The same file grows, is renamed and compressed by logrotate; a new file starts.
    write_log(log, message_lines(3, start_index=4))
    rotated = tmp_path / "mail.log.1.gz"
    with gzip.open(rotated, "wb") as gz:
        gz.write(log.read_bytes())
    os.utime(rotated, ((START + timedelta(hours=1)).timestamp(),) * 2)
    log.unlink()
    fresh = write_log(
        tmp_path / "mail.log", message_lines(2, start_index=7), mtime=START + timedelta(hours=2)
    )
    run_cli("ingest", "--config", utc_config, "--db", db, fresh, rotated)
    assert day(db, utc_config)["messages"] == 9


def test_gzip_file_with_a_final_line_without_newline(tmp_path: Path, utc_config: Path) -> None:
    rotated = tmp_path / "mail.log.2.gz"
    with gzip.open(rotated, "wt", encoding="utf-8") as gz:
        gz.write("\n".join(message_lines(3)))
    os.utime(rotated, ((START + timedelta(hours=1)).timestamp(),) * 2)
    db = tmp_path / "tally.db"
    run_cli("ingest", "--config", utc_config, "--db", db, rotated)
    assert day(db, utc_config)["sent"] == 3


def test_message_queued_in_one_run_is_attributed_in_the_next(
    tmp_path: Path, utc_config: Path
) -> None:
    t1, t2 = stamp(START), stamp(START + timedelta(days=1))
    first = write_log(
        tmp_path / "mail.log.1",
        [
            f"{t1} relay1 postfix/smtpd[10]: ABCDE1: client=web[10.0.0.5], sasl_method=PLAIN, "
            "sasl_username=alice",
            f"{t1} relay1 postfix/qmgr[11]: ABCDE1: from=<alice@campus.example>, size=1, nrcpt=1 "
            "(queue active)",
            f"{t1} relay1 postfix/smtp[12]: ABCDE1: to=<x@dest.example>, relay=mx[192.0.2.1]:25, "
            "delay=1, delays=0/0/0/1, dsn=4.4.1, status=deferred (connect timed out)",
        ],
        mtime=START + timedelta(hours=1),
    )
    second = write_log(
        tmp_path / "mail.log",
        [
            f"{t2} relay1 postfix/qmgr[11]: ABCDE1: from=<alice@campus.example>, size=1, nrcpt=1 "
            "(queue active)",
            f"{t2} relay1 postfix/smtp[12]: ABCDE1: to=<x@dest.example>, relay=mx[192.0.2.1]:25, "
            "delay=9, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)",
            f"{t2} relay1 postfix/qmgr[11]: ABCDE1: removed",
        ],
        mtime=START + timedelta(days=1, hours=1),
    )
    db = tmp_path / "tally.db"
    run_cli("ingest", "--config", utc_config, "--db", db, first)
    run_cli("ingest", "--config", utc_config, "--db", db, second)
    rep = report(db, utc_config, "alice@campus.example", "2026-12-03", "2026-12-04", "--details")
    d1, d2 = rep["days"]
    assert (d1["messages"], d1["auth_rcv"], d1["deferred"], d1["sent"]) == (1, 1, 1, 0)
    assert (d2["messages"], d2["deferred"], d2["sent"]) == (0, 0, 1)
    assert [d["sender_ip"] for d in rep["details"]] == ["10.0.0.5", "10.0.0.5"]
    assert (
        sqlite3.connect(db)
        .execute("SELECT count(*) FROM open_messages WHERE removed_ts IS NULL")
        .fetchone()[0]
        == 0
    )


def test_files_are_read_oldest_first_whatever_their_order(
    tmp_path: Path, utc_config: Path
) -> None:
    lines = message_lines(1)
    old = write_log(tmp_path / "mail.log.1", lines[:2], mtime=START + timedelta(hours=1))
    new = write_log(tmp_path / "mail.log", lines[2:], mtime=START + timedelta(hours=2))
    db = tmp_path / "tally.db"
    run_cli("ingest", "--config", utc_config, "--db", db, new, old)
    assert day(db, utc_config)["sent"] == 1


def test_bad_bytes_are_counted_and_skipped(tmp_path: Path, utc_config: Path) -> None:
    good = message_lines(3)
    log = tmp_path / "mail.log"
    with log.open("wb") as f:
        f.write((good[0] + "\n").encode())
        f.write(b"Dec  3 08:00:00 relay1 postfix/smtpd[1]: caf\xe9 \xff\xfe\n")  # latin-1
        f.write(b"\x00" * 4096 + b"\n")  # a hole left by a crash
        f.write(("\n".join(good[1:]) + "\n").encode())
        f.write(b"Dec  3 08:00:00 relay1 postfix/smtpd[1]: " + b"x" * (1024 * 1024) + b"\n")
        f.write(b"\n")
    os.utime(log, ((START + timedelta(hours=1)).timestamp(),) * 2)
    db = tmp_path / "tally.db"
    proc = run_cli("-v", "ingest", "--config", utc_config, "--db", db, log)
    assert "encoding=1" in proc.stderr
    assert "length=1" in proc.stderr
    assert "nul=1" in proc.stderr
    assert day(db, utc_config)["sent"] == 3


def test_endless_line_without_newline_is_bounded(tmp_path: Path, utc_config: Path) -> None:
    log = tmp_path / "mail.log"
    with log.open("wb") as f:
        f.write(("\n".join(message_lines(1)) + "\n").encode())
        f.write(b"y" * (8 * 1024 * 1024))
        f.write(b"\n" + ("\n".join(message_lines(1, start_index=1)) + "\n").encode())
    os.utime(log, ((START + timedelta(hours=1)).timestamp(),) * 2)
    db = tmp_path / "tally.db"
    proc = run_cli("-v", "ingest", "--config", utc_config, "--db", db, log)
    assert "length=1" in proc.stderr
    assert day(db, utc_config)["sent"] == 2


def test_empty_file_and_file_without_complete_line(tmp_path: Path, utc_config: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    partial = tmp_path / "partial.log"
    partial.write_bytes(b"Dec  3 08:00:00 relay1 postfix/qmgr[1]: ABC")
    db = tmp_path / "tally.db"
    run_cli("ingest", "--config", utc_config, "--db", db, empty, partial)
    assert day(db, utc_config)["messages"] == 0


def test_store_commits_counters_and_position_together(tmp_path: Path) -> None:
    config = Config(timezone="UTC", database=tmp_path / "t.db")
    log = write_log(tmp_path / "mail.log", message_lines(3), mtime=START + timedelta(hours=1))
    store = open_store(config.database)
    Ingester(store, config).ingest(log)
    store.close()
    conn = sqlite3.connect(config.database)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    (offset,) = conn.execute("SELECT offset FROM positions").fetchone()
    assert offset == log.stat().st_size
    assert conn.execute("SELECT sum(messages) FROM counters").fetchone()[0] == 3
    assert conn.execute("SELECT count(*) FROM details").fetchone()[0] == 3


def test_reader_refuses_a_newer_schema(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    open_store(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(Exception, match="schema version"):
        open_reader(db)
    with pytest.raises(Exception, match="newer than this mailtally"):
        open_store(db)


def _counters(db: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT * FROM counters ORDER BY sender, day").fetchall()
    details = conn.execute(
        "SELECT ts, sender, queue_id, recipient, status FROM details ORDER BY ts, queue_id, "
        "recipient, status"
    ).fetchall()
    conn.close()
    return [*rows, *details]


def test_kill_9_during_ingest_loses_and_doubles_nothing(tmp_path: Path) -> None:
    # Many senders, deferrals spanning batches, so open messages cross commits.
    lines: list[str] = []
    for i in range(30_000):
        t = stamp(START + timedelta(seconds=i))
        qid = f"{0xB00000 + i:X}"
        sender = f"user{i % 97}@campus.example"
        lines += [
            f"{t} relay1 postfix/smtpd[10]: {qid}: client=web[10.0.{i % 250}.1]",
            f"{t} relay1 postfix/qmgr[11]: {qid}: from=<{sender}>, size=1, nrcpt=1 (queue active)",
        ]
        if i >= 3:  # the message queued 3 iterations ago is delivered now
            old = f"{0xB00000 + i - 3:X}"
            status = "deferred" if i % 5 == 0 else "sent"
            lines.append(
                f"{t} relay1 postfix/smtp[12]: {old}: to=<r@d.example>, relay=mx[1.2.3.4]"
                f":25, delay=1, delays=0/0/0/1, dsn=2.0.0, status={status} (ok)"
            )
            if status == "sent":
                lines.append(f"{t} relay1 postfix/qmgr[11]: {old}: removed")
    log = write_log(tmp_path / "mail.log", lines, mtime=START + timedelta(days=1))
    cfg = tmp_path / "small-batches.yaml"
    cfg.write_text("timezone: UTC\ningest: {batch_lines: 500}\n", encoding="utf-8")

    clean = tmp_path / "clean.db"
    started = time.monotonic()
    run_cli("ingest", "--config", cfg, "--db", clean, log)
    took = time.monotonic() - started
    expected = _counters(clean)

    crashed = tmp_path / "crashed.db"
    kills = 0
    chance = random.Random(7)
    # Kill points spread over one uninterrupted run's duration; each run resumes
    # where the killed one had committed.
    for delay in sorted(chance.uniform(0.15, 0.6) * took for _ in range(6)):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailtally",
                "ingest",
                "--config",
                str(cfg),
                "--db",
                str(crashed),
                str(log),
            ],
            cwd=ROOT,
        )
        time.sleep(delay)  # the point of the kill, not a wait for readiness
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    run_cli("ingest", "--config", cfg, "--db", crashed, log)
    assert kills >= 2, f"ingest finished before the kills ({took:.2f} s); make the log longer"
    assert _counters(crashed) == expected


def test_details_older_than_details_days_are_pruned(tmp_path: Path) -> None:
    cfg = tmp_path / "keep.yaml"
    cfg.write_text("timezone: UTC\ndetails_days: 35\n", encoding="utf-8")
    recent = datetime.now(UTC) - timedelta(hours=1)
    lines = message_lines(1, form="rfc3339", start=utc(2020, 1, 1, 8))
    lines += message_lines(1, start_index=1, form="rfc3339", start=recent)
    log = write_log(tmp_path / "mail.log", lines)
    db = tmp_path / "tally.db"
    run_cli("ingest", "--config", cfg, "--db", db, log)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM details").fetchone()[0] == 1
    assert conn.execute("SELECT sum(sent) FROM counters").fetchone()[0] == 2  # counters stay
