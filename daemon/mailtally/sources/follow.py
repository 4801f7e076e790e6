"""Follow syslog files as they grow, across logrotate's rename, copytruncate and compress.

Each open file is tracked by device and inode while it is open, and by the fingerprint
of its first line in the store, so a file is recognised after a rename, after gzip, and
is not mistaken for a new file that happens to reuse an old inode.

- rename + create: the old file stays open and is read to its end, for as long as it
  keeps growing (``delaycompress``, a syslog daemon not yet told to reopen), then the
  new file is read from its start.
- copytruncate: the file shrinks below the offset read; the rest of the old content
  is read from the copy (``mail.log.1``, found by fingerprint), then the new content.
- stopped during rotations: at start, the newest file of the family (``mail.log``,
  ``mail.log.1``, ``mail.log.2.gz``, ``mail.log-20261203``...) with a known position is
  read on from there, then every newer one, oldest first, then the live file.

inotify (through watchdog) wakes the daemon when a watched directory changes; where
inotify is unavailable or out of watches, the daemon polls instead.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import gzip
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import BinaryIO

from mailtally.errors import SourceError
from mailtally.parse import LineParser, Record
from mailtally.sources import PositionLookup
from mailtally.sources.logfile import (
    FINGERPRINT_BYTES,
    GZIP_MAGIC,
    fingerprint,
    open_log,
    read_blocks,
)
from mailtally.store import Position

log = logging.getLogger(__name__)

ROTATED_GRACE = 30.0  # seconds a renamed-away file is read on after it last grew
GLOB_EVERY = 2.0  # seconds between re-expanding globs and retrying inotify watches


@dataclass(slots=True)
class _Live:
    """A file open for following, known by device and inode."""

    path: Path
    stream: BinaryIO
    dev: int
    ino: int
    parser: LineParser
    source: str | None = None  # None until its first line is complete
    offset: int = 0
    grew_at: float = 0.0
    gone_since: float | None = None  # when its path stopped naming it


@dataclass(slots=True)
class _Backlog:
    """A closed file (rotated, maybe compressed) to read to its end before the live ones."""

    path: Path
    source: str
    offset: int
    blocks: Iterator[tuple[int, list[str | None]]] | None = None
    stream: BinaryIO | None = None
    parser: LineParser | None = None


@dataclass(slots=True)
class _Candidate:
    path: Path
    source: str
    mtime: float
    size: int
    gzip: bool = field(default=False)


# What logrotate appends to a rotated file's name: a number (mail.log.1, .2.gz) or,
# with dateext, a date of digits and dashes (mail.log-20261203, -2026-12-03.gz).
ROTATED_SUFFIX = re.compile(r"[.-][0-9][0-9-]*(?:\.gz)?\Z")


def family(path: Path) -> list[Path]:
    """Return `path`'s rotated siblings: ``mail.log.1``, ``.2.gz``, ``mail.log-20261203``.

    Only logrotate's names: ``mail.log.bak`` or ``mail.log.rfc3339`` are other logs.
    """
    stem = path.name
    try:
        return [
            p
            for p in path.parent.iterdir()
            if p.name.startswith(stem) and ROTATED_SUFFIX.match(p.name, len(stem))
        ]
    except OSError:
        return []


def _head(path: Path) -> tuple[str | None, bool]:
    """Return (fingerprint, is gzip) of a closed file; (None, ...) if unreadable or empty."""
    try:
        with open_log(path) as stream:
            head = stream.read(FINGERPRINT_BYTES)
            gz = isinstance(stream, gzip.GzipFile)
    except (OSError, EOFError, SourceError):
        return None, False
    return fingerprint(head), gz


class FileFollower:
    """Follow the files named by `patterns` (paths or globs) as one live source."""

    def __init__(
        self,
        patterns: list[str],
        lookup: PositionLookup,
        tz: tzinfo,
        syslog_names: tuple[str, ...],
        *,
        inotify: bool = True,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.name = ", ".join(patterns)
        self.lines = 0
        self.patterns = patterns
        self.lookup = lookup
        self.tz = tz
        self.syslog_names = syslog_names
        self.now = now
        self._live: dict[tuple[int, int], _Live] = {}
        # Matched files not to follow (compressed, or a copy of one followed), with their
        # ctime: a new file that reuses such an inode is looked at afresh.
        self._skip: dict[tuple[int, int], int] = {}
        self._backlog: list[_Backlog] = []
        self._moved: dict[str, Position] = {}
        self._warned: dict[str, str] = {}
        self._paths: list[Path] = []
        self._globbed_at = -GLOB_EVERY
        self._watch = _Watch(patterns) if inotify else None
        self._expand()
        self._plan()
        self._check()

    # -- LiveSource ---------------------------------------------------------------

    def fileno(self) -> int | None:
        if self._watch is None or self._watch.failed:
            return None
        return self._watch.fileno()

    def read(self, limit: int) -> list[Record]:
        if self._watch is not None:
            self._watch.clear()
        now = self.now()
        if now - self._globbed_at >= GLOB_EVERY:
            self._expand()
            if self._watch is not None:
                self._watch.retry()
        self._check()
        out: list[Record] = []
        while self._backlog and len(out) < limit:
            self._read_backlog(self._backlog[0], out, limit)
        if not self._backlog:
            for live in sorted(self._live.values(), key=_read_order):
                if len(out) >= limit:
                    break
                self._read_live(live, out, limit, now)
            self._close_rotated(now)
        self.lines += len(out)
        return out

    def positions(self) -> list[Position]:
        moved = list(self._moved.values())
        self._moved.clear()
        return moved

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        for live in self._live.values():
            live.stream.close()
        self._live.clear()
        for item in self._backlog:
            if item.stream is not None:
                item.stream.close()
        self._backlog.clear()

    @property
    def behind(self) -> bool:
        """True while rotated files from before the start are still being read."""
        return bool(self._backlog)

    # -- start: where each family of files resumes ----------------------------------

    def _plan(self) -> None:
        """Queue the rotated files written since the position known for each family."""
        for path in self._paths:
            candidates: dict[str, _Candidate] = {}
            for p in [path, *family(path)]:
                source, gz = _head(p)
                if source is None:
                    continue
                try:
                    st = p.stat()
                except OSError:
                    continue
                found = _Candidate(p, source, st.st_mtime, st.st_size, gz)
                other = candidates.get(source)
                # mail.log.1 and mail.log.1.gz side by side: gzip is still writing; the
                # plain one is whole. The live file itself always wins.
                if other is None or other.gzip or p == path:
                    candidates[source] = found
            # The live file comes last whatever its mtime: it is where rotation leads.
            ordered = sorted(candidates.values(), key=lambda c: (c.path == path, c.mtime))
            known = [i for i, c in enumerate(ordered) if self.lookup(c.source) is not None]
            if not known:
                continue
            for c in ordered[known[-1] :]:
                if c.path == path:
                    continue
                pos = self.lookup(c.source)
                offset = pos.offset if pos is not None else 0
                if offset < c.size or c.gzip:
                    log.info("reading rotated file path=%s from_offset=%d", c.path, offset)
                    self._queue(c.path, c.source, offset)

    # -- following -----------------------------------------------------------------

    def _expand(self) -> None:
        self._globbed_at = self.now()
        paths: list[Path] = []
        for pattern in self.patterns:
            if glob.has_magic(pattern):
                paths.extend(Path(p) for p in sorted(glob.glob(pattern)))  # noqa: PTH207 - absolute
            else:
                paths.append(Path(pattern))
        self._paths = paths

    def _check(self) -> None:
        """Notice new files, renamed-away files and truncated files."""
        now = self.now()
        seen: set[tuple[int, int]] = set()
        for path in self._paths:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._warn(str(path), f"cannot read path={path} error={exc.strerror}")
                continue
            key = (st.st_dev, st.st_ino)
            seen.add(key)
            live = self._live.get(key)
            if live is None:
                if self._skip.get(key) != st.st_ctime_ns:
                    self._open(path, key)
                continue
            live.path = path
            live.gone_since = None
        for key, live in list(self._live.items()):
            if key not in seen and live.gone_since is None:
                live.gone_since = now
                log.info("file rotated away, reading it to its end path=%s", live.path)
            self._check_truncated(live)

    def _open(self, path: Path, key: tuple[int, int]) -> None:
        try:
            stream = path.open("rb", buffering=0)
        except OSError as exc:
            self._warn(str(path), f"cannot read path={path} error={exc.strerror}, retrying")
            return
        self._warned.pop(str(path), None)
        st = os.fstat(stream.fileno())
        if (st.st_dev, st.st_ino) != key:  # replaced between stat and open: next round
            stream.close()
            return
        if os.pread(stream.fileno(), 2, 0) == GZIP_MAGIC:
            self._skip[key] = st.st_ctime_ns
            stream.close()
            return
        live = _Live(path, stream, *key, parser=self._parser(), grew_at=self.now())
        self._live[key] = live
        self._identify(live)
        log.info("following path=%s offset=%d", path, live.offset)

    def _identify(self, live: _Live) -> None:
        """Give a file its fingerprint once its first line is there, and its position."""
        head = os.pread(live.stream.fileno(), FINGERPRINT_BYTES, 0)
        source = fingerprint(head)
        if source is None:
            return
        if any(o.source == source for o in self._live.values() if o is not live):
            # The same file under another matched name (a copy): read only one of them.
            self._skip[(live.dev, live.ino)] = os.fstat(live.stream.fileno()).st_ctime_ns
            del self._live[(live.dev, live.ino)]
            live.stream.close()
            return
        live.source = source
        known = self.lookup(source)
        if known is None:
            live.offset = 0
            return
        size = os.fstat(live.stream.fileno()).st_size
        live.offset = known.offset
        if known.offset > size:
            log.warning(
                "file shorter than its recorded position, reading new lines only"
                " path=%s size=%d position=%d",
                live.path,
                size,
                known.offset,
            )
            live.offset = size

    def _check_truncated(self, live: _Live) -> None:
        if live.source is None:
            return
        fd = live.stream.fileno()
        try:
            size = os.fstat(fd).st_size
            same = size >= live.offset and fingerprint(os.pread(fd, FINGERPRINT_BYTES, 0)) == (
                live.source
            )
        except OSError as exc:
            self._warn(str(live.path), f"cannot read path={live.path} error={exc.strerror}")
            return
        if same:
            return
        log.info(
            "file truncated (copytruncate), reading the rest from its copy path=%s", live.path
        )
        copy = self._find_copy(live)
        if copy is not None:
            self._queue(copy, live.source, live.offset)
        else:
            log.warning(
                "file truncated and no rotated copy found, lines after offset lost"
                " path=%s offset=%d",
                live.path,
                live.offset,
            )
        live.source = None
        live.offset = 0
        live.parser = self._parser()
        self._identify(live)

    def _find_copy(self, live: _Live) -> Path | None:
        plain: Path | None = None
        for p in family(live.path):
            source, gz = _head(p)
            if source == live.source and (plain is None or not gz):
                plain = p
        return plain

    def _read_live(self, live: _Live, out: list[Record], limit: int, now: float) -> None:
        if live.source is None:
            self._identify(live)
            if live.source is None:
                return
        stream = live.stream
        start = live.offset
        live.parser.refresh(now)
        try:
            stream.seek(start)
            for consumed, lines in read_blocks(stream, final=False):
                out.extend(live.parser.parse_all(lines))
                live.offset = start + consumed
                if len(out) >= limit:
                    break
        except OSError as exc:
            self._warn(str(live.path), f"read failed path={live.path} error={exc.strerror}")
            return
        if live.offset != start:
            live.grew_at = now
            self._moved[live.source] = Position(live.source, live.offset, name=str(live.path))

    def _queue(self, path: Path, source: str, offset: int) -> None:
        """Open a closed file now (logrotate may compress and delete it) to read it next."""
        item = _Backlog(path, source, offset)
        for _ in range(3):  # mail.log.1 may turn into mail.log.1.gz between look and open
            try:
                item.stream = open_log(item.path)
                break
            except SourceError:
                found = [p for p in family(path) if _head(p)[0] == source]
                if not found:
                    break
                item.path = found[0]
        if item.stream is None:
            log.warning("rotated file vanished, its rest is lost path=%s offset=%d", path, offset)
            return
        self._backlog.append(item)

    def _read_backlog(self, item: _Backlog, out: list[Record], limit: int) -> None:
        try:
            if item.blocks is None:
                assert item.stream is not None
                item.stream.seek(item.offset)
                mtime = os.fstat(item.stream.fileno()).st_mtime
                item.parser = LineParser(self.tz, mtime, self.syslog_names)
                item.blocks = read_blocks(
                    item.stream, final=isinstance(item.stream, gzip.GzipFile)
                )
            assert item.parser is not None
            for consumed, lines in item.blocks:
                out.extend(item.parser.parse_all(lines))
                self._moved[item.source] = Position(
                    item.source, item.offset + consumed, name=str(item.path)
                )
                if len(out) >= limit:
                    return
        except (OSError, EOFError, SourceError) as exc:
            # A compressed copy cut short, a file deleted under us: what was read counts.
            log.warning(
                "rotated file read failed, skipping its rest path=%s error=%s", item.path, exc
            )
        if item.stream is not None:
            item.stream.close()
        self._backlog.pop(0)

    def _close_rotated(self, now: float) -> None:
        for key, live in list(self._live.items()):
            if live.gone_since is None:
                continue
            if now - max(live.gone_since, live.grew_at) >= ROTATED_GRACE:
                log.info("done with rotated file path=%s offset=%d", live.path, live.offset)
                live.stream.close()
                del self._live[key]

    def _parser(self) -> LineParser:
        return LineParser(self.tz, self.now(), self.syslog_names)

    def _warn(self, key: str, message: str) -> None:
        if self._warned.get(key) != message:
            self._warned[key] = message
            log.warning("%s", message)


def _read_order(live: _Live) -> tuple[int, str]:
    return (0 if live.gone_since is not None else 1, str(live.path))


class _Watch:
    """Wake the daemon through a pipe when inotify reports a change near our files."""

    def __init__(self, patterns: list[str]) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._dirs: dict[str, list[str]] = {}
        for pattern in patterns:
            where = Path(pattern).absolute()
            self._dirs.setdefault(str(where.parent), []).append(where.name)
        self._watched: set[str] = set()
        self._observer: object | None = None
        self._failed = False
        self.retry()

    def fileno(self) -> int:
        return self._read_fd

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 4096):
                pass

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._write_fd, b"x")

    def retry(self) -> None:
        """Watch the directories not yet watched (they may exist by now)."""
        if self._failed or len(self._watched) == len(self._dirs):
            return
        try:
            from watchdog.events import FileSystemEvent, FileSystemEventHandler
            from watchdog.observers.inotify import InotifyObserver
        except ImportError as exc:
            self._give_up(f"watchdog unavailable: {exc}")
            return

        watch = self

        class Handler(FileSystemEventHandler):
            def __init__(self, names: list[str]) -> None:
                self.names = names

            def on_any_event(self, event: FileSystemEvent) -> None:
                for p in (event.src_path, getattr(event, "dest_path", "")):
                    base = Path(os.fsdecode(p)).name
                    if any(base.startswith(n) or fnmatch.fnmatch(base, n) for n in self.names):
                        watch.wake()
                        return

        try:
            if self._observer is None:
                observer = InotifyObserver()
                observer.daemon = True
                observer.start()
                self._observer = observer
            for directory, names in self._dirs.items():
                if directory in self._watched or glob.has_magic(directory):
                    continue
                if not Path(directory).is_dir():
                    continue
                self._observer.schedule(Handler(names), directory, recursive=False)  # type: ignore[attr-defined]
                self._watched.add(directory)
        except OSError as exc:
            self._give_up(f"inotify unavailable: {exc}")

    def _give_up(self, reason: str) -> None:
        log.warning("%s; polling the log files instead", reason)
        self._failed = True
        self.stop()

    @property
    def failed(self) -> bool:
        return self._failed

    def stop(self) -> None:
        observer = self._observer
        self._observer = None
        if observer is not None:
            observer.stop()  # type: ignore[attr-defined]
            observer.join(timeout=2)  # type: ignore[attr-defined]
