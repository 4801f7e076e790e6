"""Backfill: read log files (plain or gzip) through parse and correlate into the store.

A file is known by a fingerprint of its first line, not by its name, so a log that was
renamed or compressed by logrotate resumes where the last run stopped, and ingesting the
same file twice counts nothing twice. Positions are committed with the counters.
"""

from __future__ import annotations

import gc
import gzip
import logging
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from zoneinfo import ZoneInfo

from mailtally.correlate import Correlator, CorrelatorSettings
from mailtally.errors import SourceError
from mailtally.parse import LineParser
from mailtally.sources.logfile import FINGERPRINT_BYTES, fingerprint, open_log, read_blocks
from mailtally.store import Position, Store
from mailtally.writer import BatchWriter

if TYPE_CHECKING:  # only its attributes are used here; the benchmark stages skip pydantic
    from mailtally.config import Config

log = logging.getLogger(__name__)

GC_THRESHOLD = 100_000


@dataclass(slots=True)
class FileResult:
    """What one file contributed to an ingest run."""

    path: Path
    lines: int = 0
    skipped_bytes: int = 0  # already ingested by an earlier run


def tune_gc() -> None:
    """Collect garbage less often: records die young and hold no cycles.

    Python's default (a collection every 700 allocations) costs about 15% of ingest
    time; only the process's owner (the CLI, a benchmark) should call this.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 50)


class Ingester:
    """Feed files into one correlator and commit batches to one store.

    With a `writer`, batches are committed by its process while the next one is
    parsed; `store` is then only read (positions, open messages).
    """

    def __init__(
        self,
        store: Store,
        config: Config,
        host: str | None = None,
        now: Callable[[], float] = time.time,
        writer: BatchWriter | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.config = config
        self.host = host
        self.now = now
        self.tz = config.tz()
        self.correlator = Correlator(self.tz, config.correlator_settings())
        self.correlator.restore(store.open_messages())

    def ingest(self, path: Path) -> FileResult:
        """Ingest one file from where an earlier run stopped; commit as it goes."""
        result = FileResult(path)
        try:
            mtime = path.stat().st_mtime
            with open_log(path) as stream:
                head = stream.read(FINGERPRINT_BYTES)
                source = fingerprint(head)
                if source is None:
                    log.info("file has no complete line yet path=%s", path)
                    return result
                if self.writer is not None:
                    self.writer.flush()  # an earlier file may have been this one
                known = self.store.position(source)
                start = known.offset if known else 0
                stream.seek(start)
                result.skipped_bytes = start
                final = isinstance(stream, gzip.GzipFile)
                self._read(stream, path, source, start, mtime, final, result)
        except (OSError, EOFError, zlib.error) as exc:
            raise SourceError(f"{path}: read failed: {exc}") from exc
        return result

    def _read(
        self,
        stream: BinaryIO,
        path: Path,
        source: str,
        start: int,
        mtime: float,
        final: bool,
        result: FileResult,
    ) -> None:
        parser = LineParser(self.tz, mtime, tuple(self.config.ingest.syslog_names), host=self.host)
        correlator = self.correlator
        batch_lines = self.config.ingest.batch_lines
        pending = 0
        offset = start
        for consumed, lines in read_blocks(stream, final=final):
            correlator.feed_all(parser.parse_all(lines))
            pending += len(lines)
            result.lines += len(lines)
            offset = start + consumed
            if pending >= batch_lines:
                self._commit(source, offset, path)
                pending = 0
        self._commit(source, offset, path)

    def _commit(self, source: str, offset: int, path: Path) -> None:
        batch = self.correlator.take()
        positions = [Position(source, offset, name=str(path))]
        if self.writer is not None:
            self.writer.submit(batch, positions)
        else:
            self.store.commit_batch(batch, positions, self.now())


def order_files(paths: Iterable[Path]) -> list[Path]:
    """Order files oldest first by modification time (logrotate's order, not the name's)."""
    try:
        return sorted(paths, key=lambda p: (p.stat().st_mtime, str(p)))
    except OSError as exc:
        raise SourceError(f"{exc.filename}: cannot read: {exc.strerror}") from exc


def bench_parse(path: Path) -> int:
    """Parse every line of `path` (stamps in UTC) and return the line count (benchmark)."""
    tune_gc()
    parser = LineParser(ZoneInfo("UTC"), path.stat().st_mtime)
    count = 0
    with open_log(path) as stream:
        for _, lines in read_blocks(stream, final=True):
            parser.parse_all(lines)
            count += len(lines)
    return count


def bench_correlate(path: Path) -> int:
    """Parse and correlate `path` (UTC, default settings) without a store (benchmark)."""
    tune_gc()
    parser = LineParser(ZoneInfo("UTC"), path.stat().st_mtime)
    correlator = Correlator(ZoneInfo("UTC"), CorrelatorSettings())
    count = 0
    with open_log(path) as stream:
        for _, lines in read_blocks(stream, final=True):
            correlator.feed_all(parser.parse_all(lines))
            count += len(lines)
            correlator.take()
    return count
