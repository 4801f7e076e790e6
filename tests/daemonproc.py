"""Run `mailtally run` as a real child process and compare what it stored.

The daemon is started the way systemd starts it: its own session, a notify socket in
``$NOTIFY_SOCKET``, optionally ``$WATCHDOG_USEC``. Everything it sends to the socket is
kept, so tests can check READY=1, WATCHDOG=1, STATUS= and STOPPING=1.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from conftest import DATA, ROOT, run_cli

# A log a real Postfix 3.7 wrote (scenario/), the input of most daemon tests.
SCENARIO = (DATA / "scenario" / "mail.log").read_text(encoding="utf-8").splitlines()

# Row order is not part of what is stored; details ids are an artefact of batching.
_DUMPS = {
    "counters": "SELECT * FROM counters ORDER BY sender, day",
    "details": "SELECT ts, sender, sender_ip, relay, queue_id, recipient, status, response"
    " FROM details ORDER BY ts, sender, relay, queue_id, recipient, status, response,"
    " sender_ip",
    "open_messages": "SELECT * FROM open_messages ORDER BY host, queue_id",
}


def dump(db: Path, tables: Iterable[str] = _DUMPS) -> dict[str, list[tuple[Any, ...]]]:
    """Every stored fact of `db` except positions (their names differ by source).

    With several sources, which removed messages are still kept for late lines depends
    on how the sources interleave; such tests compare ``tables=COUNTED`` only.
    """
    wanted = {name: _DUMPS[name] for name in tables}
    if not db.exists():
        return {name: [] for name in wanted}
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return {name: conn.execute(sql).fetchall() for name, sql in wanted.items()}
    except sqlite3.OperationalError:  # not created yet
        return {name: [] for name in wanted}
    finally:
        conn.close()


COUNTED = ("counters", "details")


def ingested(tmp: Path, config: Path, lines: Iterable[str] | bytes, name: str) -> dict[str, Any]:
    """What one uninterrupted `mailtally ingest` of `lines` (as one file) stores."""
    work = tmp / f"expected-{name}"
    work.mkdir()
    log = work / "mail.log"
    if isinstance(lines, bytes):
        log.write_bytes(lines)
    else:
        log.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    db = work / "expected.db"
    run_cli("ingest", "--config", config, "--db", db, log)
    return dump(db)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def wait_equal(db: Path, expected: dict[str, Any], timeout: float = 30.0) -> None:
    """Wait until `db` holds exactly `expected`; on timeout, fail showing the difference."""
    deadline = time.monotonic() + timeout
    while True:
        got = dump(db, expected)
        if got == expected:
            return
        if time.monotonic() > deadline:
            assert got == expected  # pytest shows the difference
        time.sleep(0.1)


def wait_read(db: Path, log: Path, timeout: float = 30.0) -> None:
    """Wait until the daemon has committed `log` up to its current end."""
    size = log.stat().st_size

    def done() -> bool:
        if not db.exists():
            return False
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT offset FROM positions WHERE name = ?", (str(log),)
            ).fetchall()
        except sqlite3.OperationalError:
            return False
        finally:
            conn.close()
        return any(offset == size for (offset,) in rows)

    wait_for(done, timeout, f"{log} read to {size}")


class Running:
    """One `mailtally run` child with its notify socket and its stderr in a file."""

    def __init__(
        self,
        config: Path,
        workdir: Path,
        *,
        watchdog_usec: int | None = None,
        env: dict[str, str] | None = None,
        user: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.notify_path = workdir / f"notify-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.sock.setblocking(False)
        if user is not None:
            os.chmod(self.notify_path, 0o777)  # noqa: PTH101 - the socket, by path
        self.messages: list[tuple[float, str]] = []
        self.stderr_path = workdir / f"daemon-{time.monotonic_ns()}.log"
        self._stderr: IO[bytes] = self.stderr_path.open("wb")
        child_env = {
            k: v for k, v in os.environ.items() if k not in {"JOURNAL_STREAM", "NOTIFY_SOCKET"}
        }
        child_env["NOTIFY_SOCKET"] = str(self.notify_path)
        child_env["PYTHONPATH"] = str(ROOT / "daemon")
        if watchdog_usec is not None:
            child_env["WATCHDOG_USEC"] = str(watchdog_usec)
        child_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailtally", "run", "--config", str(config)],
            cwd=ROOT,
            env=child_env,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
            user=user,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def collect(self) -> list[tuple[float, str]]:
        """Take the notify messages received so far (each with its arrival time)."""
        while self.sock.fileno() >= 0:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            self.messages.append((time.monotonic(), data.decode()))
        return self.messages

    def sent(self, field: str) -> list[str]:
        """The values of `field` (e.g. "STATUS") in the messages received so far."""
        out = []
        for _, message in self.collect():
            for line in message.split("\n"):
                key, _, value = line.partition("=")
                if key == field:
                    out.append(value)
        return out

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for(
            lambda: bool(self.sent("READY")) or self.proc.poll() is not None, timeout, "READY=1"
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log()}")

    def log(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> float:
        """SIGTERM; return how long the daemon took to exit (it must exit 0)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        took = time.monotonic() - started
        self.close()
        assert code == 0, f"daemon exited {code}: {self.log()}"
        return took

    def kill(self, whole_group: bool = False) -> None:
        """kill -9 the daemon (or, like systemd's final SIGKILL, its whole session)."""
        if whole_group:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.collect()
        self.sock.close()
        self._stderr.close()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if not self._stderr.closed:
            self._stderr.close()
        self.sock.close()


def daemon_config(
    tmp: Path, db: Path, sources: list[str], extra: str = "", name: str = "run.yaml"
) -> Path:
    """A config with `sources` (YAML flow mappings such as ``{file: /x/mail.log}``)."""
    text = f"timezone: UTC\ndatabase: {db}\nsources:\n"
    text += "".join(f"  - {s}\n" for s in sources)
    text += extra
    if "metrics:" not in extra:  # tests run daemons side by side: no fixed port
        text += "metrics: {enabled: false}\n"
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


@dataclass(frozen=True)
class FileRun:
    """The usual set-up: one log file followed into one database."""

    log: Path
    db: Path
    config: Path


def file_run(tmp: Path, extra: str = "") -> FileRun:
    log, db = tmp / "mail.log", tmp / "run.db"
    return FileRun(log, db, daemon_config(tmp, db, [f"{{file: {log}}}"], extra=extra))


def scenario_expected(tmp: Path) -> dict[str, Any]:
    """What `mailtally ingest` stores for the whole scenario log."""
    cfg = daemon_config(tmp, tmp / "unused.db", ["{file: /nonexistent}"], name="x.yaml")
    return ingested(tmp, cfg, SCENARIO, "whole")


def append(path: Path, lines: Iterable[str]) -> None:
    """Append complete lines in one write, as a syslog daemon does per message batch."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
