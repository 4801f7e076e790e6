"""Keep counters, details, open messages and source positions in SQLite.

One writer (the daemon or `mailtally ingest`) commits each batch in one transaction, so
counters never move without the position that produced them. Readers (reports, the
frontend, the policy server) open the file read-only; WAL lets them read while it writes.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    """
    ALTER TABLE counters ADD COLUMN recipients INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE notices (
        id         INTEGER PRIMARY KEY,
        kind       TEXT NOT NULL,           -- crossing | daily | digest
        sender     TEXT NOT NULL,           -- the counted key; '' for a digest
        day        TEXT NOT NULL,           -- the day it is about (local ISO date)
        level      TEXT NOT NULL,           -- rule level ("warn"); '' for a digest
        metric     TEXT NOT NULL,           -- messages | recipients | sum | a column
        threshold  INTEGER NOT NULL,
        value      INTEGER NOT NULL,        -- the count when the notice was made
        created    REAL NOT NULL,
        state      TEXT NOT NULL DEFAULT 'pending',   -- pending | sent | failed | skipped
        attempts   INTEGER NOT NULL DEFAULT 0,
        next_try   REAL NOT NULL,
        done       REAL,                    -- when sent, failed for good or skipped
        error      TEXT,                    -- the last SMTP reply or reason
        message_id TEXT,
        UNIQUE (kind, sender, day, level, metric)   -- one notice, ever
    );
    CREATE INDEX notices_due ON notices (state, next_try);
    """,
    """
    CREATE TABLE totals (
        name  TEXT NOT NULL,                -- deliveries, messages, rejects, ...
        a     TEXT NOT NULL DEFAULT '',     -- first label (status, reason)
        b     TEXT NOT NULL DEFAULT '',     -- second label (transport)
        value INTEGER NOT NULL,
        PRIMARY KEY (name, a, b)
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE policy_counts (
        identity   TEXT NOT NULL,           -- as the policy server counts (sender, ...)
        day        TEXT NOT NULL,
        messages   INTEGER NOT NULL DEFAULT 0,   -- accepted at END-OF-MESSAGE (or DATA)
        recipients INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (identity, day)
    ) WITHOUT ROWID;
    CREATE TABLE policy_blocks (
        id         INTEGER PRIMARY KEY,
        ts         REAL NOT NULL,
        identity   TEXT NOT NULL,
        day        TEXT NOT NULL,
        stage      TEXT NOT NULL,           -- protocol_state: RCPT, END-OF-MESSAGE, ...
        level      TEXT NOT NULL,
        action     TEXT NOT NULL,
        count      INTEGER NOT NULL,        -- the count the decision saw
        client     TEXT NOT NULL,
        sender     TEXT NOT NULL,
        recipient  TEXT NOT NULL
    );
    CREATE INDEX policy_blocks_day ON policy_blocks (day, identity);
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
    recipients: int = 0  # recipients of the messages counted (qmgr nrcpt=)

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


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification, made once per (kind, sender, day, level, metric)."""

    kind: str  # crossing | daily | digest
    sender: str
    day: str
    level: str
    metric: str
    threshold: int
    value: int
    id: int = 0
    attempts: int = 0
    created: float = 0.0


class Judge(Protocol):
    """Decides, inside a batch's transaction, which notices the new counts call for."""

    def wants(self, sender: str, day: str) -> bool: ...

    def notices(self, sender: str, row: DayRow) -> list[Notice]: ...


_INSERT_NOTICE = (
    "INSERT OR IGNORE INTO notices (kind, sender, day, level, metric, threshold, value,"
    " created, next_try) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_DAY_ROW = f"SELECT day, {_COLUMN_LIST} FROM counters WHERE sender = ? AND day = ?"  # noqa: S608


class Store:
    """The SQLite store; use `open_store` or `open_reader` to get one."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    def close(self) -> None:
        self.conn.close()

    # -- writing ----------------------------------------------------------------

    def commit_batch(
        self,
        batch: Batch,
        positions: Sequence[Position],
        now: float,
        judge: Judge | None = None,
    ) -> int:
        """Write a batch and the positions it reached, all or nothing.

        With a `judge`, the notices the new counts call for are made in the same
        transaction (once each: a notice already made is left as it is). Returns how
        many notices were made.
        """
        conn = self.conn
        made = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                _UPSERT_COUNTS, [(s, d, *row) for (s, d), row in batch.counts.items()]
            )
            if judge is not None:
                for sender, day in batch.counts:
                    if judge.wants(sender, day):
                        made += self._insert_notices(
                            judge.notices(sender, self.day_row(sender, day)), now
                        )
            conn.executemany(
                _INSERT_DETAIL, [(int(d[0] // DAY_SECONDS), *d) for d in batch.details]
            )
            conn.executemany(
                "DELETE FROM open_messages WHERE host = ? AND queue_id = ?", batch.deletes
            )
            conn.executemany(_UPSERT_OPEN, batch.upserts)
            conn.executemany(
                "INSERT INTO totals (name, a, b, value) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name, a, b) DO UPDATE SET value = value + excluded.value",
                [(*key, n) for key, n in batch.totals.items()],
            )
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
        return made

    def _insert_notices(self, notices: Iterable[Notice], now: float) -> int:
        made = 0
        for n in notices:
            cur = self.conn.execute(
                _INSERT_NOTICE,
                (n.kind, n.sender, n.day, n.level, n.metric, n.threshold, n.value, now, now),
            )
            made += cur.rowcount
        return made

    # -- notices ----------------------------------------------------------------

    def add_notices(self, notices: Iterable[Notice], now: float) -> int:
        """Make the notices not made before; return how many were new."""
        try:
            with self.conn:
                return self._insert_notices(notices, now)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot add notices: {exc}") from exc

    def due_notices(self, now: float, limit: int) -> list[Notice]:
        """Pending notices whose time has come, oldest first."""
        rows = self.conn.execute(
            "SELECT kind, sender, day, level, metric, threshold, value, id, attempts, created"
            " FROM notices WHERE state = 'pending' AND next_try <= ? ORDER BY next_try, id"
            " LIMIT ?",
            (now, limit),
        )
        return [Notice(*r) for r in rows]

    def has_notice(self, kind: str, sender: str, day: str) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM notices WHERE kind = ? AND sender = ? AND day = ? LIMIT 1",
            (kind, sender, day),
        ).fetchone()
        return row is not None

    def next_notice_time(self) -> float | None:
        row = self.conn.execute(
            "SELECT min(next_try) FROM notices WHERE state = 'pending'"
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def notice_finished(
        self, notice_id: int, state: str, now: float, error: str | None, message_id: str | None
    ) -> None:
        """Record a notice as sent, failed for good, or skipped."""
        self._update(
            "UPDATE notices SET state = ?, done = ?, error = ?, message_id = ?,"
            " attempts = attempts + 1 WHERE id = ?",
            (state, now, error, message_id, notice_id),
        )

    def notice_retry(self, notice_id: int, next_try: float, error: str) -> None:
        self._update(
            "UPDATE notices SET attempts = attempts + 1, next_try = ?, error = ? WHERE id = ?",
            (next_try, error, notice_id),
        )

    def _update(self, sql: str, args: tuple[object, ...]) -> None:
        try:
            with self.conn:
                self.conn.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot update notices: {exc}") from exc

    def notices(self, kind: str | None = None) -> list[tuple[Notice, str, str | None]]:
        """Every notice (of `kind`) with its state and last error, oldest first."""
        rows = self.conn.execute(
            "SELECT kind, sender, day, level, metric, threshold, value, id, attempts, created,"
            " state, error FROM notices WHERE ? IS NULL OR kind = ? ORDER BY id",
            (kind, kind),
        )
        return [(Notice(*r[:10]), r[10], r[11]) for r in rows]

    def last_commit_time(self) -> float | None:
        """When a batch was last committed (by any run), from the positions it moved."""
        row = self.conn.execute("SELECT max(updated) FROM positions").fetchone()
        return None if row[0] is None else float(row[0])

    def totals(self) -> dict[tuple[str, str, str], int]:
        """The log-history totals every batch so far added up (for metrics)."""
        rows = self.conn.execute("SELECT name, a, b, value FROM totals")
        return {(r[0], r[1], r[2]): r[3] for r in rows}

    def notice_states(self) -> dict[str, int]:
        """How many notices are in each state (pending, sent, failed, skipped)."""
        rows = self.conn.execute("SELECT state, count(*) FROM notices GROUP BY state")
        return {r[0]: r[1] for r in rows}

    def rows_of_day(self, day: str) -> list[tuple[str, DayRow]]:
        """Every sender's row of `day`."""
        rows = self.conn.execute(
            f"SELECT sender, day, {_COLUMN_LIST} FROM counters WHERE day = ?",  # noqa: S608
            (day,),
        )
        return [(r[0], DayRow(*r[1:])) for r in rows]

    def destinations(
        self, sender: str, start: float, end: float, limit: int
    ) -> list[tuple[str, int]]:
        """The recipient domains of the sender's delivery attempts, busiest first."""
        counts: dict[str, int] = {}
        for d in self.details(sender, start, end):
            domain = d.recipient.rpartition("@")[2].lower() or d.recipient
            counts[domain] = counts.get(domain, 0) + 1
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]

    def first_seen(self, sender: str, start: float, end: float) -> float | None:
        for d in self.details(sender, start, end):
            return d.ts
        return None

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

    def day_row(self, sender: str, day: str) -> DayRow:
        """The sender's counters of one day (zeros if there are none)."""
        row = self.conn.execute(_DAY_ROW, (sender, day)).fetchone()
        return DayRow(*row) if row is not None else DayRow(day)

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
