#!/usr/bin/env python3
"""Drive a real Postfix on loopback through a scripted mail mix; write its logs and truth.

Run as root on a host with postfix, rsyslog and sasl2-bin (tools/setup-debian.sh):

    .venv/bin/python scenario/run.py [--short] [--out DIR] [--keep]

Writes to DIR: mail.log (RSYSLOG_TraditionalFileFormat), mail.log.rfc3339
(RSYSLOG_FileFormat), maillog_file.log (Postfix's postlogd) and truth.json. How each
number in truth.json is derived is written in truth.py; what Postfix logs for each
case is in scenario/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

from mix import ACCOUNTS, MixOptions, play
from postfix import PostfixInstance, PostfixSettings
from rsyslog import PostlogRelay, Rsyslog, check_same_lines
from sink import Sink
from traffic import Ledger
from truth import check_outcome, derive

log = logging.getLogger("scenario.run")

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
FULL_QUEUE_LIFETIME = 60  # seconds a dead-* message stays queued in the full run
SHORT_QUEUE_LIFETIME = 3600  # long enough that nothing expires in --short
SYSLOG_HOSTNAME = "relay1"
LOCK_TIMEOUT = 900.0  # seconds to wait for another run (a full run takes ~70)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("scenario-out"), help="output dir")
    parser.add_argument(
        "--short", action="store_true", help="CI size: 30 heavy messages, no expiry case"
    )
    parser.add_argument("--heavy", type=int, help="messages from the heavy sender (230, 30)")
    parser.add_argument(
        "--long-queue-ids", action="store_true", help="enable_long_queue_ids = yes"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def missing_requirements() -> str | None:
    """Return why the scenario cannot run on this host at all, or None."""
    if os.geteuid() != 0:
        return "must run as root (Postfix, /dev/log)"
    missing = [cmd for cmd in ("postfix", "rsyslogd", "saslpasswd2") if not shutil.which(cmd)]
    if missing:
        return f"not installed: {', '.join(missing)} (see tools/setup-debian.sh)"
    return None


def too_close_to_midnight(needed: timedelta) -> str | None:
    """Return why the scenario should not start now, or None.

    Counts are per day; a run across midnight would split them at slightly
    different instants in the log and in the sink's clock.
    """
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    if midnight - now < needed:
        return f"less than {needed} before UTC midnight; try again after 00:00 UTC"
    return None


@contextmanager
def exclusive_run(timeout: float) -> Iterator[None]:
    """Hold the host-wide scenario lock: there is one /dev/log, so one run at a time.

    Two runs at once would each move the other's /dev/log aside and mix their logs.
    """
    path = Path(tempfile.gettempdir()) / "mailtally-scenario.lock"
    deadline = time.monotonic() + timeout
    with path.open("a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another scenario run held {path} for {timeout}s"
                    ) from None
                log.debug("waiting for another scenario run lock=%s", path)
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports on 127.0.0.1 that are free right now."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def become_subreaper() -> None:
    """Adopt orphaned descendants (the Postfix master daemonises) so they can be reaped.

    PID 1 in containers often does not reap; without this the stopped master stays a
    zombie and still looks alive to kill(pid, 0).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed errno=%d", ctypes.get_errno())


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so the finally blocks stop every process."""
    raise SystemExit(128 + signum)


def wait_queue_empty(pf: PostfixInstance, timeout: float) -> None:
    """Poll postqueue -j and the queue directories until both are empty, or time out."""
    deadline = time.monotonic() + timeout
    while True:
        ids, files = pf.queued_ids(), pf.queue_files()
        if not ids and not files:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"queue not empty after {timeout}s: {ids or files}")
        time.sleep(0.5)


def write_outputs(out: Path, pf: PostfixInstance, rs: Rsyslog, truth: dict[str, object]) -> None:
    """Copy the three log files (keeping mtimes) and write truth.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(rs.traditional, out / "mail.log")
    shutil.copy2(rs.rfc3339, out / "mail.log.rfc3339")
    shutil.copy2(pf.maillog_file, out / "maillog_file.log")
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")


class Stack:
    """The processes of one run: rsyslogd, the postlogd relay, the sink and Postfix.

    Used as a context manager: leaving it stops whatever was started, in reverse
    order, even if starting failed half way or one of the stops fails.
    """

    def __init__(self, base: Path, settings: PostfixSettings) -> None:
        self.pf = PostfixInstance(base / "postfix", settings)
        self.rs = Rsyslog(base / "rsyslog", SYSLOG_HOSTNAME)
        self.relay = PostlogRelay(self.pf.maillog_file)
        self.sink = Sink(settings.sink_port)
        self.exits = ExitStack()

    def __enter__(self) -> Stack:
        with self.exits as exits:
            self.pf.write_config()
            for user, realm, password in ACCOUNTS:
                self.pf.add_sasl_user(user, realm, password)
            # Each stop is registered before its start, so a start that fails half way
            # (rsyslogd up but /dev/log missing, master forked but startup failed) is undone.
            for stop, start in (
                (self.rs.stop, self.rs.start),
                (self.relay.halt, self.relay.start),
                (self.sink.stop, self.sink.start),
                (self.pf.stop, self.pf.start),
            ):
                exits.callback(stop)
                start()
            self.exits = exits.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.exits.close()

    def drain(self) -> int:
        """Stop Postfix, relay its last lines, wait until rsyslogd wrote them; return count."""
        self.pf.stop()
        self.relay.stop()
        self.rs.wait_for_lines(self.relay.relayed)
        if self.relay.unmatched:
            log.warning("postlogd lines not in the usual form: %d", self.relay.unmatched)
        return self.relay.relayed


def scenario(args: argparse.Namespace, base: Path) -> None:
    """Start the stack, play the mix, stop everything, check the outcome, write the output."""
    full = not args.short
    heavy = args.heavy if args.heavy is not None else (230 if full else 30)
    smtp_port, submission_port, sink_port = free_ports(3)
    settings = PostfixSettings(
        smtp_port=smtp_port,
        submission_port=submission_port,
        sink_port=sink_port,
        queue_lifetime=FULL_QUEUE_LIFETIME if full else SHORT_QUEUE_LIFETIME,
        maximal_backoff=10,
        long_queue_ids=args.long_queue_ids,
    )
    ledger = Ledger()
    started = datetime.now(UTC)
    with Stack(base, settings) as stack:
        play(stack.pf, ledger, MixOptions(heavy_messages=heavy, expiry=full))
        wait_queue_empty(stack.pf, (FULL_QUEUE_LIFETIME if full else 0) + 180.0)
        lines = stack.drain()
    finished = datetime.now(UTC)
    check_same_lines(lines, stack.rs.traditional, stack.rs.rfc3339, stack.pf.maillog_file)
    if started.date() != finished.date():
        log.warning("run crossed UTC midnight; truth has counts on both days")

    answers, received = stack.sink.handler.snapshot()
    check_outcome(ledger, answers, received, expiry=full)
    run = {
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "short": args.short,
        "heavy_messages": heavy,
        "postfix": stack.pf.mail_version,
        "log_lines": lines,
    }
    truth: dict[str, object] = {
        "timezone": "UTC",
        "senders": derive(ledger, answers, received),
        "run": run,
    }
    write_outputs(args.out, stack.pf, stack.rs, truth)
    log.info(
        "scenario done out=%s lines=%d seconds=%.0f",
        args.out,
        lines,
        (finished - started).total_seconds(),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the scenario; exit 0 on success, 1 if it failed, 2 if it cannot run here."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not args.verbose:
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd, per command
    os.environ["TZ"] = "UTC"
    time.tzset()
    problem = missing_requirements()
    if problem:
        print(f"scenario: {problem}", file=sys.stderr)
        return 2
    become_subreaper()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        with exclusive_run(LOCK_TIMEOUT):
            problem = too_close_to_midnight(timedelta(minutes=10 if args.short else 15))
            if problem:
                print(f"scenario: {problem}", file=sys.stderr)
                return 2
            run_in_temp_dir(args)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:  # ScenarioError too
        log.error("scenario failed: %s", exc)  # one line; -v adds the traceback
        log.debug("traceback", exc_info=True)
        return 1
    return 0


def run_in_temp_dir(args: argparse.Namespace) -> None:
    """Run the scenario in a fresh temp dir, removed afterwards unless --keep."""
    base = Path(tempfile.mkdtemp(prefix="mailtally-scenario-"))
    base.chmod(0o755)  # Postfix daemons (user postfix) open files below it by path
    try:
        scenario(args, base)
    finally:
        if args.keep:
            log.info("kept temp dir=%s", base)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
