"""Keep the frontend's own state in a small SQLite file: used codes and rate-limit hits.

This is never the daemon's store (which the frontend only reads); a restart of the
frontend keeps both, so neither a replayed code nor a client over its limit gets a
fresh start from it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from mailtally.errors import StoreError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS used_codes (nonce TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS hits (kind TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS hits_key ON hits (kind, key, at);
"""


class State:
    """The frontend's state file; safe to share between the server's threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA busy_timeout = 5000")
            self._conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{path}: cannot open the frontend state: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def use_code(self, nonce: str, expires: float, now: float) -> bool:
        """Mark a verification code used; False if it was used before."""
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM used_codes WHERE expires < ?", (now,))
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO used_codes (nonce, expires) VALUES (?, ?)",
                (nonce, expires),
            )
            return cur.rowcount == 1

    def hit(self, kind: str, key: str, limit: int, window: float, now: float) -> bool:
        """Count one event for `key`; False (and not counted) if `limit` were passed."""
        with self._lock, self._conn:
            self._conn.execute(
                "DELETE FROM hits WHERE kind = ? AND key = ? AND at <= ?",
                (kind, key, now - window),
            )
            (count,) = self._conn.execute(
                "SELECT count(*) FROM hits WHERE kind = ? AND key = ?", (kind, key)
            ).fetchone()
            if count >= limit:
                log.warning("rate limit reached kind=%s count=%d", kind, count)
                return False
            self._conn.execute(
                "INSERT INTO hits (kind, key, at) VALUES (?, ?, ?)", (kind, key, now)
            )
            return True

    def prune(self, older_than: float) -> None:
        """Forget hits before `older_than` (any key)."""
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM hits WHERE at < ?", (older_than,))
