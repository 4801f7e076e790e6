"""Where log lines come from: files (backfill and followed) and the systemd journal.

A live source, as `mailtally run` drives it, hands out parsed records and says where
the last record it handed out ends. The daemon feeds the records to the correlator and
commits the positions with the batch they belong to, so a crash replays lines instead
of losing or doubling them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mailtally.parse import Record
    from mailtally.store import Position

# Looks up the committed position of a source key ("file:<fingerprint>", "journal:...").
PositionLookup = Callable[[str], "Position | None"]


class LiveSource(Protocol):
    """A source the daemon follows; every method returns promptly (no blocking reads)."""

    name: str  # for log lines and STATUS, e.g. "/var/log/mail.log" or "journal"
    lines: int  # lines (journal entries) read since start, for rates and metrics

    def fileno(self) -> int | None:
        """A descriptor that turns readable when new data may be there, or None."""
        ...

    def read(self, limit: int) -> list[Record]:
        """Return up to about `limit` new records; [] when there is nothing new."""
        ...

    def positions(self) -> list[Position]:
        """Where the records returned so far end, for each key that moved since last asked."""
        ...

    def close(self) -> None: ...
