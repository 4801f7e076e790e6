"""Measure `mailtally run`'s policy server beside policyd-rate-limit, used as Postfix uses them.

Postfix keeps one connection to a policy service per smtpd process and sends its requests
on it back to back: ``name=value`` lines and an empty line, then it waits for ``action=...``
and an empty line (SMTPD_POLICY_README). This script plays --concurrency smtpd processes:
each is one persistent TCP connection to 127.0.0.1 that sends its next request as soon as
the previous answer is in. For each concurrency (default 1, 10 and 50) a bounded number of
requests is shared among the connections. Printed per run: requests/s (the requests over
the time from the first send to the last answer), p50, p99 and max latency (from sending a
request to reading its whole answer), the share of answers that were not DUNNO, and the
CPU used by the server (its process tree, from /proc) and by this client (getrusage), in %
of one core: a client near 100% means the figures are the client's.

Requests carry Postfix 3.8's full attribute set (3.7's plus compatibility_level and
mail_version, which 3.8 added), in the order smtpd writes them, empty where Postfix sends
them empty: an authenticated submission (port 587, TLS 1.3, SASL PLAIN) from one of
--senders senders (each sends a few messages, far under the limit of 200), one to five
recipients, a unique instance and queue id per message. A --bulk-share of the requests
comes from one sender that was brought to its limit before timing (200 messages on one
connection), so those, and only those, should be deferred. Both servers get the same
messages.

  mailtally           ``python -m mailtally run --config CFG`` from this checkout, a child in
                      its own session: an empty log file, notify and metrics off,
                      ``thresholds: {default: {warn: 200}}``, ``policy: {listen:
                      [127.0.0.1:PORT], actions: {warn: DEFER_IF_PERMIT ...}}``. It counts
                      at END-OF-MESSAGE, so it is sent END-OF-MESSAGE requests; --requests
                      of them per concurrency.
  policyd-rate-limit  The Debian package's ``policyd-rate-limit --file CFG``, a child in its
                      own session: SQLite backend in the temporary directory (SQLite's
                      defaults, a commit per request), ``limits: [[200, 86400]]`` by sender
                      (``limit_by_sender``, SASL and IP limits off), the same
                      DEFER_IF_PERMIT answer over the limit. It counts only at RCPT and
                      answers DUNNO to any other state without a look, so it is sent the
                      same messages as RCPT requests (first recipient, recipient_count=0,
                      no queue id), one per message; --prl-requests per concurrency, fewer
                      than mailtally's because it is slow.

A server is ready when its port answers a null-sender RCPT request, which neither counts;
each connection sends one such request before its run is timed. After the runs each server
is killed with SIGKILL and its database opened. mailtally's ``SELECT sum(messages),
sum(recipients) FROM policy_counts`` must equal its DUNNO answers to END-OF-MESSAGE
requests and their recipients, policyd-rate-limit's ``SELECT count(*) FROM mail_count``
its DUNNO answers at RCPT: every counted request durable.

Reference figures from the issue, persistent connections on this kind of machine:
policyd-rate-limit (SQLite) about 550-730 requests/s, p99 120-170 ms at concurrency 50;
postfwd about 700 requests/s, p99 about 24 ms at concurrency 10; a bare asyncio server with
an in-memory counter about 30,000 requests/s, with one SQLite UPSERT per request (WAL,
synchronous=NORMAL) about 15,000 requests/s, p99 about 10 ms at concurrency 50. Targets,
reported and never asserted: at concurrency 50 mailtally at >= 10x policyd-rate-limit's
requests/s with every counted request durable, and mailtally's p99 under 20 ms.

Everything (configs, databases, logs, the servers' output) lives in one temporary
directory, removed at the end unless --keep. The default run takes about 1.5 minutes on a
2-core VM, --quick about 10 seconds.

Exit status: 0 when the runs were made and the durability checks held; 1 when a server
failed or timed out, or a check failed. A policyd-rate-limit that is not installed or does
not start is reported and its part skipped.
"""

from __future__ import annotations

import argparse
import grp
import json
import math
import os
import pwd
import random
import resource
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from procstat import cpu_seconds as process_tree_cpu  # noqa: E402  (a script beside this one)

EXAMPLES = """\
examples:
  .venv/bin/python bench/policy.py                  concurrency 1, 10, 50; 20,000 requests
                                                    a run for mailtally, 5,000 for
                                                    policyd-rate-limit
  .venv/bin/python bench/policy.py --concurrency 50 --requests 50000 --skip-prl
  .venv/bin/python bench/policy.py --quick          a smoke run of a few seconds
"""
LIMIT = 200  # messages a day, both servers
DEFER_ACTION = f"DEFER_IF_PERMIT 4.7.1 Daily limit of {LIMIT} messages reached"
TARGET_RATIO = 10.0  # mailtally's requests/s over policyd-rate-limit's, at concurrency 50
TARGET_P99_MS = 20.0  # mailtally's p99 at concurrency 50
TARGET_CONCURRENCY = 50
START_TIMEOUT = 30.0  # seconds for a server to answer its first request
MAX_ANSWER = 64 * 1024  # bytes; an answer is one short line
QUEUE_ID_DIGITS = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"  # long queue ids
BULK_SENDER = "bulk@lists.bench.example"


class BenchError(Exception):
    """A measurement could not be made (a server failed, closed or timed out)."""


# -- the traffic: Postfix's requests ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One message as smtpd sees it; `number` is unique over the whole script."""

    number: int
    sender: str
    sasl_username: str
    recipients: tuple[str, ...]
    size: int
    client: tuple[str, str, str]  # client_address, client_name, helo_name
    client_port: int
    bulk: bool = False


class Traffic:
    """Messages from many senders, the same sequence for a seed."""

    def __init__(self, senders: int, bulk_share: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.senders = senders
        self.bulk_share = bulk_share
        self.number = 0
        self.start = int(time.time())
        self.pid = 20_000 + self.rng.randrange(10_000)  # the smtpd pid in instance=
        laptops = [f"192.168.{i // 250}.{i % 250 + 2}" for i in range(400)]
        self.clients = [("10.0.0.5", "webmail.bench.example", "webmail.bench.example")] * 400
        self.clients += [(a, "unknown", f"[{a}]") for a in laptops]

    def message(self, bulk: bool = False) -> Message:
        rng = self.rng
        self.number += 1
        if bulk:
            sender, user = BULK_SENDER, "bulk"
        else:
            n = rng.randrange(self.senders)
            user = f"u{n:05d}"
            sender = f"{user}@dept{n % 40}.bench.example"
        count = 1 if rng.random() < 0.85 else rng.randint(2, 5)
        recipients = tuple(
            f"r{rng.randrange(100_000)}@{rng.choice(('gmail.com', 'example.org', 'ntu.edu.tw'))}"
            for _ in range(count)
        )
        size = int(rng.lognormvariate(9.5, 1.2)) + 600
        client = rng.choice(self.clients)
        return Message(
            self.number, sender, user, recipients, size, client, rng.randint(1024, 65535), bulk
        )

    def messages(self, n: int) -> list[Message]:
        return [self.message(self.rng.random() < self.bulk_share) for _ in range(n)]

    def queue_id(self, number: int) -> str:
        """A Postfix 3 long queue id (``4LqTkN3Yzbz9vBq``), unique per message."""
        value, digits = self.start * 1_000_000 + number, []
        for _ in range(15):
            value, d = divmod(value, len(QUEUE_ID_DIGITS))
            digits.append(QUEUE_ID_DIGITS[d])
        return "".join(reversed(digits))

    def request(self, m: Message, state: str) -> bytes:
        """The request smtpd sends for `m` in `state` (RCPT or END-OF-MESSAGE)."""
        eom = state == "END-OF-MESSAGE"
        address, name, helo = m.client
        # At END-OF-MESSAGE the recipient is known only when there is exactly one.
        recipient = "" if eom and len(m.recipients) > 1 else m.recipients[0]
        attrs = (
            ("request", "smtpd_access_policy"),
            ("protocol_state", state),
            ("protocol_name", "ESMTP"),
            ("client_address", address),
            ("client_name", name),
            ("client_port", str(m.client_port)),
            ("reverse_client_name", name),
            ("server_address", "10.0.0.25"),
            ("server_port", "587"),
            ("helo_name", helo),
            ("sender", m.sender),
            ("recipient", recipient),
            ("recipient_count", str(len(m.recipients)) if eom else "0"),
            # smtpd_delay_open_until_valid_rcpt (default yes): no queue file at RCPT yet
            ("queue_id", self.queue_id(m.number) if eom else ""),
            ("instance", f"{self.pid:x}.{self.start:x}.{m.number:x}.0"),
            ("size", str(m.size)),
            ("etrn_domain", ""),
            ("stress", ""),
            ("sasl_method", "PLAIN"),
            ("sasl_username", m.sasl_username),
            ("sasl_sender", ""),
            ("ccert_subject", ""),
            ("ccert_issuer", ""),
            ("ccert_fingerprint", ""),
            ("ccert_pubkey_fingerprint", ""),
            ("encryption_protocol", "TLSv1.3"),
            ("encryption_cipher", "TLS_AES_256_GCM_SHA384"),
            ("encryption_keysize", "256"),
            ("policy_context", ""),
            ("compatibility_level", "3.6"),
            ("mail_version", "3.8.6"),
        )
        return ("".join(f"{k}={v}\n" for k, v in attrs) + "\n").encode()


PROBE = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=127.0.0.1\nclient_name=localhost\nreverse_client_name=localhost\n"
    b"helo_name=localhost\nsender=\nrecipient=postmaster@bench.example\nrecipient_count=0\n"
    b"queue_id=\ninstance=probe\nsize=0\n\n"
)  # the null sender at RCPT: neither server counts it


def verdict(answer: bytes) -> str:
    """DUNNO, DEFER (DEFER_IF_PERMIT, DEFER, 4xx) or what else the action word was."""
    words = answer.removeprefix(b"action=").split(maxsplit=1)
    word = words[0].decode("utf-8", "replace").upper() if words else "(EMPTY)"
    if word.startswith(("DEFER", "4")):
        return "DEFER"
    return word


# -- the client: persistent connections, one request in flight each -------------------


@dataclass
class Measured:
    """One run: its requests' latencies and answers, in request order."""

    concurrency: int
    wall: float
    latencies: list[float]
    answers: list[bytes]
    client_cpu: float
    server_cpu: float

    @property
    def rate(self) -> float:
        return len(self.answers) / self.wall if self.wall > 0 else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class _Conn:
    sock: socket.socket
    index: int = -1
    sent: float = 0.0
    buf: bytes = b""


def read_answer(sock: socket.socket) -> bytes:
    """Read one whole answer on a blocking socket."""
    buf = b""
    while not buf.endswith(b"\n\n"):
        chunk = sock.recv(MAX_ANSWER)
        if not chunk or len(buf) > MAX_ANSWER:
            raise BenchError(f"connection closed or overlong answer after {buf[:80]!r}")
        buf += chunk
    return buf


def ask(address: tuple[str, int], requests: list[bytes], timeout: float) -> list[bytes]:
    """Send `requests` one after the other on one connection; return the answers."""
    with socket.create_connection(address, timeout=timeout) as sock:
        out = []
        for request in requests:
            sock.sendall(request)
            out.append(read_answer(sock))
        return out


def connect(address: tuple[str, int], concurrency: int, timeout: float) -> list[socket.socket]:
    """Open the connections and have each answered once (a probe), so all are accepted."""
    socks: list[socket.socket] = []
    try:
        for _ in range(concurrency):
            sock = socket.create_connection(address, timeout=timeout)
            socks.append(sock)
            sock.sendall(PROBE)
        for sock in socks:
            read_answer(sock)
            sock.setblocking(False)
    except (OSError, BenchError):
        for sock in socks:
            sock.close()
        raise
    return socks


def send(sock: socket.socket, data: bytes, timeout: float) -> None:
    sent = sock.send(data)
    if sent < len(data):  # a full socket buffer: not seen with one request in flight
        sock.settimeout(timeout)
        sock.sendall(data[sent:])
        sock.setblocking(False)


def drive(
    address: tuple[str, int],
    requests: list[bytes],
    concurrency: int,
    timeout: float,
    server_cpu: Callable[[], float],
) -> Measured:
    """Play `concurrency` smtpd processes sending `requests` back to back."""
    n = len(requests)
    socks = connect(address, concurrency, timeout)
    conns = [_Conn(s) for s in socks]
    latencies, answers = [0.0] * n, [b""] * n
    sel = selectors.DefaultSelector()
    try:
        for conn in conns:
            sel.register(conn.sock, selectors.EVENT_READ, conn)
        cpu0, usage0 = server_cpu(), resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        following = done = 0
        for conn in conns[:n]:
            conn.index, conn.sent = following, time.perf_counter()
            send(conn.sock, requests[following], timeout)
            following += 1
        while done < n:
            events = sel.select(timeout)
            if not events:
                raise BenchError(f"no answer within {timeout:g} s ({done:,} of {n:,} in)")
            for key, _ in events:
                conn = key.data
                chunk = conn.sock.recv(MAX_ANSWER)
                if not chunk:
                    raise BenchError(
                        f"server closed a connection after {done:,} answers, on request"
                        f" {conn.index:,}"
                    )
                buf = conn.buf + chunk
                if not buf.endswith(b"\n\n"):
                    if len(buf) > MAX_ANSWER:
                        raise BenchError(f"answer of over {MAX_ANSWER} bytes: {buf[:80]!r}")
                    conn.buf = buf
                    continue
                now = time.perf_counter()
                if buf.find(b"\n\n") != len(buf) - 2:
                    raise BenchError(f"more than one answer to one request: {buf[:160]!r}")
                latencies[conn.index], answers[conn.index] = now - conn.sent, buf
                conn.buf = b""
                done += 1
                if following < n:
                    conn.index, conn.sent = following, now
                    send(conn.sock, requests[following], timeout)
                    following += 1
        wall = time.perf_counter() - started
        usage1, cpu1 = resource.getrusage(resource.RUSAGE_SELF), server_cpu()
    finally:
        sel.close()
        for sock in socks:
            sock.close()
    client = usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime
    return Measured(concurrency, wall, latencies, answers, client, cpu1 - cpu0)


# -- the servers ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of `pid` and its descendants (from /proc)."""
    return sum(process_tree_cpu(pid).values())


class Server:
    """A policy server child in its own session, its output in a file."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], work: Path, port: int
    ) -> None:
        self.name = name
        self.address = ("127.0.0.1", port)
        self.output_path = work / f"{name}-output.log"
        self._output: IO[bytes] = self.output_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> float:
        """Poll until the server's address answers the probe; return seconds since spawn."""
        address = self.address
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                ask(address, [PROBE], 1.0)
            except (OSError, BenchError):
                time.sleep(0.05)
                continue
            return time.monotonic() - self.started
        raise BenchError(
            f"{self.name}: no answer on {address} in {START_TIMEOUT:g} s{self.tail()}"
        )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited {self.proc.returncode}{self.tail()}")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the server's session (it and any child of its own) and reap it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._output.close()

    def tail(self) -> str:
        self._output.flush()
        text = self.output_path.read_text(encoding="utf-8", errors="replace").strip()
        return f": {text[-800:]}" if text else ""

    def output_lines(self, *marks: str) -> list[str]:
        text = self.output_path.read_text(encoding="utf-8", errors="replace")
        return [line for line in text.splitlines() if any(m in line for m in marks)]


def start_mailtally(work: Path) -> tuple[Server, Path]:
    here = work / "mailtally"
    here.mkdir()
    db, log, port = here / "run.db", here / "mail.log", free_port()
    log.touch()
    config = here / "run.yaml"
    config.write_text(
        f"timezone: UTC\ndatabase: {db}\nsources: [{{file: {log}}}]\n"
        "notify: {enabled: false}\nmetrics: {enabled: false}\n"
        f"thresholds: {{default: {{warn: {LIMIT}}}}}\n"
        f'policy:\n  listen: ["127.0.0.1:{port}"]\n  actions: {{warn: "{DEFER_ACTION}"}}\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC"}}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT / "daemon")])
    cmd = [sys.executable, "-m", "mailtally", "run", "--config", str(config)]
    return Server("mailtally", cmd, env, here, port), db


def prl_settings(here: Path, port: int) -> dict[str, object]:
    """policyd-rate-limit's configuration (YAML; JSON is YAML): 200 a day by sender."""
    return {
        "debug": False,  # True logs every request to stderr
        "user": pwd.getpwuid(os.getuid()).pw_name,  # it drops to this user when root
        "group": grp.getgrgid(os.getgid()).gr_name,
        "pidfile": str(here / "policyd-rate-limit.pid"),
        "backend": 0,  # sqlite3
        "sqlite_config": {"database": str(here / "db.sqlite3")},
        "SOCKET": ["127.0.0.1", port],
        "limits": [[LIMIT, 86400]],
        "limits_by_id": {},
        "limit_by_sasl": False,
        "limit_by_sender": True,
        "limit_by_ip": False,
        "limited_networks": [],
        "success_action": "dunno",
        "fail_action": DEFER_ACTION,
        "db_error_action": "dunno",
        "report": False,
        "delay_to_close": 300,
    }


def start_prl(work: Path, exe: str) -> tuple[Server, Path]:
    here = work / "policyd-rate-limit"
    here.mkdir()
    port = free_port()
    settings = prl_settings(here, port)
    config = here / "policyd-rate-limit.yaml"
    config.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    # The Debian script runs on the system's python3; keep this venv out of its way.
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NOTIFY_SOCKET", "WATCHDOG_USEC"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    server = Server("policyd-rate-limit", [exe, "--file", str(config)], env, here, port)
    return server, here / "db.sqlite3"


def package_version(name: str) -> str:
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", name],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "version unknown"
    return done.stdout.strip() or "version unknown"


# -- one server's part ----------------------------------------------------------------


@dataclass
class Part:
    """What one server did: its runs and what it accepted (to check against its store)."""

    name: str
    state: str
    runs: list[Measured] = field(default_factory=list)
    ready: float = 0.0
    bulk_accepted: int = 0
    accepted: int = 0  # DUNNO answers to counting requests
    accepted_recipients: int = 0
    deferred: int = 0
    wrongly_deferred: int = 0  # DEFER answers to senders under the limit
    other: dict[str, int] = field(default_factory=dict)

    def tally(self, messages: list[Message], answers: list[bytes]) -> None:
        for m, answer in zip(messages, answers, strict=True):
            word = verdict(answer)
            if word == "DUNNO":
                self.accepted += 1
                self.accepted_recipients += len(m.recipients)
            elif word == "DEFER":
                self.deferred += 1
                self.wrongly_deferred += not m.bulk
            else:
                self.other[word] = self.other.get(word, 0) + 1


def run_part(
    part: Part,
    server: Server,
    traffic: Traffic,
    workloads: dict[int, list[Message]],
    requests: int,
    timeout: float,
) -> None:
    """Bring the bulk sender to its limit, then time each concurrency on `server`."""
    part.ready = server.wait_ready()
    bulk = [traffic.message(bulk=True) for _ in range(LIMIT)]
    answers = ask(server.address, [traffic.request(m, part.state) for m in bulk], timeout)
    part.tally(bulk, answers)
    part.bulk_accepted = sum(verdict(a) == "DUNNO" for a in answers)
    for concurrency, messages in workloads.items():
        wanted = messages[:requests]
        batch = [traffic.request(m, part.state) for m in wanted]
        measured = drive(server.address, batch, concurrency, timeout, server.cpu)
        part.tally(wanted, measured.answers)
        part.runs.append(measured)
        server.check_alive()


def print_part(part: Part, heading: str, note: str) -> None:
    print(f"\n{heading}")
    print(f"  {note}")
    print(
        f"  ready {part.ready:.2f} s after spawn; the bulk sender's first {LIMIT} messages:"
        f" {part.bulk_accepted} accepted"
    )
    print(
        f"  {'conc':>4}{'requests':>10}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'deferred':>10}{'server cpu':>12}{'client cpu':>12}"
    )
    for r in part.runs:
        deferred = sum(verdict(a) != "DUNNO" for a in r.answers) / len(r.answers)
        print(
            f"  {r.concurrency:>4}{len(r.answers):>10,}{r.rate:>9,.0f}"
            f"{r.percentile(0.5) * 1000:>8.2f}{r.percentile(0.99) * 1000:>8.2f}"
            f"{max(r.latencies) * 1000:>8.1f}{deferred:>10.2%}"
            f"{r.server_cpu / r.wall:>12.0%}{r.client_cpu / r.wall:>12.0%}"
        )
    if part.wrongly_deferred:
        print(f"  {part.wrongly_deferred:,} answers DEFERRED senders under the limit")
    if part.other:
        print(f"  answers neither DUNNO nor a deferral: {part.other}")


def read_store(db: Path, sql: str) -> tuple[int, ...]:
    """One row from a killed server's database (opened read-write: WAL recovery)."""
    conn = sqlite3.connect(db)
    try:
        row = conn.execute(sql).fetchone()
    finally:
        conn.close()
    return tuple(int(v or 0) for v in row)


def mailtally_part(
    work: Path, traffic: Traffic, workloads: dict[int, list[Message]], args: argparse.Namespace
) -> tuple[Part, bool]:
    """Measure `mailtally run`, kill -9 it, and check its counts; return (part, durable)."""
    part = Part("mailtally", "END-OF-MESSAGE")
    server, db = start_mailtally(work)
    try:
        run_part(part, server, traffic, workloads, args.requests, args.timeout)
    finally:
        server.kill()
    print_part(
        part,
        f"mailtally ({sys.executable} -m mailtally run, policy on 127.0.0.1:"
        f"{server.address[1]}): END-OF-MESSAGE requests",
        f"warn: {LIMIT} a day (UTC) by envelope sender; answer over it: {DEFER_ACTION}",
    )
    expected = "policy limit reached identity=" + BULK_SENDER
    warnings = [
        line
        for line in server.output_lines(" WARNING ", " ERROR ", "Traceback")
        if expected not in line
    ]
    if warnings:
        print(f"  its output: {len(warnings):,} warnings or errors, the first: {warnings[0]}")
    messages, recipients, rows = read_store(
        db, "SELECT sum(messages), sum(recipients), count(*) FROM policy_counts"
    )
    (blocks,) = read_store(db, "SELECT count(*) FROM policy_blocks")
    durable = (messages, recipients) == (part.accepted, part.accepted_recipients)
    print(
        f"  after kill -9: policy_counts sum(messages) {messages:,}"
        f" {'=' if messages == part.accepted else '!='} {part.accepted:,} DUNNO answers at"
        f" END-OF-MESSAGE; sum(recipients) {recipients:,}"
        f" {'=' if recipients == part.accepted_recipients else '!='}"
        f" {part.accepted_recipients:,} their recipients ({rows:,} identity-day rows;"
        f" policy_blocks {blocks:,} rows, {part.deferred:,} deferrals answered)"
    )
    print(
        "  durable: every counted request survived kill -9"
        if durable
        else "  durable: NO, the store does NOT hold what was answered DUNNO"
    )
    return part, durable


def prl_part(
    work: Path, traffic: Traffic, workloads: dict[int, list[Message]], args: argparse.Namespace
) -> tuple[Part | None, bool]:
    """Measure policyd-rate-limit the same way; (None, True) when it cannot run here."""
    exe = shutil.which("policyd-rate-limit") or "/usr/bin/policyd-rate-limit"
    if not Path(exe).exists():
        print(
            "\npolicyd-rate-limit: not installed (Debian package policyd-rate-limit);"
            " its part skipped"
        )
        return None, True
    part = Part("policyd-rate-limit", "RCPT")
    server, db = start_prl(work, exe)
    try:
        run_part(part, server, traffic, workloads, args.prl_requests, args.timeout)
    except BenchError as exc:
        print(f"\npolicyd-rate-limit: could not be measured: {exc}; its part skipped")
        return None, True
    finally:
        server.kill()
    print_part(
        part,
        f"policyd-rate-limit {package_version('policyd-rate-limit')} ({exe}, on 127.0.0.1:"
        f"{server.address[1]}): RCPT requests, {args.prl_requests:,} a run (fewer: it is slow)",
        f"SQLite backend (journal_mode {prl_journal_mode(db)}, a commit per request),"
        f" limits [[{LIMIT}, 86400]] by sender (limit_by_sender); answer over it:"
        f" {DEFER_ACTION}",
    )
    (rows,) = read_store(db, "SELECT count(*) FROM mail_count")
    durable = rows == part.accepted
    print(
        f"  after kill -9: mail_count {rows:,} rows {'=' if durable else '!='}"
        f" {part.accepted:,} DUNNO answers at RCPT"
    )
    print(
        "  durable: every counted request survived kill -9"
        if durable
        else "  durable: NO, the store does NOT hold what was answered DUNNO"
    )
    return part, durable


def prl_journal_mode(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        mode: str = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    return mode


def at(part: Part | None, concurrency: int) -> Measured | None:
    if part is None:
        return None
    return next((r for r in part.runs if r.concurrency == concurrency), None)


def print_targets(mailtally: Part, prl: Part | None, durable: bool) -> None:
    mine, theirs = at(mailtally, TARGET_CONCURRENCY), at(prl, TARGET_CONCURRENCY)
    c = TARGET_CONCURRENCY
    print()
    if mine is None:
        print(f"targets: not measured (no run at concurrency {c})")
        return
    if theirs is not None:
        ratio = mine.rate / theirs.rate
        met = "met" if ratio >= TARGET_RATIO and durable else "NOT met"
        print(
            f"target: req/s at concurrency {c}, mailtally {mine.rate:,.0f} / policyd-rate-limit"
            f" {theirs.rate:,.0f} = {ratio:.1f}x (>= {TARGET_RATIO:g}x, every counted"
            f" request durable): {met}"
        )
    else:
        print(f"target: req/s at concurrency {c} against policyd-rate-limit: not measured")
    p99 = mine.percentile(0.99) * 1000
    met = "met" if p99 < TARGET_P99_MS else "NOT met"
    print(
        f"target: mailtally p99 at concurrency {c}, {p99:.2f} ms (< {TARGET_P99_MS:g} ms): {met}"
    )


def describe_machine(work: Path) -> str:
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text(encoding="utf-8").splitlines():
        _, point, fstype, *_ = line.split()
        if work.is_relative_to(point) and len(point) > len(best):
            best, kind = point, fstype
    cpus = os.cpu_count()
    return f"temporary directory {work} on {kind}; {cpus} CPUs, shared by client and servers"


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show each option's default."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/policy.py", description=__doc__, epilog=EXAMPLES, formatter_class=Formatter
    )
    ap.add_argument(
        "--concurrency",
        default="1,10,50",
        help="comma-separated numbers of persistent connections, one run each",
    )
    ap.add_argument("--requests", type=int, default=20_000, help="mailtally: requests a run")
    ap.add_argument(
        "--prl-requests",
        type=int,
        default=5_000,
        help="policyd-rate-limit: requests a run (it answers about 1,000 a second)",
    )
    ap.add_argument("--senders", type=int, default=20_000, help="distinct senders")
    ap.add_argument(
        "--bulk-share",
        type=float,
        default=0.01,
        help="share of requests from the sender already over the limit",
    )
    ap.add_argument("--seed", type=int, default=1, help="seed of the traffic")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    ap.add_argument("--skip-prl", action="store_true", help="leave out policyd-rate-limit")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --requests 2000 --prl-requests 300 --senders 2000",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.prl_requests, args.senders = 2_000, 300, 2_000
    try:
        args.levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        ap.error(f"--concurrency: expected numbers separated by commas, got {args.concurrency!r}")
    if not args.levels or min(args.levels) <= 0:
        ap.error("--concurrency: expected positive numbers")
    if min(args.requests, args.prl_requests, args.senders) <= 0 or args.timeout <= 0:
        ap.error("--requests, --prl-requests, --senders and --timeout must be positive")
    if not 0 <= args.bulk_share < 1:
        ap.error("--bulk-share: expected a share from 0 to below 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mailtally-policy-"))
    traffic = Traffic(args.senders, args.bulk_share, args.seed)
    longest = max(args.requests, 0 if args.skip_prl else args.prl_requests)
    workloads = {c: traffic.messages(longest) for c in args.levels}
    sample = traffic.request(workloads[args.levels[0]][0], "END-OF-MESSAGE")
    print(describe_machine(work))
    print(
        "columns: req/s = requests / (first send .. last answer); latency = a request's send"
        " .. its whole\n answer; deferred = share of answers not DUNNO; cpu in % of one core"
        " (server: its process tree)"
    )
    print(
        f"traffic: Postfix 3.8 attribute set ({sample.count(b'=')} attributes,"
        f" {len(sample):,} bytes at END-OF-MESSAGE), {args.senders:,} senders,"
        f" {args.bulk_share:.0%} of requests from one sender over its limit, seed {args.seed}"
    )
    try:
        mailtally, durable = mailtally_part(work, traffic, workloads, args)
        prl, prl_durable = (
            (None, True) if args.skip_prl else prl_part(work, traffic, workloads, args)
        )
        print_targets(mailtally, prl, durable)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if durable and prl_durable else 1


if __name__ == "__main__":
    sys.exit(main())
