"""Measure `mailtally run`: its end-to-end lag under a steady write load, and its catch-up.

Both parts run a real daemon, ``python -m mailtally run --config CFG``, as a child in
its own session, with ``timezone: UTC``, a fresh ``database:``, one ``sources: [{file:
...}]`` and every other setting at its default (a batch commits when it holds
``ingest.batch_lines``, 20,000 lines, or its oldest line is ``ingest.batch_interval``,
200 ms, old). The daemon commits each file's byte offset in the same transaction as the
counters, so this script watches progress by polling the store read-only:
``SELECT offset FROM positions WHERE name = FILE``.

  lag       A thread appends Postfix lines from bench/genlog.py (traditional syslog
            format, each restamped to the current UTC second, so their days are today)
            to the followed file the way rsyslog does: every --tick seconds, the lines
            due at --rate in one write(2), for --seconds. It keeps each write's time and
            the file's size after it. A write's lag is the first time the committed
            offset reached that size (polled every --poll seconds) minus the time of the
            write. Printed: p50, p95, p99 and max lag in ms, the lines/s achieved, and the
            daemon's CPU over the run (main process and its writer child, from
            /proc/PID/stat, in % of one core). Target: p95 < 1 s at 5,000 lines/s.
            At low rates a write mostly waits for its batch's 200 ms to pass.

  catch-up  genlog writes a backlog of --backlog-lines lines (stamps in the days before
            today, seed --seed). `mailtally run` reads it from a fresh database: the time
            from spawning it until the committed offset (polled every --poll seconds)
            equals the file's size. `mailtally ingest` reads the same file into another
            fresh database: the time from spawn to exit. --repeat interleaved rounds,
            each side's fastest kept, as bench/ingest.py does (the machine's speed
            drifts). The two databases must hold the same counters (SELECT * FROM
            counters ORDER BY sender, day), details and open messages, and the counters
            must equal genlog's truth; the output says whether they do. Target: run
            catches up at the ingest speed (reported met at >= 0.9x, for noise).

Everything (logs, configs, databases, notify sockets, the daemons' stderr) lives in one
temporary directory, removed at the end unless --keep; nothing is written elsewhere. The
default run takes about 1.5 minutes on a 2-core VM, --quick a few seconds.

Exit status: 0 when both parts ran and the stored data agreed; 1 when a daemon or ingest
failed or timed out, or the databases disagree. Missed targets are only reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import zip_longest
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import genlog  # noqa: E402  (a script beside this one, not a package)
from procstat import cpu_seconds  # noqa: E402

EXAMPLES = """\
examples:
  .venv/bin/python bench/follow.py                       lag at 5,000 lines/s for 20 s,
                                                         then 1M lines of catch-up, 5 rounds
  .venv/bin/python bench/follow.py --rate 20000 --skip-catchup
  .venv/bin/python bench/follow.py --quick               a smoke run of a few seconds
"""
TARGET_P95_MS = 1000.0
TARGET_RATIO = 0.9  # run's catch-up lines/s over ingest's ("at the ingest speed")
STAMP_LEN = 15  # "Dec  3 09:41:40": traditional syslog stamps are fixed-width
START_TIMEOUT = 30.0  # seconds for a daemon to send READY=1
DRAIN_TIMEOUT = 30.0  # seconds after the last write for the daemon to commit it
STOP_TIMEOUT = 30.0
# Row order is not part of what is stored; details ids are an artefact of batching.
TABLES = {
    "counters": "SELECT * FROM counters ORDER BY sender, day",
    "details": "SELECT ts, sender, sender_ip, relay, queue_id, recipient, status, response"
    " FROM details ORDER BY ts, sender, queue_id, recipient, status, response",
    "open_messages": "SELECT * FROM open_messages ORDER BY host, queue_id",
}


class BenchError(Exception):
    """A measurement could not be made (a child failed or timed out)."""


@dataclass(frozen=True)
class Run:
    """One catch-up: what was read, how long it took, the CPU it used."""

    name: str
    lines: int
    wall: float  # seconds, from spawn
    cpu: float  # user + system seconds, the process and its children
    ready: float | None = None  # seconds from spawn to READY=1 (run only)
    steady: float = 0.0  # lines/s from the first commit to the one before the last
    last_batch: float = 0.0  # seconds between the last two commits

    @property
    def rate(self) -> float:
        return self.lines / self.wall if self.wall > 0 else 0.0


def commit_pace(seen: list[tuple[float, int]], size: int, lines: int) -> dict[str, float]:
    """Return the Run fields `steady` and `last_batch` from (time, offset) commits."""
    if len(seen) < 3 or not size:
        return {}
    (t0, o0), (t1, o1), (t2, _) = seen[0], seen[-2], seen[-1]
    steady = (o1 - o0) / size * lines / (t1 - t0) if t1 > t0 else 0.0
    return {"steady": steady, "last_batch": t2 - t1}


@dataclass
class Paced:
    """What the writer thread did: (monotonic time before the write, size after it)."""

    writes: list[tuple[float, int]] = field(default_factory=list)
    lines: int = 0
    elapsed: float = 0.0
    error: OSError | None = None


def child_env(notify: Path | None = None) -> dict[str, str]:
    """The environment for children: mailtally importable from the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC"}}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT / "daemon")])
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    return env


def write_config(work: Path, db: Path, log: Path | None) -> Path:
    config = work / f"{db.stem}.yaml"
    text = f"timezone: UTC\ndatabase: {db}\n"
    if log is not None:
        text += f"sources:\n  - {{file: {log}}}\n"
    config.write_text(text, encoding="utf-8")
    return config


def generate(work: Path, name: str, lines: int, seed: int, start: datetime) -> Path:
    """Write a traditional-format genlog log (and its truth, beside it) into `work`."""
    log = work / f"{name}.log"
    cmd = [
        sys.executable,
        str(HERE / "genlog.py"),
        *("--lines", str(lines), "--seed", str(seed), "--format", "traditional"),
        *("--start", start.isoformat(), "--days", str(genlog.default_days(lines))),
        *("--out", str(log), "--truth", str(log.with_suffix(".json"))),
    ]
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"genlog failed: {done.stderr.strip()}")
    took = time.perf_counter() - began
    print(
        f"generated {name}.log: {lines:,} lines, {log.stat().st_size / 2**20:.0f} MiB"
        f" in {took:.1f} s"
    )
    return log


# -- the daemon and what it committed ------------------------------------------------------


class Daemon:
    """One `mailtally run` child with its notify socket and its stderr in a file."""

    def __init__(self, config: Path, work: Path) -> None:
        self.notify_path = work / f"notify-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(self.notify_path))
        self.stderr_path = work / f"{config.stem}-stderr.log"
        self._stderr: IO[bytes] = self.stderr_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailtally", "run", "--config", str(config)],
            cwd=ROOT,
            env=child_env(self.notify_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )

    def wait_ready(self) -> float:
        """Wait for READY=1; return its monotonic time."""
        deadline = time.monotonic() + START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            self.check_alive()
            self.sock.settimeout(min(left, 0.1))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if "READY=1" in data.decode("utf-8", "replace").split("\n"):
                return time.monotonic()
        raise BenchError(f"no READY=1 within {START_TIMEOUT:g} s{self.tail()}")

    def check_alive(self) -> None:
        """Raise if the daemon exited; take its notify messages, so that it never blocks."""
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while self.sock.recv(4096):
                pass
        if self.proc.poll() is not None:
            raise BenchError(f"mailtally run exited {self.proc.returncode}{self.tail()}")

    def stop(self) -> None:
        """SIGTERM and wait; the daemon must exit 0."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"mailtally run still running {STOP_TIMEOUT:g} s after SIGTERM"
            ) from None
        if code != 0:
            raise BenchError(f"mailtally run exited {code} on SIGTERM{self.tail()}")

    def close(self) -> None:
        """Kill what is left of the daemon's session (after a failure) and close files."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT)
        self.sock.close()
        self._stderr.close()

    def tail(self) -> str:
        self._stderr.flush()
        text = self.stderr_path.read_text(encoding="utf-8", errors="replace").strip()
        return f": {text[-800:]}" if text else ""


class Committed:
    """The committed offset of one file, read from the store without writing to it."""

    def __init__(self, db: Path, name: Path) -> None:
        self.db = db
        self.name = str(name)
        self._conn: sqlite3.Connection | None = None

    def offset(self) -> int | None:
        if self._conn is None:
            if not self.db.exists():
                return None
            self._conn = sqlite3.connect(f"{self.db.as_uri()}?mode=ro", uri=True)
        try:
            row = self._conn.execute(
                "SELECT offset FROM positions WHERE name = ?", (self.name,)
            ).fetchone()
        except sqlite3.OperationalError:  # schema not created yet
            return None
        return None if row is None else int(row[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


# -- part 1: lag under a steady write load ------------------------------------------------


def syslog_stamp(now: float) -> bytes:
    t = time.gmtime(now)
    month = genlog.MONTHS[t.tm_mon - 1]
    return f"{month} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}".encode()


def pace(
    log: Path, lines: list[bytes], rate: float, seconds: float, tick: float, out: Paced
) -> None:
    """Append the lines due every `tick` s at `rate` lines/s for `seconds` (a thread)."""
    try:
        with log.open("ab", buffering=0) as f:
            start = time.monotonic()
            size = 0
            for k in range(1, int(seconds / tick) + 1):
                time.sleep(max(0.0, start + k * tick - time.monotonic()))
                due = min(len(lines), int(rate * (time.monotonic() - start)))
                if due <= out.lines:
                    continue
                stamp = syslog_stamp(time.time())
                chunk = b"".join(stamp + line[STAMP_LEN:] for line in lines[out.lines : due])
                at = time.monotonic()
                view = memoryview(chunk)
                while view:  # a regular file takes it whole unless the disk is full
                    view = view[f.write(view) or 0 :]
                size += len(chunk)
                out.writes.append((at, size))
                out.lines = due
            out.elapsed = time.monotonic() - start
    except OSError as exc:  # reported by the main thread
        out.error = exc


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def lags(writes: list[tuple[float, int]], seen: list[tuple[float, int]]) -> list[float]:
    """Seconds from each write until an offset at least its end was seen committed."""
    out, j = [], 0
    for at, end in writes:
        while j < len(seen) and seen[j][1] < end:
            j += 1
        if j == len(seen):
            break
        out.append(seen[j][0] - at)
    return out


def watch(
    committed: Committed, daemon: Daemon, writer: threading.Thread, paced: Paced, poll: float
) -> list[tuple[float, int]]:
    """Poll the committed offset until the last write is in; return (time, offset) changes."""
    seen: list[tuple[float, int]] = []
    last = -1
    deadline: float | None = None
    while True:
        offset = committed.offset()
        now = time.monotonic()
        if offset is not None and offset != last:
            seen.append((now, offset))
            last = offset
        if not writer.is_alive():
            if paced.writes and last >= paced.writes[-1][1]:
                return seen
            deadline = deadline or now + DRAIN_TIMEOUT
            if now > deadline or not paced.writes:
                return seen
        daemon.check_alive()
        time.sleep(poll)


def lag_part(work: Path, args: argparse.Namespace) -> bool:
    """Measure lag under a paced writer; return whether the stored data was right."""
    lines = max(1, math.ceil(args.rate * args.seconds))
    source = generate(work, "live-source", lines, args.seed, datetime.now(UTC))
    content = [line for line in source.read_bytes().splitlines(keepends=True) if line]
    source.unlink()
    log, db = work / "mail.log", work / "lag.db"
    daemon = Daemon(write_config(work, db, log), work)
    committed = Committed(db, log)
    try:
        daemon.wait_ready()
        paced = Paced()
        writer = threading.Thread(
            target=pace,
            args=(log, content, args.rate, args.seconds, args.tick, paced),
            daemon=True,  # a failed daemon ends the script without waiting for the writer
        )
        cpu0, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
        writer.start()
        seen = watch(committed, daemon, writer, paced, args.poll)
        cpu1, t1 = cpu_seconds(daemon.proc.pid), time.monotonic()
        writer.join()
        daemon.stop()
    finally:
        committed.close()
        daemon.close()
    if paced.error is not None:
        raise BenchError(f"writer failed: {paced.error!r}")
    print_lag(args, paced, lags(paced.writes, seen), daemon.proc.pid, cpu0, cpu1, t1 - t0)
    return check_lag_data(work, log, db, args.timeout, args.poll)


def check_lag_data(work: Path, log: Path, db: Path, timeout: float, poll: float) -> bool:
    """Compare what the daemon stored with `mailtally ingest` of the finished file."""
    here = work / "lag-check"
    here.mkdir()
    _, expected = ingest(log, 0, here, timeout, poll)
    diff = differences(db, expected)
    bad = {t: first for t, (_, first) in diff.items() if first is not None}
    if bad or not diff["counters"][0]:
        where = ", ".join(f"{t} from row {first:,}" for t, first in bad.items()) or "no counters"
        print(f"stored data: MISMATCH with `mailtally ingest` of the same file: {where}")
        return False
    shown = ", ".join(f"{t} {count:,} rows" for t, (count, _) in diff.items())
    print(f"stored data: identical to `mailtally ingest` of the same file ({shown})")
    return True


def print_lag(
    args: argparse.Namespace,
    paced: Paced,
    got: list[float],
    pid: int,
    cpu0: dict[int, float],
    cpu1: dict[int, float],
    wall: float,
) -> None:
    size = paced.writes[-1][1] if paced.writes else 0
    print(
        f"\nlag: {args.rate:,.0f} lines/s asked for {args.seconds:g} s, a write every"
        f" {args.tick * 1000:g} ms, committed offset polled every {args.poll * 1000:g} ms"
    )
    print(
        f"written {paced.lines:,} lines ({size / 2**20:.1f} MiB) in {len(paced.writes):,}"
        f" writes over {paced.elapsed:.1f} s: {paced.lines / max(paced.elapsed, 1e-9):,.0f}"
        " lines/s achieved"
    )
    missing = len(paced.writes) - len(got)
    if missing:
        print(f"NOT COMMITTED: {missing} writes within {DRAIN_TIMEOUT:g} s of the last one")
    if got:
        ordered = sorted(got)
        cells = [percentile(ordered, q) * 1000 for q in (0.50, 0.95, 0.99)] + [ordered[-1] * 1000]
        print(f"\n{'lag ms':<12}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}{'writes':>9}")
        print(f"{'':<12}" + "".join(f"{c:>8.0f}" for c in cells) + f"{len(got):>9,}")
    main = cpu1.get(pid, 0.0) - cpu0.get(pid, 0.0)
    total = sum(cpu1.values()) - sum(cpu0.get(p, 0.0) for p in cpu1)
    share = [100 * x / wall for x in (total, main, total - main)]
    print(
        f"daemon CPU {share[0]:.0f}% of one core over {wall:.1f} s"
        f" (main process {share[1]:.0f}%, writer child {share[2]:.0f}%)"
    )
    p95 = percentile(sorted(got), 0.95) * 1000 if got else math.inf
    verdict = "met" if not missing and p95 < TARGET_P95_MS else "NOT met"
    print(
        f"target: p95 < {TARGET_P95_MS:g} ms at 5,000 lines/s: {verdict}"
        f" (p95 {p95:.0f} ms at {args.rate:,.0f} lines/s)"
    )
    if missing:
        raise BenchError("the daemon did not commit every write")


# -- part 2: catch-up against ingest --------------------------------------------------------


def catch_up(log: Path, lines: int, work: Path, timeout: float, poll: float) -> tuple[Run, Path]:
    """`mailtally run` on a fresh database until it committed all of `log`."""
    db = work / "run.db"
    size = log.stat().st_size
    daemon = Daemon(write_config(work, db, log), work)
    committed = Committed(db, log)
    try:
        ready = daemon.wait_ready() - daemon.started
        deadline = time.monotonic() + timeout
        seen: list[tuple[float, int]] = []
        while (offset := committed.offset()) != size:
            note(seen, offset, daemon.started)
            if time.monotonic() > deadline:
                raise BenchError(f"run: offset {offset} of {size} after {timeout:g} s")
            daemon.check_alive()
            time.sleep(poll)
        wall = time.monotonic() - daemon.started
        note(seen, offset, daemon.started)
        cpu = sum(cpu_seconds(daemon.proc.pid).values())
        daemon.stop()
    finally:
        committed.close()
        daemon.close()
    return Run("run (follow)", lines, wall, cpu, ready, **commit_pace(seen, size, lines)), db


def note(seen: list[tuple[float, int]], offset: int | None, started: float) -> None:
    """Keep (seconds since `started`, offset) when the committed offset moved."""
    if offset is not None and (not seen or seen[-1][1] != offset):
        seen.append((time.monotonic() - started, offset))


def ingest(log: Path, lines: int, work: Path, timeout: float, poll: float) -> tuple[Run, Path]:
    """`mailtally ingest` of `log` into a fresh database, spawn to exit."""
    db = work / "ingest.db"
    config = write_config(work, db, None)
    cmd = [sys.executable, "-m", "mailtally", "ingest", "--config", str(config), "--db", str(db)]
    with tempfile.TemporaryFile(dir=work) as err:
        start = time.monotonic()
        proc = subprocess.Popen([*cmd, str(log)], stderr=err, env=child_env(), cwd=ROOT)
        deadline = start + timeout
        committed = Committed(db, log)
        seen: list[tuple[float, int]] = []
        try:
            while True:  # wait4 for the CPU of the child and of the writer it reaped
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                note(seen, committed.offset(), start)
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise BenchError(f"ingest still running after {timeout:g} s")
                time.sleep(poll)
            wall = time.monotonic() - start
            note(seen, committed.offset(), start)
        finally:
            committed.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        raise BenchError(f"ingest exited {proc.returncode}: {stderr[-800:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return Run("ingest", lines, wall, cpu, **commit_pace(seen, log.stat().st_size, lines)), db


def rows(db: Path, sql: str) -> Iterator[tuple[Any, ...]]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        yield from conn.execute(sql)
    finally:
        conn.close()


def differences(a: Path, b: Path) -> dict[str, tuple[int, int | None]]:
    """Per table: rows in `a`, and the number of the first row that differs (None: same)."""
    out: dict[str, tuple[int, int | None]] = {}
    for table, sql in TABLES.items():
        count, first = 0, None
        for n, (x, y) in enumerate(zip_longest(rows(a, sql), rows(b, sql)), 1):
            count += x is not None
            if first is None and x != y:
                first = n
        out[table] = (count, first)
    return out


def truth_mismatches(db: Path, truth_path: Path) -> tuple[int, int]:
    """Return (counter rows in `db`, (sender, day) rows that differ from genlog's truth)."""
    truth = json.loads(truth_path.read_text(encoding="utf-8"))["senders"]
    want = {
        (sender, day): tuple(cols[c] for c in genlog.COLUMNS)
        for sender, days in truth.items()
        for day, cols in days.items()
    }
    cols = ", ".join(genlog.COLUMNS)
    got = {
        (r[0], r[1]): tuple(r[2:])
        for r in rows(db, f"SELECT sender, day, {cols} FROM counters")  # noqa: S608 - fixed
        if any(r[2:])
    }
    keys = want.keys() | got.keys()
    return len(got), sum(want.get(k) != got.get(k) for k in keys)


def catchup_part(work: Path, args: argparse.Namespace) -> bool:
    """Time run against ingest over --repeat rounds; return whether their data agreed."""
    lines = args.backlog_lines
    days = genlog.default_days(lines)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    log = generate(work, "backlog", lines, args.seed, today - timedelta(days=days + 1))
    truth_path = log.with_suffix(".json")
    best: dict[str, Run] = {}
    agreed, shown = True, ""
    counted = wrong = 0
    for n in range(1, max(1, args.repeat) + 1):
        here = work / f"round{n}"
        here.mkdir()
        run, run_db = catch_up(log, lines, here, args.timeout, args.poll)
        full, ingest_db = ingest(log, lines, here, args.timeout, args.poll)
        for r in (run, full):
            if r.name not in best or r.wall < best[r.name].wall:
                best[r.name] = r
        diff = differences(run_db, ingest_db)
        bad = {t: first for t, (_, first) in diff.items() if first is not None}
        if bad:
            agreed = False
            where = ", ".join(f"{t} from row {first:,}" for t, first in bad.items())
            print(f"round {n}: MISMATCH between run and ingest: {where}")
        shown = shown or ", ".join(f"{t} {count:,} rows" for t, (count, _) in diff.items())
        if n == 1:
            counted, wrong = truth_mismatches(ingest_db, truth_path)
        if not args.keep:
            shutil.rmtree(here)
    print_catchup(log, truth_path, best, max(1, args.repeat))
    if agreed:
        print(f"stored data: run and ingest identical in every round ({shown})")
    if wrong:
        print(f"counters: {wrong:,} (sender, day) rows DIFFER from genlog's truth")
    else:
        print(f"counters: equal to genlog's truth ({counted:,} sender-day rows)")
    run, full = best["run (follow)"], best["ingest"]
    ratio = run.rate / full.rate
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(
        f"target: run at the ingest speed (>= {TARGET_RATIO:g}x its lines/s): {verdict}"
        f" ({ratio:.2f}x; CPU seconds run/ingest {run.cpu / full.cpu:.2f}x)"
    )
    return agreed and not wrong


def print_catchup(log: Path, truth_path: Path, best: dict[str, Run], rounds: int) -> None:
    truth = json.loads(truth_path.read_text(encoding="utf-8"))
    print(
        f"\ncatch-up: {truth['lines']:,} lines, {log.stat().st_size / 2**20:.0f} MiB,"
        f" {truth['first_line'][:19]} .. {truth['last_line'][:19]}, fresh databases,"
        f" best of {rounds} round{'s' if rounds > 1 else ''}"
    )
    base = best["ingest"]
    print(
        f"\n{'mode':<14}{'lines/s':>10}{'wall s':>8}{'cpu s':>7}{'ready s':>9}"
        f"{'steady/s':>10}{'last ms':>9}{'x ingest':>10}{'steady x':>10}"
    )
    for r in (best["run (follow)"], base):
        ready = f"{r.ready:.2f}" if r.ready is not None else ""
        # fewer than three commits (a small backlog): no steady state to show
        steady = f"{r.steady:,.0f}" if r.steady else ""
        last = f"{r.last_batch * 1000:.0f}" if r.steady else ""
        steady_x = f"{r.steady / base.steady:.2f}" if r.steady and base.steady else ""
        print(
            f"{r.name:<14}{r.rate:>10,.0f}{r.wall:>8.2f}{r.cpu:>7.2f}{ready:>9}"
            f"{steady:>10}{last:>9}{r.rate / base.rate:>10.2f}{steady_x:>10}"
        )
    print(
        "(wall: from spawn until the committed offset was the file's size; steady: lines/s"
        " from the\n first commit to the one before the last; last ms: between the last two"
        " commits)"
    )


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show each option's default."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/follow.py", description=__doc__, epilog=EXAMPLES, formatter_class=Formatter
    )
    ap.add_argument("--rate", type=float, default=5000.0, help="lag: lines per second written")
    ap.add_argument("--seconds", type=float, default=20.0, help="lag: how long to write")
    ap.add_argument("--tick", type=float, default=0.01, help="lag: seconds between writes")
    ap.add_argument("--poll", type=float, default=0.005, help="seconds between store polls")
    ap.add_argument(
        "--backlog-lines", type=int, default=1_000_000, help="catch-up: lines in the backlog"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="catch-up: rounds of run + ingest; each side's fastest is kept",
    )
    ap.add_argument("--seed", type=int, default=1, help="genlog seed")
    ap.add_argument(
        "--timeout", type=float, default=300.0, help="catch-up: seconds allowed per child"
    )
    ap.add_argument("--skip-lag", action="store_true", help="leave out the lag part")
    ap.add_argument("--skip-catchup", action="store_true", help="leave out the catch-up part")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --seconds 2 --backlog-lines 20000 --repeat 1",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.backlog_lines, args.repeat = 2.0, 20_000, 1
    if min(args.rate, args.seconds, args.tick, args.poll, args.timeout) <= 0:
        ap.error("--rate, --seconds, --tick, --poll and --timeout must be positive")
    if args.backlog_lines <= 0 or args.repeat <= 0:
        ap.error("--backlog-lines and --repeat must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mailtally-follow-"))
    ok = True
    try:
        if not args.skip_lag:
            ok = lag_part(work, args)
        if not args.skip_catchup:
            print()
            ok = catchup_part(work, args) and ok
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
