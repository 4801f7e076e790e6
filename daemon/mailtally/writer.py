"""Commit batches from a writer process, so SQLite's work overlaps parsing.

Backfilling, SQLite takes about as long to insert a batch as the reader takes to parse
the next one. A thread did not help (the sqlite3 module gives up the GIL per row, so
the two threads took turns); a child process does. The child owns the only write
connection and commits batches strictly in the order sent; after a failure it commits
nothing more, and the error reaches the parent at its next flush. If the parent dies,
the child sees the pipe close and exits: a batch is committed whole or not at all.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from mailtally.correlate import Batch
from mailtally.errors import StoreError
from mailtally.store import Position, open_store

log = logging.getLogger(__name__)


class BatchWriter:
    """Send batches to a child process that commits them to the store at `path`."""

    def __init__(self, path: Path, now: Callable[[], float]) -> None:
        self.now = now
        context = multiprocessing.get_context("fork")
        self._pipe, child_end = context.Pipe()
        self._child = context.Process(
            target=_serve,
            args=(path, child_end, self._pipe),
            name="mailtally-writer",
            daemon=True,
        )
        self._child.start()
        child_end.close()

    def submit(self, batch: Batch, positions: Sequence[Position]) -> None:
        """Hand a batch and the positions it reached to the writer."""
        self._send(("batch", batch, list(positions), self.now()))

    def flush(self) -> None:
        """Wait until every batch sent is committed; raise the writer's first error."""
        self._send(("flush",))
        self._answer()

    def close(self) -> None:
        """Commit what was sent, stop the writer, and raise its first error."""
        if not self._child.is_alive():
            self._child.join()
            return
        self._send(("close",))
        try:
            self._answer()
        finally:
            self._child.join()
            self._pipe.close()

    def _send(self, message: tuple[object, ...]) -> None:
        try:
            self._pipe.send(message)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise StoreError(f"database writer stopped (exit {self._child.exitcode})") from exc

    def _answer(self) -> None:
        try:
            error = self._pipe.recv()
        except EOFError as exc:
            raise StoreError(f"database writer stopped (exit {self._child.exitcode})") from exc
        if error is not None:
            raise StoreError(str(error))


def _serve(path: Path, pipe: Connection, parent_end: Connection) -> None:
    """The child: commit batches until told to close or the parent goes away."""
    parent_end.close()
    store = open_store(path)
    error: str | None = None
    try:
        while True:
            try:
                message = pipe.recv()
            except EOFError:
                return  # the parent died; what it sent whole is committed
            kind = message[0]
            if kind == "batch":
                if error is None:
                    try:
                        store.commit_batch(message[1], message[2], message[3])
                    except StoreError as exc:
                        log.error("batch not committed error=%s", exc)
                        error = str(exc)
            else:
                pipe.send(error)
                if kind == "close":
                    return
    finally:
        store.close()
