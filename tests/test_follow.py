"""`mailtally run` following syslog files: appends, logrotate in every mode, restarts.

Each test drives a real `mailtally run` child on a log a real Postfix wrote
(tests/data/scenario/mail.log), rotates it with the real logrotate where logrotate is
what does it on a relay, and checks that the database ends up exactly as one
uninterrupted `mailtally ingest` of the same lines leaves it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DATA
from daemonproc import (
    COUNTED,
    SCENARIO,
    Running,
    append,
    daemon_config,
    dump,
    file_run,
    wait_equal,
    wait_for,
    wait_read,
)

LINES = SCENARIO
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"


def chunks(lines: list[str], parts: int) -> list[list[str]]:
    """Split into `parts` runs of lines whose first lines differ (distinct fingerprints)."""
    size = len(lines) // parts
    out = [lines[i * size : (i + 1) * size] for i in range(parts - 1)]
    out.append(lines[(parts - 1) * size :])
    firsts = [c[0] for c in out]
    assert len(set(firsts)) == len(firsts)
    return out


def logrotate(tmp: Path, log: Path, options: str) -> None:
    """Run the real logrotate once, forced, with `options` for `log`."""
    conf = tmp / "logrotate.conf"
    conf.write_text(f"{log} {{\n  rotate 9\n  missingok\n  nomail\n{options}\n}}\n")
    proc = subprocess.run(
        [LOGROTATE, "-f", "-s", str(tmp / "logrotate.state"), str(conf)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


needs_logrotate = pytest.mark.skipif(not Path(LOGROTATE).exists(), reason="logrotate missing")


def test_appends_and_partial_lines_are_counted_once(
    tmp_path: Path, expected: dict[str, object]
) -> None:
    run = file_run(tmp_path)
    log, db, cfg = run.log, run.db, run.config
    first, second, third = chunks(LINES, 3)
    append(log, first)
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        text = "".join(line + "\n" for line in second)
        cut = len(text) - 17  # the last line without its end, for a while
        with log.open("a", encoding="utf-8") as f:
            f.write(text[:cut])
            f.flush()
            time.sleep(0.6)  # three batch intervals: the daemon must not count half a line
            f.write(text[cut:])
        append(log, third)
        wait_equal(db, expected)
        daemon.stop()
    assert dump(db) == expected


@needs_logrotate
def test_logrotate_create_delaycompress_while_running(
    tmp_path: Path, expected: dict[str, object]
) -> None:
    run = file_run(tmp_path)
    log, db, cfg = run.log, run.db, run.config
    parts = chunks(LINES, 5)
    append(log, parts[0])
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        with log.open("a", encoding="utf-8") as writer:  # the syslog daemon's open file
            writer.write("".join(line + "\n" for line in parts[1]))
            writer.flush()
            logrotate(tmp_path, log, "  create\n  compress\n  delaycompress")
            # Until told to reopen, the syslog daemon writes on into mail.log.1.
            time.sleep(0.3)
            writer.write("".join(line + "\n" for line in parts[2]))
        time.sleep(0.5)
        append(log, parts[3])  # reopened: the new mail.log
        wait_for(lambda: log.stat().st_size > 0, 5, "the new file")
        logrotate(tmp_path, log, "  create\n  compress\n  delaycompress")  # .1 -> .2.gz
        assert (tmp_path / "mail.log.2.gz").exists()
        append(log, parts[4])
        wait_equal(db, expected)
        daemon.stop()
    assert dump(db) == expected


@needs_logrotate
def test_logrotate_create_compress_at_once_while_running(
    tmp_path: Path, expected: dict[str, object]
) -> None:
    # Without delaycompress the rotated file is gzipped and deleted at once, maybe
    # before the daemon read its end: the daemon still holds it open and reads it.
    run = file_run(tmp_path)
    log, db, cfg = run.log, run.db, run.config
    parts = chunks(LINES, 4)
    append(log, parts[0])
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_read(db, log)
        for i, part in enumerate(parts[1:]):
            append(log, part)
            logrotate(tmp_path, log, "  create\n  compress")
            assert not (tmp_path / "mail.log.1").exists()
            # The new, empty mail.log is open before the next lines arrive (on a relay
            # rotations are hours apart).
            opened = i + 2
            wait_for(lambda n=opened: daemon.log().count("following path=") >= n, 10, "new file")
        wait_equal(db, expected)
        daemon.stop()
    assert dump(db) == expected


@needs_logrotate
def test_logrotate_copytruncate_while_running(tmp_path: Path, expected: dict[str, object]) -> None:
    run = file_run(tmp_path, "ingest: {batch_lines: 50}\n")
    log, db, cfg = run.log, run.db, run.config
    parts = chunks(LINES, 4)
    append(log, parts[0])
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        append(log, parts[1])
        # Rotate at once, before the daemon has had a chance to read parts[1]: the rest
        # is read from the copy.
        options = "  copytruncate\n  compress\n  delaycompress"
        logrotate(tmp_path, log, options)
        append(log, parts[2])
        wait_read(db, log)
        logrotate(tmp_path, log, options)  # the copy is compressed now: mail.log.2.gz
        append(log, parts[3])
        wait_equal(db, expected)
        daemon.stop()
    assert dump(db) == expected


@needs_logrotate
@pytest.mark.parametrize(
    "options",
    ["  create\n  compress", "  create\n  compress\n  delaycompress", "  dateext\n  create"],
    ids=["compress", "delaycompress", "dateext"],
)
def test_rotated_several_times_while_stopped(
    tmp_path: Path, expected: dict[str, object], options: str
) -> None:
    run = file_run(tmp_path)
    log, db, cfg = run.log, run.db, run.config
    parts = chunks(LINES, 5)
    append(log, parts[0])
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_for(lambda: bool(dump(db)["counters"]), 20, "the first lines counted")
        append(log, parts[1])
        daemon.stop()  # maybe before it read parts[1]: the rest is read after the restart
    for i, part in enumerate(parts[2:]):
        dated = "dateext" in options
        logrotate(tmp_path, log, options + f"\n  dateformat -2026120{i}" if dated else options)
        append(log, part)
        if "dateext" in options:  # logrotate's date names sort by date; so do mtimes
            time.sleep(0.02)
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_equal(db, expected)
        daemon.stop()
    assert dump(db) == expected


def test_file_that_does_not_exist_yet(tmp_path: Path, expected: dict[str, object]) -> None:
    logdir = tmp_path / "later"
    log = logdir / "mail.log"
    db = tmp_path / "run.db"
    cfg = daemon_config(tmp_path, db, [f"{{file: {log}}}"])
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        time.sleep(0.3)
        logdir.mkdir()
        append(log, LINES[:10])
        append(log, LINES[10:])
        wait_equal(db, expected)
        daemon.stop()


def test_new_file_reusing_an_inode_is_read_from_its_start(
    tmp_path: Path, expected: dict[str, object]
) -> None:
    run = file_run(tmp_path)
    log, db, cfg = run.log, run.db, run.config
    first, second = chunks(LINES, 2)
    append(log, first)
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_for(lambda: bool(dump(db)["counters"]), 20, "the first file counted")
        daemon.stop()
    old_inode = log.stat().st_ino
    log.unlink()
    append(log, second)  # a new file; most file systems hand out the freed inode again
    reused = log.stat().st_ino == old_inode
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_equal(db, expected)
        daemon.stop()
    assert dump(db) == expected, f"inode reused: {reused}"


def test_globs_follow_several_files(tmp_path: Path) -> None:
    relay2 = [line.replace(" relay1 ", " relay2 ", 1) for line in LINES]
    (tmp_path / "logs").mkdir()
    db = tmp_path / "run.db"
    cfg = daemon_config(tmp_path, db, [f'{{file: "{tmp_path}/logs/*.log"}}'])
    a, b = tmp_path / "logs" / "relay1.log", tmp_path / "logs" / "relay2.log"
    append(a, LINES[:400])
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        append(b, relay2[:700])  # a file that matches the glob after the start
        append(a, LINES[400:])
        append(b, relay2[700:])
        expected_dir = tmp_path / "expected"
        expected_dir.mkdir()
        shutil.copy(a, expected_dir / "relay1.log")
        shutil.copy(b, expected_dir / "relay2.log")
        expected_db = tmp_path / "expected.db"
        from conftest import run_cli

        run_cli(
            "ingest",
            "--config",
            cfg,
            "--db",
            expected_db,
            expected_dir / "relay1.log",
            expected_dir / "relay2.log",
        )
        wait_equal(db, dump(expected_db, COUNTED))
        daemon.stop()


def test_polling_when_inotify_is_off(tmp_path: Path, expected: dict[str, object]) -> None:
    log = tmp_path / "mail.log"
    db = tmp_path / "run.db"
    cfg = daemon_config(
        tmp_path, db, [f"{{file: {log}}}"], extra="ingest: {inotify: false, poll_interval: 0.1}\n"
    )
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        for part in chunks(LINES, 4):
            append(log, part)
            time.sleep(0.1)
        wait_equal(db, expected)
        daemon.stop()


WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(WATCHES, os.W_OK), reason="needs root to lower the limit"
)
def test_inotify_watch_limit_reached_falls_back_to_polling(
    tmp_path: Path, expected: dict[str, object]
) -> None:
    run = file_run(tmp_path)
    log, db, cfg = run.log, run.db, run.config
    saved = WATCHES.read_text()
    WATCHES.write_text("0\n")  # no watches left for anyone: inotify_add_watch fails
    try:
        with Running(cfg, tmp_path) as daemon:
            daemon.wait_ready()
            WATCHES.write_text(saved)
            append(log, LINES)
            wait_equal(db, expected)
            daemon.stop()
            assert "polling the log files instead" in daemon.log()
    finally:
        WATCHES.write_text(saved)


def test_other_logs_beside_the_followed_one_are_not_rotations(
    tmp_path: Path, expected: dict[str, object]
) -> None:
    run = file_run(tmp_path)
    log, db, cfg = run.log, run.db, run.config
    first, second = chunks(LINES, 2)
    append(log, first)
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_read(db, log)
        daemon.stop()
    # Written after the live file, with names that start like it: not rotated copies.
    rfc3339 = (DATA / "scenario" / "mail.log.rfc3339").read_text(encoding="utf-8")
    (tmp_path / "mail.log.rfc3339").write_text(rfc3339, encoding="utf-8")
    shutil.copy(DATA / "scenario" / "maillog_file.log", tmp_path / "mail.log.bak")
    append(log, second)
    with Running(cfg, tmp_path) as daemon:
        daemon.wait_ready()
        wait_equal(db, expected)
        time.sleep(0.5)
        daemon.stop()
        assert "reading rotated file" not in daemon.log()
    assert dump(db) == expected
