"""Follow the systemd journal: Postfix's entries become syslog lines, then parsed records.

Each entry is written out as the line rsyslog's RFC 3339 format would hold
(``2026-12-03T09:41:40.123456+00:00 relay1 postfix/smtpd[123]: message``) and goes
through the parser the files go through, so ``mailtally run`` counts what
``mailtally ingest`` counts. The position is the cursor of the last entry consumed.

python-systemd is optional and untyped: it is imported when a `JournalSource` is made,
and `_Reader` types the part of it used here.
"""

from __future__ import annotations

import importlib
import logging
import os
import select
import time
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mailtally.errors import SourceError
from mailtally.parse import LineParser
from mailtally.store import Position

if TYPE_CHECKING:
    from mailtally.config import JournalOptions
    from mailtally.parse import Record
    from mailtally.sources import PositionLookup

log = logging.getLogger(__name__)

MISSING = (
    "the journal source needs systemd-python: apt install python3-systemd, "
    "or install mailtally with the 'journal' extra"
)
MAIL_FACILITY = 2  # syslog(3) LOG_MAIL, Postfix's default syslog_facility
# Exact SYSLOG_IDENTIFIER=<syslog_name>/<program> matches, for a Postfix that logs to
# another facility than mail (sd-journal has no prefix match). Only the programs whose
# lines the parser uses: each match costs sd_journal_next() a lookup per entry, and with
# all ~35 Postfix programs next() alone ran at 220k entries/s instead of 320k.
# "submission/", "smtps/" and "relay/" are the syslog_name suffixes of Debian's master.cf.
POSTFIX_PROGRAMS = (
    *("smtpd", "submission/smtpd", "smtps/smtpd", "qmgr", "pickup", "cleanup", "bounce"),
    *("smtp", "relay/smtp", "lmtp", "local", "virtual", "pipe", "error", "retry", "discard"),
    "postsuper",
)
NO_HOST = b"localhost"  # journald always records _HOSTNAME; an imported entry may not have it
IDENT_CACHE = 1000  # identifiers remembered by the pre-filter before it starts over


# An entry's fields as python-systemd's C layer gives them: a list when one repeats.
_Fields = dict[str, bytes | list[bytes]]


class _Reader(Protocol):
    """What this module uses of ``systemd.journal.Reader`` (sd-journal(3) underneath).

    The underscore methods are python-systemd's C layer: ``_get_all()`` hands over the
    current entry's fields as bytes, where ``get_next()`` also runs each one through a
    Python converter (4.5x slower for a journald entry of 23 fields).
    """

    def fileno(self) -> int: ...
    def get_events(self) -> int: ...
    def process(self) -> int: ...
    def add_match(self, *matches: str) -> None: ...
    def add_disjunction(self) -> None: ...
    def seek_head(self) -> None: ...
    def seek_tail(self) -> None: ...
    def seek_realtime(self, realtime: float) -> None: ...
    def seek_cursor(self, cursor: str) -> None: ...
    def test_cursor(self, cursor: str) -> bool: ...
    def _next(self) -> bool: ...
    def _previous(self) -> bool: ...
    def _get_all(self) -> _Fields: ...
    def _get_realtime(self) -> int: ...
    def _get_cursor(self) -> str: ...
    def close(self) -> None: ...


def journal_missing() -> str | None:
    """Return what to install for the journal source, or None if systemd-python is there."""
    try:
        importlib.import_module("systemd.journal")
    except ImportError:
        return MISSING
    return None


def _open_reader(directory: Path | None) -> _Reader:
    """Open the local system journal, or the journal files in `directory`."""
    journal = importlib.import_module("systemd.journal")
    reader: _Reader
    if directory is None:
        reader = journal.Reader(flags=journal.LOCAL_ONLY)
    else:
        reader = journal.Reader(path=str(directory))
    return reader


class JournalSource:
    """Follow Postfix's entries in the local journal or in a directory of journal files.

    `fileno()` stays the same for the source's life (an epoll descriptor holding the
    reader's), as the reader is reopened when its directory appears or is replaced. It
    is also readable while entries wait that an earlier `read` left for lack of `limit`.
    While the directory is missing nothing wakes it: `read` retries when called.
    """

    def __init__(
        self,
        options: JournalOptions,
        lookup: PositionLookup,
        tz: tzinfo,
        syslog_names: Sequence[str] = ("postfix",),
    ) -> None:
        missing = journal_missing()
        if missing is not None:
            raise SourceError(missing)
        self.directory = options.directory
        self.start = options.start
        self.key = "journal:local" if self.directory is None else f"journal:{self.directory}"
        self.name = "local journal" if self.directory is None else str(self.directory)
        self.syslog_names = tuple(syslog_names)
        self.parser = LineParser(tz, time.time(), self.syslog_names)
        self.lines = 0  # entries handed to the parser
        self.skipped = 0  # entries the pre-filter dropped (other programs on LOG_MAIL)

        known = lookup(self.key)
        self._cursor = known.cursor if known is not None else None  # last entry consumed
        self._reported = self._cursor  # the cursor positions() last returned
        self._verify: str | None = None  # a cursor sought, not yet compared with an entry
        self._started = time.time()
        self._reader: _Reader | None = None
        self._directory_id: tuple[int, int] | None = None
        self._trouble: str | None = None  # the failure last logged, so it is logged once
        self._idents: dict[bytes, bool] = {}
        self._minute = -1
        self._prefix = b""

        self._epoll = select.epoll()
        self._more = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._more, select.EPOLLIN)
        self._pending = False
        self._open(first=True)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def read(self, limit: int) -> list[Record]:
        """Parse up to `limit` new entries (fewer records, if some are filtered out)."""
        if self._pending:
            self._pending = False
            os.eventfd_read(self._more)
        reader = self._usable_reader()
        if reader is None or limit <= 0:
            return []
        try:
            reader.process()  # takes the wake-up; sees files added, rotated or vacuumed
            lines, consumed = self._take(reader, limit)
        except OSError as exc:  # the position stays: the same entries come again
            self._fail("journal read failed, reopening", exc, logging.ERROR)
            self._close_reader()
            return []
        if self._trouble is not None:
            log.info("journal readable again name=%s", self.name)
            self._trouble = None
        if consumed == limit:
            self._wake()
        self.lines += len(lines)
        return self.parser.parse_all(lines)

    def positions(self) -> list[Position]:
        if self._cursor is None or self._cursor == self._reported:
            return []
        self._reported = self._cursor
        return [Position(self.key, 0, self._cursor, self.name)]

    def close(self) -> None:
        self._close_reader()
        if not self._epoll.closed:
            self._epoll.close()
            os.close(self._more)

    def _take(self, reader: _Reader, limit: int) -> tuple[list[str | None], int]:
        """Read up to `limit` entries; return Postfix's as lines (None: not UTF-8)."""
        lines: list[str | None] = []
        consumed = 0
        idents = self._idents
        while consumed < limit and reader._next():
            consumed += 1
            if self._verify is not None and self._seen(reader, self._verify):
                continue
            # One pass over the fields: four _get() calls, each a scan of them, took longer.
            fields = reader._get_all()
            try:
                keep = idents[fields["SYSLOG_IDENTIFIER"]]  # type: ignore[index]
            except (KeyError, TypeError):
                keep = self._keep(fields)
            if keep:
                lines.append(self._line(fields, reader._get_realtime()))
            else:
                self.skipped += 1
        if consumed:
            # After _next() finds nothing the current entry is still the last one read.
            self._cursor = reader._get_cursor()
        return lines, consumed

    def _line(self, fields: _Fields, realtime: int) -> str | None:
        """Write an entry as a syslog line; None if it is not UTF-8."""
        try:
            pid = fields.get("SYSLOG_PID") or fields.get("_PID")
            tag = fields["SYSLOG_IDENTIFIER"] + (b"[" + pid + b"]" if pid else b"")  # type: ignore[operator]
            host = fields.get("_HOSTNAME", NO_HOST)
            line = b"%s %s %s: %s" % (self._stamp(realtime), host, tag, fields.get("MESSAGE", b""))
        except TypeError:  # a field the entry holds twice comes as a list of values
            return self._line(
                {k: v[0] if isinstance(v, list) else v for k, v in fields.items()}, realtime
            )
        try:
            return line.decode()
        except UnicodeDecodeError:
            return None  # the parser counts it unparsed, as a file's undecodable line

    def _seen(self, reader: _Reader, cursor: str) -> bool:
        """Tell whether the first entry after seeking `cursor` is that entry itself.

        sd-journal seeks a cursor it no longer has (its file vacuumed) to the first
        entry at or after the cursor's place: by sequence number in a file of the same
        sequence, else by monotonic time in the same boot, else by wall-clock time.
        """
        self._verify = None
        if reader.test_cursor(cursor):
            return True
        log.warning("journal cursor not found, continuing after it cursor=%s", cursor)
        return False

    def _keep(self, fields: _Fields) -> bool:
        """Tell whether SYSLOG_IDENTIFIER is a configured Postfix name, and remember it."""
        ident = fields.get("SYSLOG_IDENTIFIER", b"")
        if isinstance(ident, list):
            ident = ident[0]
        name = ident.decode("utf-8", "replace")
        keep = any(
            name == root or name.startswith((root + "/", root + "-")) for root in self.syslog_names
        )
        if len(self._idents) >= IDENT_CACHE:
            self._idents.clear()
        self._idents[ident] = keep
        return keep

    def _stamp(self, realtime: int) -> bytes:
        """Return the RFC 3339 stamp (UTC, microseconds) of a ``__REALTIME_TIMESTAMP``."""
        seconds, micro = divmod(realtime, 1_000_000)
        minute, second = divmod(seconds, 60)
        if minute != self._minute:
            self._minute = minute
            start = datetime.fromtimestamp(minute * 60, UTC)
            self._prefix = start.strftime("%Y-%m-%dT%H:%M:").encode()
        return b"%s%02d.%06d+00:00" % (self._prefix, second, micro)

    # -- opening and reopening -----------------------------------------------------

    def _usable_reader(self) -> _Reader | None:
        """Return the reader, reopened if its directory appeared or was replaced."""
        if self._reader is not None and self._stat_directory() != self._directory_id:
            log.info("journal directory changed, reopening directory=%s", self.directory)
            self._close_reader()
        if self._reader is None:
            self._open(first=False)
        return self._reader

    def _open(self, *, first: bool) -> None:
        """Open the reader and seek where to go on; log once if it cannot be opened."""
        directory_id = self._stat_directory()
        if self.directory is not None and directory_id is None:
            self._fail("journal directory missing, waiting for it")
            return
        try:
            reader = _open_reader(self.directory)
        except OSError as exc:
            self._fail("journal unreadable, retrying", exc)
            return
        try:
            fd = reader.fileno()  # sd-journal starts watching the files here
            self._match(reader)
            self._seek(reader, first)
        except OSError as exc:
            reader.close()
            self._fail("journal unreadable, retrying", exc)
            return
        self._epoll.register(fd, reader.get_events())
        self._reader, self._directory_id = reader, directory_id
        self._wake()  # entries may be waiting already: the reader's fd only tells of new ones
        if first:
            log.info(
                "journal open name=%s start=%s cursor=%s", self.name, self.start, self._cursor
            )

    def _wake(self) -> None:
        """Keep fileno() readable until the next read(): entries may be waiting."""
        if not self._pending:
            self._pending = True
            os.eventfd_write(self._more, 1)

    def _match(self, reader: _Reader) -> None:
        """Select entries on the mail facility or from a Postfix program."""
        reader.add_match(f"SYSLOG_FACILITY={MAIL_FACILITY}")
        reader.add_disjunction()
        for root in self.syslog_names:
            reader.add_match(*(f"SYSLOG_IDENTIFIER={root}/{p}" for p in POSTFIX_PROGRAMS))

    def _seek(self, reader: _Reader, first: bool) -> None:
        if self._cursor is not None:
            try:
                reader.seek_cursor(self._cursor)
                self._verify = self._cursor
                return
            except ValueError:  # not a cursor sd-journal can read
                log.warning("journal cursor invalid, ignoring it cursor=%s", self._cursor)
                self._cursor = None
        if self.start == "oldest":
            reader.seek_head()
        elif not first:  # the journal appeared after the start: what came since is new
            reader.seek_realtime(self._started)
        else:
            # After seek_tail, sd-journal's next() returns the last entry, and goes on
            # returning only the last entry of files that appear later: stand on the
            # last entry, or at the head when there is none (everything will be new).
            reader.seek_tail()
            if reader._previous():
                self._cursor = reader._get_cursor()
            else:
                reader.seek_head()

    def _stat_directory(self) -> tuple[int, int] | None:
        if self.directory is None:
            return None
        try:
            st = self.directory.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _fail(self, event: str, exc: OSError | None = None, level: int = logging.WARNING) -> None:
        """Log a failure once, until a read succeeds again."""
        if event != self._trouble:
            self._trouble = event
            error = f" error={exc}" if exc is not None else ""
            log.log(level, "%s name=%s%s", event, self.name, error)

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._epoll.unregister(self._reader.fileno())
            self._reader.close()
            self._reader = None
