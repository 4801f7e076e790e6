"""Own /dev/log with a private rsyslogd and feed it Postfix's postlogd lines.

Postfix logs either to syslog or to postlogd, never both: maillog_client(3) picks
one from `maillog_file`. To get all three formats from one run, Postfix writes
`maillog_file` through postlogd (the real third format), and `PostlogRelay` tails
that file and hands every line to /dev/log as the datagram glibc's syslog(3) would
have sent for it (`<PRI>Mmm dd hh:mm:ss tag[pid]: text`, facility mail, severity
from Postfix's "warning: "/"error: "/... prefix). rsyslogd's imuxsock stamps each
datagram on arrival, as it does for direct syslog(3) callers, and writes it in
RSYSLOG_TraditionalFileFormat and RSYSLOG_FileFormat.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

from traffic import ScenarioError

log = logging.getLogger(__name__)

DEV_LOG = Path("/dev/log")
FACILITY_MAIL = 2
SEVERITY = {"panic": 2, "fatal": 2, "error": 3, "warning": 4}  # Postfix msg_syslog levels
SEVERITY_INFO = 6
POSTLOG_LINE = re.compile(
    r"(?P<month>\w{3}) (?P<day>\d{2}) (?P<time>\d{2}:\d{2}:\d{2}) (?P<host>\S+) "
    r"(?P<tag>[^\s\[:]+(?:\[\d+\])?): (?P<text>.*)"
)


class Rsyslog:
    """An `rsyslogd -n` that owns /dev/log and writes mail.* in two formats."""

    def __init__(self, base: Path, hostname: str) -> None:
        self.base = base
        self.hostname = hostname
        self.traditional = base / "mail.log"
        self.rfc3339 = base / "mail.log.rfc3339"
        self.conf = base / "rsyslog.conf"
        self.pid_file = base / "rsyslogd.pid"
        self.work_dir = base / "work"
        self.saved_dev_log: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_conf(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f'global(workDirectory="{self.work_dir}" localHostname="{self.hostname}")\n'
            # Rate limiting would drop lines of a burst; a relay must not lose any.
            'module(load="imuxsock" SysSock.Name="/dev/log" SysSock.RateLimit.Interval="0")\n'
            f'mail.* action(type="omfile" file="{self.traditional}"'
            ' template="RSYSLOG_TraditionalFileFormat")\n'
            f'mail.* action(type="omfile" file="{self.rfc3339}" template="RSYSLOG_FileFormat")\n'
        )

    def start(self, timeout: float = 10.0) -> None:
        """Move any existing /dev/log aside, start rsyslogd, wait until /dev/log answers."""
        self._write_conf()
        if DEV_LOG.exists() or DEV_LOG.is_symlink():
            self.saved_dev_log = DEV_LOG.with_name(f"log.saved-by-scenario-{os.getpid()}")
            DEV_LOG.rename(self.saved_dev_log)
            log.info("moved existing /dev/log aside to=%s", self.saved_dev_log)
        self.proc = subprocess.Popen(
            ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.pid_file)],
            env={**os.environ, "TZ": "UTC"},
        )
        deadline = time.monotonic() + timeout
        while not dev_log_answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited early with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rsyslogd did not create {DEV_LOG} within {timeout}s")
            time.sleep(0.05)
        log.info("rsyslogd started pid=%d", self.proc.pid)

    def wait_for_lines(self, count: int, timeout: float = 30.0) -> None:
        """Poll until both output files hold `count` lines (rsyslogd writes asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            have = [count_lines(self.traditional), count_lines(self.rfc3339)]
            if all(n >= count for n in have):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"rsyslogd wrote {have} lines, expected {count} each")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop rsyslogd, remove its /dev/log and put back whatever was there before."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("rsyslogd ignored SIGTERM; killing pid=%d", self.proc.pid)
                    self.proc.kill()
                    self.proc.wait(timeout)
        finally:
            if self.proc is not None and is_socket(DEV_LOG):
                DEV_LOG.unlink()
            if self.saved_dev_log is not None:
                self.saved_dev_log.rename(DEV_LOG)
                log.info("restored /dev/log")
                self.saved_dev_log = None
            self.proc = None


class PostlogRelay(threading.Thread):
    """Tail postlogd's file and send each complete line to /dev/log as syslog(3) would."""

    def __init__(self, path: Path, poll_interval: float = 0.01) -> None:
        super().__init__(name="postlog-relay", daemon=True)
        self.path = path
        self.poll_interval = poll_interval
        self.finish = threading.Event()
        self.relayed = 0
        self.unmatched = 0
        self.error: OSError | None = None

    def run(self) -> None:
        """Relay lines until `stop()` is called and the file has been read to its end."""
        try:
            self._relay()
        except OSError as exc:  # handed to the main thread by stop()
            self.error = exc

    def _relay(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        pending = b""
        try:
            while not self.path.exists():
                if self.finish.wait(self.poll_interval):
                    return
            with self.path.open("rb") as stream:
                while True:
                    finishing = self.finish.is_set()  # read once more after the signal
                    chunk = stream.read()
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self._send(sock, line.decode("utf-8", "replace"))
                    if finishing and not chunk:
                        break
                    if not chunk:
                        self.finish.wait(self.poll_interval)
        finally:
            sock.close()
        if pending:
            log.warning("postlogd file ends without newline; last partial line not relayed")

    def _send(self, sock: socket.socket, line: str) -> None:
        match = POSTLOG_LINE.fullmatch(line)
        if match is None:
            self.unmatched += 1
            log.warning("postlogd line not in the expected form, relayed as is: %s", line)
            datagram = f"<{FACILITY_MAIL * 8 + SEVERITY_INFO}>{line}"
        else:
            text = match["text"]
            level = text.partition(": ")[0] if ": " in text else ""
            severity = SEVERITY.get(level, SEVERITY_INFO)
            # glibc's syslog(3) header: "%h %e %T" (space-padded day), then the tag.
            stamp = f"{match['month']} {int(match['day']):2d} {match['time']}"
            datagram = f"<{FACILITY_MAIL * 8 + severity}>{stamp} {match['tag']}: {text}"
        send_datagram(sock, datagram.encode())
        self.relayed += 1

    def halt(self, timeout: float = 10.0) -> None:
        """End the thread if it runs, without checking what it relayed (for clean-up)."""
        self.finish.set()
        if self.is_alive():
            self.join(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish relaying what the file holds, then end the thread; re-raise its error."""
        self.finish.set()
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"postlog relay did not finish within {timeout}s")
        if self.error is not None:
            raise self.error


def line_bodies(path: Path) -> list[str]:
    """Return the lines of a mail log without their timestamps (any of the three forms)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    # An RFC 3339 stamp is one field, a syslog or postlogd stamp three (month, day, time).
    return [line.split(None, 1 if line[:1].isdigit() else 3)[-1] for line in lines]


def check_same_lines(count: int, *paths: Path) -> None:
    """Raise ScenarioError unless every file holds the same `count` lines, stamps aside.

    Catches lines that reached /dev/log from elsewhere and lines rsyslogd lost.
    """
    first, *others = (line_bodies(path) for path in paths)
    if len(first) != count:
        raise ScenarioError(f"{paths[0].name} has {len(first)} lines, {count} were relayed")
    for path, bodies in zip(paths[1:], others, strict=True):
        if bodies != first:
            extra = sorted(set(bodies) ^ set(first))[:3]
            raise ScenarioError(
                f"{path.name} differs from {paths[0].name} "
                f"({len(bodies)} vs {len(first)} lines), e.g. {extra}"
            )


def send_datagram(sock: socket.socket, data: bytes, timeout: float = 10.0) -> None:
    """Send one datagram to /dev/log, waiting while the receiver's buffer is full."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.sendto(data, str(DEV_LOG))
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return


def dev_log_answers() -> bool:
    """Return True if a datagram socket at /dev/log accepts a connection."""
    if not is_socket(DEV_LOG):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(str(DEV_LOG))
        except OSError:
            return False
    return True


def is_socket(path: Path) -> bool:
    """Return True if `path` exists and is a Unix socket (not following symlinks)."""
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def count_lines(path: Path) -> int:
    """Return the number of newline-terminated lines in `path` (0 if it does not exist)."""
    try:
        with path.open("rb") as stream:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 16), b""))
    except FileNotFoundError:
        return 0
