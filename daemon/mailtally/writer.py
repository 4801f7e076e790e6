"""Commit batches from a writer process, so SQLite's work overlaps parsing.

Backfilling, SQLite takes about as long to insert a batch as the reader takes to parse
the next one. A thread did not help (the sqlite3 module gives up the GIL per row, so
the two threads took turns); a child process does. The child owns the only write
connection and commits batches strictly in the order sent, acknowledging each one. If
the parent dies, the child sees the pipe close and exits: a batch is committed whole or
not at all.

A lock file beside the database (``mailtally.db.lock``) is held by parent and child
together, so a new process never reads positions while the writer of a killed one is
still committing its last batch, and two writers never count the same lines.

After a failed commit the child either stops committing (``retry=False``, backfill: the
error reaches the parent at its next flush) or keeps the batch and tries again with
backoff (``retry=True``, the daemon: a locked or full database must not lose a batch).
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import signal
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mailtally.correlate import Batch
from mailtally.errors import StoreError
from mailtally.store import Judge, Position, Store, open_store

log = logging.getLogger(__name__)

LOCK_WAIT = 30.0  # seconds to wait for another writer (a killed run's child finishing)
RETRY_FIRST = 0.1
RETRY_MAX = 5.0
# Retrying, the writer waits this long for a lock before it says so and backs off.
RETRY_BUSY_MS = 1000


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def _lock(database: Path, wait: float) -> int:
    """Take the writer lock of `database`; return its descriptor (kept open while writing)."""
    path = lock_path(database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open lock file: {exc.strerror}") from exc
    deadline = time.monotonic() + wait
    warned = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StoreError(
                    f"{database}: another mailtally process is writing this database (lock {path})"
                ) from None
            if not warned:
                log.warning("database locked by another mailtally writer, waiting lock=%s", path)
                warned = True
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class BatchWriter:
    """Send batches to a child process that commits them to the store at `path`."""

    def __init__(
        self,
        path: Path,
        now: Callable[[], float],
        *,
        retry: bool = False,
        lock_wait: float = LOCK_WAIT,
    ) -> None:
        self.now = now
        self.sent = 0  # batches submitted
        self.done = 0  # batches the child has committed
        self.committed_at = 0.0  # wall time of the last commit
        self.notices_made = 0  # by the batches committed so far
        self._lock_fd = _lock(path, lock_wait)
        context = multiprocessing.get_context("fork")
        self._pipe, child_end = context.Pipe()
        self._child = context.Process(
            target=_serve,
            args=(path, child_end, self._pipe, retry),
            name="mailtally-writer",
            daemon=True,
        )
        self._child.start()
        child_end.close()

    @property
    def pid(self) -> int | None:
        return self._child.pid

    def fileno(self) -> int:
        """Readable when the child has acknowledged a commit (see `drain`)."""
        return self._pipe.fileno()

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet committed (as of the last `drain`)."""
        return self.sent - self.done

    def submit(self, batch: Batch, positions: Sequence[Position]) -> None:
        """Hand a batch and the positions it reached to the writer."""
        self._send(("batch", batch, list(positions), self.now()))
        self.sent += 1

    def set_judge(self, judge: Judge | None) -> None:
        """Judge every later batch with `judge` (crossing notices), or no longer."""
        self._send(("judge", judge))

    def prune(self, before: float) -> None:
        """Have the writer delete detail rows of days wholly before `before` (epoch s)."""
        self._send(("prune", before))

    def drain(self, timeout: float = 0.0) -> None:
        """Take the child's acknowledgements, waiting up to `timeout` for the first."""
        try:
            while self._pipe.poll(timeout):
                self._take(self._pipe.recv())
                timeout = 0.0
        except (EOFError, OSError) as exc:
            raise StoreError(f"database writer stopped (exit {self._child.exitcode})") from exc

    def flush(self) -> None:
        """Wait until every batch sent is committed; raise the writer's first error."""
        self._send(("flush",))
        self._answer()

    def close(self) -> None:
        """Commit what was sent, stop the writer, and raise its first error."""
        if self._lock_fd < 0:
            return
        try:
            if self._child.is_alive():
                self._send(("close",))
                self._answer()
        finally:
            self._child.join()
            self._pipe.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _take(self, message: tuple[Any, ...]) -> str | None:
        if message[0] == "done":
            self.done = message[1]
            self.committed_at = message[2]
            self.notices_made += message[3]
            return None
        error: str | None = message[1]
        return error if error is not None else ""

    def _send(self, message: tuple[object, ...]) -> None:
        try:
            self._pipe.send(message)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise StoreError(f"database writer stopped (exit {self._child.exitcode})") from exc

    def _answer(self) -> None:
        while True:
            try:
                answer = self._take(self._pipe.recv())
            except EOFError as exc:
                raise StoreError(f"database writer stopped (exit {self._child.exitcode})") from exc
            if answer is not None:
                break
        if answer:
            raise StoreError(answer)


class _Child:
    """The writer process: a queue of batches committed in order."""

    def __init__(self, store: Store, pipe: Connection, retry: bool) -> None:
        self.store = store
        self.pipe = pipe
        self.retry = retry
        self.queue: deque[tuple[Any, ...]] = deque()
        self.waiters: list[str] = []  # "flush" / "close" requests not answered yet
        self.error: str | None = None
        self.done = 0
        self.retry_at = 0.0
        self.delay = RETRY_FIRST
        self.failing_since: float | None = None
        self.judge: Judge | None = None

    def serve(self) -> None:
        while True:
            if self.queue and time.monotonic() >= self.retry_at:
                self._commit_next()
                continue
            if not self.queue and self.waiters:
                closing = "close" in self.waiters
                for _ in self.waiters:
                    self.pipe.send(("answer", self.error))
                self.waiters.clear()
                if closing:
                    return
            timeout = max(0.0, self.retry_at - time.monotonic()) if self.queue else None
            if not self.pipe.poll(timeout):
                continue
            try:
                message = self.pipe.recv()
            except EOFError:
                # The parent died. What it sent whole is queued; commit that, then stop.
                self.waiters.clear()
                self._finish_after_parent_died()
                return
            if message[0] == "batch":
                if self.error is None:
                    self.queue.append(message)
                else:
                    self.done += 1  # dropped after an error; the flush reports it
            elif message[0] == "prune":
                self._prune(message[1])
            elif message[0] == "judge":
                self.queue.append(message)  # applies from the next batch on, in order
            else:
                self.waiters.append(message[0])

    def _prune(self, before: float) -> None:
        if self.queue:
            return  # behind or failing: the next hourly prune will do
        try:
            rows = self.store.prune_details(before)
        except StoreError as exc:
            log.warning("details not pruned error=%s", exc)
            return
        if rows:
            log.info("details pruned rows=%d", rows)

    def _finish_after_parent_died(self) -> None:
        deadline = time.monotonic() + LOCK_WAIT
        while self.queue and time.monotonic() < deadline:
            if time.monotonic() >= self.retry_at:
                self._commit_next(acknowledge=False)
            else:
                time.sleep(max(0.0, self.retry_at - time.monotonic()))

    def _commit_next(self, acknowledge: bool = True) -> None:
        if self.queue[0][0] == "judge":
            self.judge = self.queue.popleft()[1]
            return
        _, batch, positions, now = self.queue[0]
        try:
            made = self.store.commit_batch(batch, positions, now, self.judge)
        except StoreError as exc:
            transient = isinstance(exc.__cause__, sqlite3.OperationalError)
            if not (self.retry and transient):
                log.error("batch not committed error=%s", exc)
                self.error = str(exc)
                self.done += sum(1 for m in self.queue if m[0] == "batch")
                self.queue.clear()
                if acknowledge:
                    self.pipe.send(("done", self.done, time.time(), 0))
                return
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                log.error("database write failed, retrying (nothing is lost) error=%s", exc)
            self.retry_at = time.monotonic() + self.delay
            self.delay = min(self.delay * 2, RETRY_MAX)
            return
        self.queue.popleft()
        self.done += 1
        if self.failing_since is not None:
            log.info(
                "database write recovered after_seconds=%.1f",
                time.monotonic() - self.failing_since,
            )
            self.failing_since = None
        self.delay = RETRY_FIRST
        self.retry_at = 0.0
        if acknowledge:
            self.pipe.send(("done", self.done, time.time(), made))


def _serve(path: Path, pipe: Connection, parent_end: Connection, retry: bool) -> None:
    """The child: commit batches until told to close or the parent goes away."""
    parent_end.close()
    # The parent decides when to stop: a SIGTERM to the whole service (or a ^C to the
    # terminal's process group) must not kill the writer before the last batch is in.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    store = open_store(path, RETRY_BUSY_MS) if retry else open_store(path)
    try:
        _Child(store, pipe, retry).serve()
    finally:
        store.close()
