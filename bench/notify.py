"""Measure how soon `mailtally run` mails a sender after their count passes a limit.

A real daemon follows a log file; an aiosmtpd server on 127.0.0.1 receives its mail.
For each of --senders senders, the script appends 200 messages (the default limit,
`warn: 200`), then the 201st, and times from that append until the notice arrives at
the server. Printed: p50, p95 and max in ms. Target: under 2 s.

example:
  .venv/bin/python bench/notify.py --senders 30
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parents[1]


class _Handler:
    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.arrived.setdefault(rcpt, time.monotonic())
        return "250 OK"


def _lines(sender: str, n: int, first: int) -> str:
    t = datetime.now(UTC).isoformat(timespec="microseconds")
    out = []
    for i in range(first, first + n):
        qid = f"{i:X}"
        out += [
            f"{t} relay1 postfix/smtpd[10]: {qid}: client=web[10.0.0.5]\n",
            f"{t} relay1 postfix/qmgr[11]: {qid}: from=<{sender}>, size=1, nrcpt=1"
            " (queue active)\n",
            f"{t} relay1 postfix/qmgr[11]: {qid}: removed\n",
        ]
    return "".join(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--senders", type=int, default=20, help="crossings to time (default: 20)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for one notice (default: 30)"
    )
    args = parser.parse_args()
    handler = _Handler()
    port = _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    work = Path(tempfile.mkdtemp(prefix="mailtally-bench-notify-"))
    log, db, cfg = work / "mail.log", work / "run.db", work / "run.yaml"
    log.touch()
    cfg.write_text(
        f"timezone: UTC\ndatabase: {db}\nsources: [{{file: {log}}}]\n"
        f"notify: {{smtp: {{host: 127.0.0.1, port: {port}}}, from: noc@bench.example,"
        " max_per_minute: 1000}\n",
        encoding="utf-8",
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon")}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "mailtally", "run", "--config", str(cfg)],
        env=env,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    lags: list[float] = []
    try:
        time.sleep(1.0)  # start-up
        qid = 0x100000
        for i in range(args.senders):
            sender = f"s{i}@bench.example"
            with log.open("a") as f:
                f.write(_lines(sender, 200, qid))
            qid += 200
            time.sleep(0.2)
            with log.open("a") as f:
                f.write(_lines(sender, 1, qid))
                f.flush()
                appended = time.monotonic()
            qid += 1
            deadline = appended + args.timeout
            while sender not in handler.arrived:
                if time.monotonic() > deadline:
                    print(f"no notice for {sender} within {args.timeout} s", file=sys.stderr)
                    return 1
                time.sleep(0.002)
            lags.append((handler.arrived[sender] - appended) * 1000)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        controller.stop()
        for p in sorted(work.iterdir()):
            p.unlink()
        work.rmdir()
    lags.sort()
    p95 = lags[min(len(lags) - 1, round(0.95 * (len(lags) - 1)))]
    print(f"crossing appended -> notice at the SMTP server, {len(lags)} senders")
    print(f"  p50 {statistics.median(lags):.0f} ms   p95 {p95:.0f} ms   max {lags[-1]:.0f} ms")
    print(f"target: under 2000 ms: {'met' if lags[-1] < 2000 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
