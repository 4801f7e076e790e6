"""`mailtally run` as systemd runs it: signals, kill -9, notify, reload, bad conditions.

Every test starts the real daemon as a child process on a log a real Postfix wrote and
compares the database with what one uninterrupted `mailtally ingest` of the same lines
stores: counters, details and open messages, exactly.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DATA, ROOT
from daemonproc import (
    COUNTED,
    SCENARIO,
    Running,
    append,
    daemon_config,
    dump,
    file_run,
    ingested,
    wait_equal,
    wait_for,
)
from journalfiles import JOURNAL_REMOTE, write_journal
from mailtally.sources.journal import journal_missing

LINES = SCENARIO


class Feeder(threading.Thread):
    """Append the log in small pieces at a steady pace, as Postfix's traffic would."""

    def __init__(self, log: Path, lines: list[str], per_write: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.log, self.lines, self.per_write, self.pause = log, lines, per_write, pause

    def run(self) -> None:
        for i in range(0, len(self.lines), self.per_write):
            append(self.log, self.lines[i : i + self.per_write])
            time.sleep(self.pause)


def committed_offset(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT max(offset) FROM positions").fetchone()
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()
    return int(row[0] or 0)


def test_kill_9_at_random_points_loses_and_doubles_nothing(
    tmp_path: Path, expected: dict[str, object]
) -> None:
    # Small batches: every kill lands among many commits, mostly in the middle of one.
    run = file_run(tmp_path, "ingest: {batch_lines: 20, batch_interval: 50ms}\n")
    log, db, cfg = run.log, run.db, run.config
    feeder = Feeder(log, LINES, per_write=12, pause=0.035)
    feeder.start()
    chance = random.Random(20261203)
    progress = []
    for i in range(14):
        daemon = Running(cfg, tmp_path)
        time.sleep(chance.uniform(0.35, 0.9))  # the kill point; start-up takes ~0.3 s
        daemon.kill(whole_group=i % 3 == 2)  # now and then the writer dies with it
        progress.append(committed_offset(db))
    feeder.join(timeout=60)
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_equal(db, expected)
        daemon.stop()
    assert dump(db) == expected
    size = log.stat().st_size
    mid_stream = {p for p in progress if 0 < p < size}
    assert len(mid_stream) >= 5, f"too few kills mid-stream: {progress} of {size}"


def test_sigterm_mid_stream_commits_and_exits_within_seconds(
    tmp_path: Path, expected: dict[str, object]
) -> None:
    run = file_run(tmp_path)
    log, db, cfg = run.log, run.db, run.config
    feeder = Feeder(log, LINES, per_write=10, pause=0.02)
    stops = []
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        feeder.start()
        time.sleep(0.7)
        offset_before = committed_offset(db)
        stops.append(daemon.stop())
        assert "STOPPING" in [m.split("=")[0] for _, m in daemon.messages]
        # The last batch was committed on the way out: nothing read is left over.
        assert committed_offset(db) >= offset_before
    feeder.join(timeout=60)
    for _ in range(3):  # repeated restarts, the log having moved on meanwhile
        with Running(cfg, tmp_path) as daemon:
            daemon.wait_ready()
            time.sleep(0.2)
            stops.append(daemon.stop())
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_equal(db, expected)
        stops.append(daemon.stop())
    assert dump(db) == expected
    assert max(stops) < 5.0, stops


def test_notify_ready_status_and_watchdog_pings(tmp_path: Path) -> None:
    run = file_run(tmp_path)
    append(run.log, LINES)
    with Running(run.config, tmp_path, watchdog_usec=200_000) as daemon:
        daemon.wait_ready()
        wait_for(lambda: len(daemon.sent("WATCHDOG")) >= 8, 10, "watchdog pings")
        wait_for(lambda: len(daemon.sent("STATUS")) >= 2, 15, "a periodic STATUS")
        status = daemon.sent("STATUS")[-1]
        assert "lines/s" in status
        assert "lag" in status
        assert "open messages" in status
        # A stopped loop stops pinging (systemd then restarts the service).
        daemon.signal(signal.SIGSTOP)
        time.sleep(0.2)
        before = len(daemon.sent("WATCHDOG"))
        time.sleep(1.0)
        during = len(daemon.sent("WATCHDOG")) - before
        daemon.signal(signal.SIGCONT)
        wait_for(lambda: len(daemon.sent("WATCHDOG")) > before + 2, 10, "pings after SIGCONT")
        assert during == 0
        daemon.stop()
        ready = [t for t, m in daemon.messages if "READY=1" in m]
        stopping = [t for t, m in daemon.messages if "STOPPING=1" in m]
        assert len(ready) == 1
        assert len(stopping) == 1
        assert ready[0] < stopping[0]


def test_sighup_reloads_and_a_bad_config_keeps_the_old_one(tmp_path: Path) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    db = tmp_path / "run.db"
    cfg = daemon_config(tmp_path, db, [f"{{file: {first}}}"])
    half = len(LINES) // 2
    append(first, LINES[:half])
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        daemon_config(tmp_path, db, [f"{{file: {first}}}", f"{{file: {second}}}"])
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in daemon.log(), 10, "the reload")
        relay2 = [line.replace(" relay1 ", " relay2 ", 1) for line in LINES]
        append(second, relay2)
        cfg.write_text(cfg.read_text() + "ingest: {batch_lines: lots}\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "configuration not reloaded" in daemon.log(), 10, "the refusal")
        assert "ingest.batch_lines: expected a positive integer" in daemon.log()
        append(first, LINES[half:])  # still followed, by the old configuration
        expected_dir = tmp_path / "expected"
        expected_dir.mkdir()
        shutil.copy(first, expected_dir / "a.log")
        shutil.copy(second, expected_dir / "b.log")
        from conftest import run_cli

        good = daemon_config(tmp_path, tmp_path / "e.db", ["{file: /x}"], name="good.yaml")
        run_cli("ingest", "--config", good, expected_dir / "a.log", expected_dir / "b.log")
        wait_equal(db, dump(tmp_path / "e.db", COUNTED))
        daemon.stop()
        # Each SIGHUP reloads; so does the file watch on each rewrite of the file.
        assert len(daemon.sent("RELOADING")) >= 2


def test_database_locked_for_seconds_is_retried_without_stalling(
    tmp_path: Path, expected: dict[str, object]
) -> None:
    run = file_run(tmp_path)
    log, db, cfg = run.log, run.db, run.config
    append(log, LINES[:100])
    with Running(cfg, tmp_path, watchdog_usec=400_000) as daemon:
        daemon.wait_ready()
        wait_for(lambda: committed_offset(db) > 0, 20, "the first commit")
        admin = sqlite3.connect(db, isolation_level=None)
        admin.execute("BEGIN EXCLUSIVE")  # an admin's sqlite3 session, writing
        append(log, LINES[100:])
        time.sleep(1.5)  # past the writer's busy timeout
        pings = len(daemon.sent("WATCHDOG"))
        time.sleep(2.0)
        assert len(daemon.sent("WATCHDOG")) >= pings + 3, "the main loop stalled"
        admin.execute("ROLLBACK")
        admin.close()
        wait_equal(db, expected)
        daemon.stop()
        text = daemon.log()
    assert text.count("database write failed, retrying") == 1
    assert text.count("database write recovered") == 1  # logged at INFO, the daemon default


@contextlib.contextmanager
def small_filesystem(size: str) -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="mailtally-full-"))
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)
        where.rmdir()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root")
def test_disk_full_is_retried_and_loses_nothing(
    tmp_path: Path, expected: dict[str, object]
) -> None:
    log = tmp_path / "mail.log"
    with small_filesystem("4m") as full:
        db = full / "run.db"
        cfg = daemon_config(tmp_path, db, [f"{{file: {log}}}"])
        append(log, LINES[:50])
        with Running(cfg, tmp_path) as daemon:
            daemon.wait_ready()
            wait_for(lambda: committed_offset(db) > 0, 20, "the first commit")
            filler = full / "filler"
            with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
                while True:  # until the file system is full
                    f.write(b"\0" * 65536)
            append(log, LINES[50:])
            wait_for(lambda: "database write failed" in daemon.log(), 20, "the failure")
            assert dump(db) != expected
            filler.unlink()
            wait_equal(db, expected)
            daemon.stop()
            assert "database or disk is full" in daemon.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as another user")
def test_unreadable_log_is_retried_until_readable() -> None:
    # Root reads everything; the daemon runs as nobody here, as it would under systemd.
    work = Path(tempfile.mkdtemp(prefix="mailtally-perm-"))
    try:
        work.chmod(0o777)
        log = work / "mail.log"
        append(log, LINES)
        log.chmod(0o600)
        db = work / "run.db"
        cfg = daemon_config(work, db, [f"{{file: {log}}}"])
        expected = ingested(work, cfg, LINES, "whole")
        with Running(cfg, work, user="nobody") as daemon:
            daemon.wait_ready()
            wait_for(lambda: "Permission denied" in daemon.log(), 10, "the warning")
            time.sleep(1.0)  # several polls: it must not repeat itself
            log.chmod(0o644)
            wait_equal(db, expected)
            daemon.stop()
            assert daemon.log().count("Permission denied") == 1
    finally:
        shutil.rmtree(work)


def test_logs_for_the_journal_carry_priorities_not_timestamps(tmp_path: Path) -> None:
    run = file_run(tmp_path)
    with Running(run.config, tmp_path, env={"JOURNAL_STREAM": "8:12345"}) as daemon:
        daemon.wait_ready()
        daemon.stop()
        lines = daemon.log().splitlines()
    assert lines
    assert all(line.startswith(("<6>", "<4>")) for line in lines), lines
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), lines


RFC3339 = (DATA / "scenario" / "mail.log.rfc3339").read_text(encoding="utf-8").splitlines()


@pytest.mark.journal
@pytest.mark.skipif(journal_missing() is not None, reason="needs systemd-python")
@pytest.mark.skipif(not JOURNAL_REMOTE.exists(), reason="needs systemd-journal-remote")
def test_journal_source_kill_9_and_sigterm_lose_and_double_nothing(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    db = tmp_path / "run.db"
    cfg = daemon_config(
        tmp_path,
        db,
        [f"{{journal: {{directory: {journal}, start: oldest}}}}"],
        extra="ingest: {batch_lines: 20, batch_interval: 50ms}\n",
    )
    expected = ingested(tmp_path, cfg, RFC3339, "rfc3339")
    chunks = [RFC3339[i : i + 60] for i in range(0, len(RFC3339), 60)]
    write_journal(journal, chunks[0])
    chance = random.Random(3)
    try:
        for i, chunk in enumerate(chunks[1:]):
            daemon = Running(cfg, tmp_path)
            write_journal(journal, chunk)  # appended while it starts and reads
            time.sleep(chance.uniform(0.3, 0.7))
            if i % 4 == 3:
                daemon.wait_ready()  # SIGTERM mid-stream (before READY it may not be ours yet)
                daemon.stop()
            else:
                daemon.kill(whole_group=i % 3 == 2)
        with Running(cfg, tmp_path) as daemon:
            daemon.wait_ready()
            wait_equal(db, expected)
            daemon.stop()
        assert dump(db) == expected
    finally:
        shutil.rmtree(journal, ignore_errors=True)  # 8 MiB a journal file


def test_without_systemd_python_a_journal_config_says_what_to_install(tmp_path: Path) -> None:
    journal_cfg = daemon_config(tmp_path, tmp_path / "j.db", ["{journal: {}}"], name="j.yaml")
    file_cfg = daemon_config(tmp_path, tmp_path / "f.db", ["{file: /var/log/mail.log}"])
    code = "import sys; sys.modules['systemd'] = None; from mailtally.cli import main; "
    code += "sys.exit(main(sys.argv[1:]))"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT / "daemon")},
        )

    for command in (["check-config", str(journal_cfg)], ["run", "--config", str(journal_cfg)]):
        proc = cli(*command)
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert "the journal source needs systemd-python: apt install python3-systemd" in last
    proc = cli("check-config", str(file_cfg))
    assert (proc.returncode, proc.stdout) == (0, f"{file_cfg}: ok\n")
