"""Keep counters, details, open messages and source positions in SQLite.

One writer (the daemon or `mailtally ingest`) commits each batch in one transaction, so
counters never move without the position that produced them. Readers (reports, the
frontend, the policy server) open the file read-only; WAL lets them read while it writes.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mailtally.correlate import COLUMNS, Batch, OpenMessage
from mailtally.errors import StoreError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
CACHE_KIB = 16 * 1024  # holds a day's region of the details index

# Each entry moves the schema from version N to N+1; never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE counters (
        sender   TEXT NOT NULL,
        day      TEXT NOT NULL,             -- ISO local date in the configured timezone
        messages INTEGER NOT NULL DEFAULT 0,
        auth_rcv INTEGER NOT NULL DEFAULT 0,
        auth_blk INTEGER NOT NULL DEFAULT 0,
        sent     INTEGER NOT NULL DEFAULT 0,
        bounced  INTEGER NOT NULL DEFAULT 0,
        deferred INTEGER NOT NULL DEFAULT 0,
        expired  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (sender, day)
    ) WITHOUT ROWID;
    CREATE INDEX counters_day ON counters (day);
    CREATE TABLE details (
        id        INTEGER PRIMARY KEY,
        bucket    INTEGER NOT NULL,         -- UTC day number, ts // 86400
        ts        REAL NOT NULL,            -- epoch seconds
        sender    TEXT NOT NULL,
        sender_ip TEXT NOT NULL,
        relay     TEXT NOT NULL,            -- the relay host that logged it
        queue_id  TEXT NOT NULL,
        recipient TEXT NOT NULL,
        status    TEXT NOT NULL,
        response  TEXT NOT NULL
    );
    -- By day first: a batch's rows land in one small region of the index, where a
    -- (sender, ts) index would scatter them (twice the insert time, measured).
    CREATE INDEX details_bucket_sender ON details (bucket, sender);
    CREATE TABLE open_messages (
        host          TEXT NOT NULL,
        queue_id      TEXT NOT NULL,
        first_ts      REAL NOT NULL,
        client_name   TEXT NOT NULL,
        client_ip     TEXT NOT NULL,
        sasl_username TEXT,
        service       TEXT NOT NULL,
        sender        TEXT,
        flags         INTEGER NOT NULL,     -- 1 counted, 2 reinjected, 4 filtered
        removed_ts    REAL,
        pending       TEXT,                 -- JSON list of deliveries awaiting a sender
        PRIMARY KEY (host, queue_id)
    ) WITHOUT ROWID;
    CREATE TABLE positions (
        source   TEXT PRIMARY KEY,          -- "file:<fingerprint>", "journal:<dir>", ...
        offset   INTEGER NOT NULL DEFAULT 0,
        cursor   TEXT,
        name     TEXT,                      -- where it was last read, for humans
        updated  REAL NOT NULL
    );
    """,
)

# Built from the fixed column names only.
_COLUMN_LIST = ", ".join(COLUMNS)
_UPSERT_COUNTS = (
    "INSERT INTO counters (sender, day, "  # noqa: S608
    + _COLUMN_LIST
    + ") VALUES (?, ?"
    + ", ?" * len(COLUMNS)
    + ") ON CONFLICT (sender, day) DO UPDATE SET "
    + ", ".join(c + " = " + c + " + excluded." + c for c in COLUMNS)
)
_INSERT_DETAIL = (
    "INSERT INTO details (bucket, ts, sender, sender_ip, relay, queue_id, recipient, status,"
    " response) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
DAY_SECONDS = 86400
_UPSERT_OPEN = (
    "INSERT OR REPLACE INTO open_messages (host, queue_id, first_ts, client_name, client_ip,"
    " sasl_username, service, sender, flags, removed_ts, pending)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a source stopped: byte offset for files, cursor for the journal."""

    source: str
    offset: int = 0
    cursor: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class DayRow:
    """One sender's counters for one day; `sum` as the reference report adds it."""

    day: str
    messages: int = 0
    auth_rcv: int = 0
    auth_blk: int = 0
    sent: int = 0
    bounced: int = 0
    deferred: int = 0
    expired: int = 0

    @property
    def sum(self) -> int:
        return (
            self.auth_blk + self.auth_rcv + self.bounced + self.deferred + self.expired + self.sent
        )


@dataclass(frozen=True, slots=True)
class DetailRecord:
    """One delivery attempt or reject, as the report's detail table shows it."""

    ts: float
    sender_ip: str
    relay: str
    queue_id: str
    recipient: str
    status: str
    response: str


class Store:
    """The SQLite store; use `open_store` or `open_reader` to get one."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    def close(self) -> None:
        self.conn.close()

    # -- writing ----------------------------------------------------------------

    def commit_batch(self, batch: Batch, positions: Sequence[Position], now: float) -> None:
        """Write a batch and the positions it reached, all or nothing."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                _UPSERT_COUNTS, [(s, d, *row) for (s, d), row in batch.counts.items()]
            )
            conn.executemany(
                _INSERT_DETAIL, [(int(d[0] // DAY_SECONDS), *d) for d in batch.details]
            )
            conn.executemany(
                "DELETE FROM open_messages WHERE host = ? AND queue_id = ?", batch.deletes
            )
            conn.executemany(_UPSERT_OPEN, batch.upserts)
            conn.executemany(
                "INSERT INTO positions (source, offset, cursor, name, updated)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET"
                " offset = excluded.offset, cursor = excluded.cursor, name = excluded.name,"
                " updated = excluded.updated",
                [(p.source, p.offset, p.cursor, p.name, now) for p in positions],
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"{self.path}: cannot commit batch: {exc}") from exc

    def prune_details(self, before: float) -> int:
        """Delete detail rows of days wholly before `before` (epoch s); return how many."""
        try:
            with self.conn:
                cur = self.conn.execute(
                    "DELETE FROM details WHERE bucket < ?", (int(before // DAY_SECONDS),)
                )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot prune details: {exc}") from exc
        return cur.rowcount

    # -- reading ----------------------------------------------------------------

    def position(self, source: str) -> Position | None:
        row = self.conn.execute(
            "SELECT source, offset, cursor, name FROM positions WHERE source = ?", (source,)
        ).fetchone()
        return None if row is None else Position(*row)

    def open_messages(self) -> Iterator[OpenMessage]:
        """Yield the open messages persisted by earlier runs."""
        for row in self.conn.execute(
            "SELECT host, queue_id, first_ts, client_name, client_ip, sasl_username, service,"
            " sender, flags, removed_ts, pending FROM open_messages"
        ):
            yield OpenMessage.from_row(row)

    def day_rows(self, sender: str, first: str, last: str) -> dict[str, DayRow]:
        """Return the sender's stored days between the ISO dates first..last, inclusive."""
        rows = self.conn.execute(
            f"SELECT day, {', '.join(COLUMNS)} FROM counters"  # noqa: S608 - fixed names
            " WHERE sender = ? AND day BETWEEN ? AND ? ORDER BY day",
            (sender, first, last),
        )
        return {r[0]: DayRow(*r) for r in rows}

    def details(self, sender: str, start: float, end: float) -> Iterator[DetailRecord]:
        """Yield the sender's detail rows with start <= ts < end, oldest first."""
        buckets = list(range(int(start // DAY_SECONDS), int(end // DAY_SECONDS) + 1))
        marks = ", ".join("?" * len(buckets))
        for row in self.conn.execute(
            "SELECT ts, sender_ip, relay, queue_id, recipient, status, response FROM details"  # noqa: S608
            f" WHERE bucket IN ({marks}) AND sender = ? AND ts >= ? AND ts < ? ORDER BY ts, id",
            (*buckets, sender, start, end),
        ):
            yield DetailRecord(*row)

    def top(self, day: str, column: str, limit: int) -> list[tuple[str, DayRow]]:
        """Return the day's busiest senders by `column` (a COLUMNS name or "sum")."""
        order = (
            "auth_blk + auth_rcv + bounced + deferred + expired + sent"
            if column == "sum"
            else column
        )
        if column != "sum" and column not in COLUMNS:
            raise ValueError(f"unknown column {column!r}")
        rows = self.conn.execute(
            f"SELECT sender, day, {', '.join(COLUMNS)} FROM counters"  # noqa: S608
            f" WHERE day = ? ORDER BY {order} DESC, sender LIMIT ?",
            (day, limit),
        )
        return [(r[0], DayRow(*r[1:])) for r in rows]


def open_store(path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Store:
    """Open (creating and migrating as needed) the store for writing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            log.warning("store not in WAL mode path=%s mode=%s", path, mode)
        # WAL with synchronous=NORMAL survives a process crash; a power cut may lose the
        # last batches, and then their positions with them, so nothing is doubled.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        _migrate(conn, path)
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"{path}: cannot open database: {exc}") from exc
    return Store(conn, path)


def open_reader(path: Path) -> Store:
    """Open an existing store read-only (reports, frontend, policy)."""
    if not path.exists():
        raise StoreError(f"{path}: no such database (run 'mailtally ingest' first)")
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open database: {exc}") from exc
    if version != len(MIGRATIONS):
        raise StoreError(
            f"{path}: schema version {version}, this mailtally expects "
            f"{len(MIGRATIONS)} (run 'mailtally ingest' once to migrate)"
        )
    return Store(conn, path)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{path}: schema version {version} is newer than this mailtally ({len(MIGRATIONS)})"
        )
    for number in range(version, len(MIGRATIONS)):
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[number]};"
                f" PRAGMA user_version = {number + 1}; COMMIT;"
            )
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("store migrated path=%s version=%d", path, number + 1)
