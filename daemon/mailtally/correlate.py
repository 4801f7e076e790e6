"""Join the records of each (host, queue id) into per-sender daily counts and details.

The correlator is pure state: records go in through `feed`, and `take` hands out what
changed since the last call (counter deltas, detail rows, open-message upserts and
deletions) so the store can commit it with the source position in one transaction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo

from mailtally.parse import (
    COUNTED_STATUSES,
    OTHER,
    AuthFailure,
    Client,
    Delivery,
    Expired,
    Foreign,
    Other,
    Pickup,
    Queued,
    Record,
    Reject,
    Removed,
    Unparsed,
)

log = logging.getLogger(__name__)

# Counter columns, in the order of the delta lists; `sum` is derived, never stored.
COLUMNS = (
    "messages",
    "auth_rcv",
    "auth_blk",
    "sent",
    "bounced",
    "deferred",
    "expired",
    "recipients",
)
MESSAGES, AUTH_RCV, AUTH_BLK = 0, 1, 2
RECIPIENTS = 7  # the nrcpt of each message counted, for `count: recipients`
STATUS_COLUMN = {"sent": 3, "bounced": 4, "deferred": 5, "expired": 6}
NULL_SENDER = "<>"
# Names of the log-history totals a batch carries (metrics restore them from the store).
DELIVERIES, MESSAGES_TOTAL, MESSAGES_AUTH = "deliveries", "messages", "messages_auth"
REJECTS, SASL_FAILURES, EVICTED = "rejects", "sasl_failures", "evicted"
LOCAL_CLIENT = "local"  # sender_ip of mail submitted with sendmail(1) (pickup)

# A detail row: time (epoch s), sender key, sender_ip, relay host, queue id, recipient,
# status, response.
DetailRow = tuple[float, str, str, str, str, str, str, str]
# A delivery seen before its message's sender: (time, recipient, status, response).
PendingDelivery = tuple[float, str, str, str, str]  # ... and the delivering transport
# An open message as the store keeps it (the columns of open_messages, in order).
OpenRow = tuple[
    str, str, float, str, str, str | None, str, str | None, int, float | None, str | None
]


@dataclass(frozen=True, slots=True)
class CorrelatorSettings:
    """The knobs of correlation; see ``correlate:`` in etc/mailtally.yaml."""

    identity: str = "envelope"  # "envelope" | "sasl"
    strip_extension: bool = False  # count "alice+lists@x" as "alice@x"
    recipient_delimiter: str = "+"
    auth_services: frozenset[str] = frozenset({"submission", "submissions", "smtps"})
    max_open: int = 200_000  # open messages kept before the oldest is evicted
    max_age: float = 8 * 86400.0  # seconds of log time; Postfix gives up after 5 days
    reorder_window: float = 30.0  # seconds a removed message still takes late lines
    # After-queue content filters (amavis...): deliveries to these relays are hops, and
    # mail back from them (smtpd logs orig_queue_id=, or one of reinject_services) is
    # the same message, not a new one.
    content_filters: tuple[str, ...] = ()
    reinject_services: frozenset[str] = frozenset()


@dataclass(init=False)
class OpenMessage:
    """What is known of one queued message until Postfix removes it."""

    host: str
    queue_id: str
    first_ts: float
    client_name: str
    client_ip: str
    sasl_username: str | None
    service: str
    sender: str | None  # the counting key once qmgr logged from=
    counted: bool
    removed_ts: float | None
    pending: list[PendingDelivery] | None
    persisted: bool
    reinjected: bool  # came back from a content filter: counted when it first came in
    filtered: bool  # went to a content filter: its deliveries are hops

    # Written out so that mypyc compiles it (see parse.py): one per message.
    def __init__(
        self,
        host: str,
        queue_id: str,
        first_ts: float,
        client_name: str = "",
        client_ip: str = "",
        sasl_username: str | None = None,
        service: str = "",
        sender: str | None = None,
        counted: bool = False,
        removed_ts: float | None = None,
        pending: list[PendingDelivery] | None = None,
        persisted: bool = False,
        reinjected: bool = False,
        filtered: bool = False,
    ) -> None:
        self.host, self.queue_id, self.first_ts = host, queue_id, first_ts
        self.client_name, self.client_ip = client_name, client_ip
        self.sasl_username, self.service, self.sender = sasl_username, service, sender
        self.counted, self.removed_ts, self.pending = counted, removed_ts, pending
        self.persisted = persisted
        self.reinjected, self.filtered = reinjected, filtered

    def row(self) -> OpenRow:
        """Return a snapshot in the store's column order."""
        return (
            self.host,
            self.queue_id,
            self.first_ts,
            self.client_name,
            self.client_ip,
            self.sasl_username,
            self.service,
            self.sender,
            self.counted | self.reinjected << 1 | self.filtered << 2,
            self.removed_ts,
            json.dumps(self.pending) if self.pending else None,
        )

    @classmethod
    def from_row(cls, row: OpenRow) -> OpenMessage:
        """Rebuild a message persisted by an earlier run."""
        host, qid, first_ts, name, addr, user, service, sender, flags, removed, pending = row
        waiting = (
            [(p[0], p[1], p[2], p[3], p[4] if len(p) > 4 else "") for p in json.loads(pending)]  # noqa: PLR2004 - rows of older versions have four fields
            if pending
            else None
        )
        return cls(
            host,
            qid,
            first_ts,
            name,
            addr,
            user,
            service,
            sender,
            bool(flags & 1),
            removed,
            waiting,
            persisted=True,
            reinjected=bool(flags & 2),
            filtered=bool(flags & 4),
        )


@dataclass
class CorrelateStats:
    """Running totals for metrics and the ingest summary."""

    records: int = 0
    unparsed: dict[str, int] = field(default_factory=dict)
    foreign: int = 0
    messages: int = 0
    deliveries: int = 0
    rejects: int = 0
    auth_failures: int = 0
    evicted: int = 0
    orphan_deliveries: int = 0  # deliveries of messages whose sender was never seen
    hops: int = 0  # deliveries to a content filter, not counted
    unattributed: int = 0  # rejects/auth failures naming no sender


@dataclass
class Batch:
    """What changed since the last `Correlator.take`, ready for one store transaction."""

    counts: dict[tuple[str, str], list[int]]  # (sender, day) -> deltas in COLUMNS order
    details: list[DetailRow]
    upserts: list[OpenRow]  # snapshots: the live messages go on changing after take()
    deletes: list[tuple[str, str]]
    last_ts: float | None
    # Log-history totals for metrics: (name, label, label) -> delta; see TOTALS.
    totals: dict[tuple[str, str, str], int] = field(default_factory=dict)


REJECT_CLASSES = ("relay_denied", "rbl", "policy", "unknown_user", "other")


def reject_class(reply: str) -> int:
    """Sort a reject's reply into a REJECT_CLASSES index (Postfix's texts, as it logs them)."""
    if "Relay access denied" in reply:
        return 0
    if "blocked using" in reply or " listed " in reply:
        return 1  # reject_rbl_client and postscreen's DNSBL replies
    if "olicy" in reply:
        return 2  # check_policy_service answers, "Policy rejection"
    if "nknown user" in reply or "ser unknown" in reply or "ecipient unknown" in reply:
        return 3
    return 4


def normalise(address: str, settings: CorrelatorSettings) -> str:
    """Return the counting key of an envelope address or SASL username (lower case)."""
    if not address:
        return NULL_SENDER
    address = address.lower()
    if settings.strip_extension:
        local, at, domain = address.rpartition("@")
        if at and settings.recipient_delimiter in local:
            address = local.split(settings.recipient_delimiter, 1)[0] + at + domain
    return address


class DayOf:
    """Map epoch seconds to the ISO local date in `tz`, caching the current day's span."""

    def __init__(self, tz: tzinfo) -> None:
        self.tz = tz
        self.start = self.end = 0.0  # [start, end) of `current`, in epoch seconds
        self.current = ""

    def __call__(self, ts: float) -> str:
        if self.start <= ts < self.end:
            return self.current
        day = datetime.fromtimestamp(ts, self.tz).date()
        self.start = datetime.combine(day, time(), self.tz).timestamp()
        self.end = datetime.combine(day + timedelta(days=1), time(), self.tz).timestamp()
        self.current = day.isoformat()
        if not self.start <= ts < self.end:  # a zone whose midnight does not exist
            self.start = self.end = 0.0
        return self.current

    def span(self, first: date, last: date) -> tuple[float, float]:
        """Return [start, end) epoch seconds covering the local days first..last."""
        start = datetime.combine(first, time(), self.tz).timestamp()
        end = datetime.combine(last + timedelta(days=1), time(), self.tz).timestamp()
        return start, end


class Correlator:
    """Turn a stream of records into counter deltas and detail rows."""

    def __init__(self, tz: tzinfo, settings: CorrelatorSettings | None = None) -> None:
        self.settings = settings or CorrelatorSettings()
        self.day = DayOf(tz)
        self.stats = CorrelateStats()
        self.open: dict[tuple[str, str], OpenMessage] = {}
        self.closed: dict[tuple[str, str], OpenMessage] = {}
        self.last_ts = 0.0  # the newest log time seen, epoch seconds
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._details: list[DetailRow] = []
        self._dirty: set[tuple[str, str]] = set()
        self._gone: set[tuple[str, str]] = set()
        # Log-history totals since the last take(), for metrics (see _totals).
        self._deliveries: dict[str, list[int]] = {}  # transport -> counts by column
        self._rejects = [0] * len(REJECT_CLASSES)
        self._sasl_failures = 0
        self._evicted = 0

    def restore(self, messages: Iterable[OpenMessage]) -> None:
        """Load open messages persisted by an earlier run, oldest first."""
        for msg in sorted(messages, key=lambda m: m.first_ts):
            msg.persisted = True
            key = (msg.host, msg.queue_id)
            (self.open if msg.removed_ts is None else self.closed)[key] = msg

    def feed(self, rec: Record) -> None:
        """Account for one record."""
        self.stats.records += 1
        self._one(rec)

    def feed_all(self, records: list[Record]) -> None:
        """Account for a list of records, in order."""
        self.stats.records += len(records)
        for rec in records:
            if rec is not OTHER:
                self._one(rec)

    def _one(self, rec: Record) -> None:
        if isinstance(rec, Other):
            return
        if isinstance(rec, Foreign):
            self.stats.foreign += 1
            return
        if isinstance(rec, Unparsed):
            unparsed = self.stats.unparsed
            unparsed[rec.reason] = unparsed.get(rec.reason, 0) + 1
            return
        if rec.ts > self.last_ts:  # every other record carries its line's time
            self.last_ts = rec.ts
        # Most frequent first; an isinstance chain compiles to plain type checks.
        if isinstance(rec, Delivery):
            self._delivery(rec)
        elif isinstance(rec, Queued):
            self._queued(rec)
        elif isinstance(rec, Removed):
            self._removed(rec)
        elif isinstance(rec, Client):
            self._client(rec)
        elif isinstance(rec, Reject):
            self._reject(rec)
        elif isinstance(rec, AuthFailure):
            self._auth_failure(rec)
        elif isinstance(rec, Pickup):
            self._pickup(rec)
        elif isinstance(rec, Expired):
            self._expired(rec)
        # Notification changes no counter.

    def take(self) -> Batch:
        """Return and forget everything that changed since the last call."""
        upserts: list[OpenRow] = []
        for key in self._dirty:
            msg = self.open.get(key) or self.closed.get(key)
            if msg is not None:
                upserts.append(msg.row())
                msg.persisted = True
        batch = Batch(
            self._counts,
            self._details,
            upserts,
            list(self._gone),
            self.last_ts or None,
            self._totals(),
        )
        self._counts, self._details = {}, []
        self._dirty, self._gone = set(), set()
        return batch

    def _totals(self) -> dict[tuple[str, str, str], int]:
        """The batch's log-history totals, and start them over.

        Counted where it is cheapest: messages from the batch's counts, deliveries per
        transport in one list each, rejects per class in one list.
        """
        totals: dict[tuple[str, str, str], int] = {}
        messages = auth = 0
        for row in self._counts.values():
            messages += row[MESSAGES]
            auth += row[AUTH_RCV]
        if messages:
            totals[(MESSAGES_TOTAL, "", "")] = messages
        if auth:
            totals[(MESSAGES_AUTH, "", "")] = auth
        for transport, by_status in self._deliveries.items():
            for status, column in STATUS_COLUMN.items():
                if by_status[column]:
                    totals[(DELIVERIES, status, transport)] = by_status[column]
        for i, n in enumerate(self._rejects):
            if n:
                totals[(REJECTS, REJECT_CLASSES[i], "")] = n
        if self._sasl_failures:
            totals[(SASL_FAILURES, "", "")] = self._sasl_failures
        if self._evicted:
            totals[(EVICTED, "", "")] = self._evicted
        self._deliveries = {}
        self._rejects = [0] * len(REJECT_CLASSES)
        self._sasl_failures = self._evicted = 0
        return totals

    # -- identity ---------------------------------------------------------------

    def normalise(self, address: str) -> str:
        """Return the counting key of an envelope address or SASL username."""
        return normalise(address, self.settings)

    def _key_of(self, msg: OpenMessage, sender: str) -> str:
        if self.settings.identity == "sasl" and msg.sasl_username:
            return self.normalise(msg.sasl_username)
        return self.normalise(sender)

    # -- feeds ------------------------------------------------------------------

    def _bump(self, sender: str, ts: float, column: int, amount: int = 1) -> None:
        day = self.day
        key = (sender, day.current if day.start <= ts < day.end else day(ts))
        row = self._counts.get(key)
        if row is None:
            row = self._counts[key] = [0, 0, 0, 0, 0, 0, 0, 0]
        row[column] += amount

    def _start(self, host: str, qid: str, ts: float) -> OpenMessage:
        """Return the open message for a submission line, starting a new one if needed."""
        key = (host, qid)
        msg = self.open.get(key)
        if msg is not None and msg.counted:
            # A second submission under a live queue id: its "removed" line was lost.
            self._drop(key, msg)
            msg = None
        if msg is None:
            msg = self._new(host, qid, ts)
        self._dirty.add(key)
        return msg

    def _new(self, host: str, qid: str, ts: float) -> OpenMessage:
        """Open a message under (host, qid), replacing a removed one kept for late lines."""
        key = (host, qid)
        self._forget_closed(key)
        msg = self.open[key] = OpenMessage(host, qid, ts)
        self._bound(ts)
        return msg

    def _client(self, rec: Client) -> None:
        msg = self._start(rec.host, rec.queue_id, rec.ts)
        msg.client_name, msg.client_ip = rec.client_name, rec.client_ip
        msg.sasl_username, msg.service = rec.sasl_username, rec.service
        if rec.orig_queue_id or rec.service in self.settings.reinject_services:
            msg.reinjected = True
            origin = self._origin(rec.host, rec.orig_queue_id) if rec.orig_queue_id else None
            if origin is not None:  # report the real client, not the filter
                msg.client_name, msg.client_ip = origin.client_name, origin.client_ip
                msg.sasl_username = origin.sasl_username
                origin.filtered = True
                self._dirty.add((origin.host, origin.queue_id))

    def _origin(self, host: str, qid: str) -> OpenMessage | None:
        """Find the message a filter handed back: same instance, else the host's first."""
        return self._find((host, qid)) or self._find((host.split("/", 1)[0], qid))

    def _pickup(self, rec: Pickup) -> None:
        msg = self._start(rec.host, rec.queue_id, rec.ts)
        msg.client_name, msg.client_ip, msg.service = "pickup", LOCAL_CLIENT, rec.service

    def _queued(self, rec: Queued) -> None:
        key = (rec.host, rec.queue_id)
        msg = self.open.get(key)
        if msg is None:
            # Bounces, forwarded mail and mail queued before our log begins have no
            # smtpd/pickup line; a from= after "removed" is a new message.
            msg = self._new(rec.host, rec.queue_id, rec.ts)
        if msg.counted:
            return  # qmgr logs from= again each time a deferred message is retried
        msg.sender = self._key_of(msg, rec.sender)
        msg.counted = True
        self._dirty.add(key)
        if not msg.reinjected:
            self.stats.messages += 1
            self._bump(msg.sender, rec.ts, MESSAGES)
            if rec.nrcpt:
                self._bump(msg.sender, rec.ts, RECIPIENTS, rec.nrcpt)
            if msg.sasl_username:
                self._bump(msg.sender, rec.ts, AUTH_RCV)
        if msg.pending:
            for pending in msg.pending:
                self._count_delivery(msg, *pending)
            msg.pending = None

    def _find(self, key: tuple[str, str]) -> OpenMessage | None:
        return self.open.get(key) or self.closed.get(key)

    def _delivery(self, rec: Delivery) -> None:
        self.stats.deliveries += 1
        status = rec.status
        if status not in COUNTED_STATUSES:
            if status != "SOFTBOUNCE":
                return  # address verification probes and the like
            status = "deferred"  # soft_bounce = yes: a bounce kept in the queue
        response = rec.response
        key = (rec.host, rec.queue_id)
        msg = self._find(key)
        if (msg is not None and msg.filtered) or self._to_filter(rec.relay):
            self.stats.hops += 1
            return
        if msg is None:
            msg = self._new(rec.host, rec.queue_id, rec.ts)
        if msg.sender is None:
            # Seen before the message's from= (reordered lines, or queued before the log
            # began): keep it until the sender is known, or count it orphaned.
            if msg.pending is None:
                msg.pending = []
            msg.pending.append((rec.ts, rec.recipient, status, response, rec.service))
            self._dirty.add(key)
            return
        self._count_delivery(msg, rec.ts, rec.recipient, status, response, rec.service)

    def _to_filter(self, relay: str) -> bool:
        filters = self.settings.content_filters
        return bool(filters) and any(relay.endswith(f) for f in filters)

    def _count_delivery(
        self,
        msg: OpenMessage,
        ts: float,
        recipient: str,
        status: str,
        response: str,
        transport: str,
    ) -> None:
        assert msg.sender is not None
        column = STATUS_COLUMN[status]
        self._bump(msg.sender, ts, column)
        by_status = self._deliveries.get(transport)
        if by_status is None:
            by_status = self._deliveries[transport] = [0, 0, 0, 0, 0, 0, 0, 0]
        by_status[column] += 1
        self._details.append(
            (ts, msg.sender, msg.client_ip, msg.host, msg.queue_id, recipient, status, response)
        )

    def _expired(self, rec: Expired) -> None:
        msg = self._find((rec.host, rec.queue_id))
        sender = msg.sender if msg is not None and msg.sender else self.normalise(rec.sender)
        self._bump(sender, rec.ts, STATUS_COLUMN["expired"])
        by_status = self._deliveries.get(rec.service)
        if by_status is None:
            by_status = self._deliveries[rec.service] = [0, 0, 0, 0, 0, 0, 0, 0]
        by_status[STATUS_COLUMN["expired"]] += 1
        self._details.append(
            (
                rec.ts,
                sender,
                msg.client_ip if msg else "",
                rec.host,
                rec.queue_id,
                "",
                "expired",
                "status=expired, returned to sender",
            )
        )

    def _removed(self, rec: Removed) -> None:
        key = (rec.host, rec.queue_id)
        msg = self.open.pop(key, None)
        if msg is None:
            return
        if msg.pending:
            self.stats.orphan_deliveries += len(msg.pending)
            msg.pending = None
        msg.removed_ts = rec.ts
        self.closed[key] = msg
        self._dirty.add(key)
        self._prune_closed(rec.ts)

    def _reject(self, rec: Reject) -> None:
        self.stats.rejects += 1
        self._rejects[reject_class(rec.reply)] += 1
        msg = self.open.get((rec.host, rec.queue_id)) if rec.queue_id else None
        if rec.sender is None:
            self.stats.unattributed += 1
            return
        sender = self._key_of(msg, rec.sender) if msg else self.normalise(rec.sender)
        if rec.service in self.settings.auth_services or (msg and msg.sasl_username):
            self._bump(sender, rec.ts, AUTH_BLK)
        self._details.append(
            (
                rec.ts,
                sender,
                rec.client_ip,
                rec.host,
                rec.queue_id or "NOQUEUE",
                rec.recipient or "",
                "reject",
                rec.reply,
            )
        )

    def _auth_failure(self, rec: AuthFailure) -> None:
        self.stats.auth_failures += 1
        self._sasl_failures += 1
        if not rec.username:
            self.stats.unattributed += 1
            return
        user = self.normalise(rec.username)
        self._bump(user, rec.ts, AUTH_BLK)
        self._details.append(
            (
                rec.ts,
                user,
                rec.client_ip,
                rec.host,
                "",
                "",
                "auth-failed",
                f"SASL {rec.method} authentication failed: {rec.reason}",
            )
        )

    # -- bounds -----------------------------------------------------------------

    def _drop(self, key: tuple[str, str], msg: OpenMessage) -> None:
        del self.open[key]
        if msg.pending:
            self.stats.orphan_deliveries += len(msg.pending)
        self._dirty.discard(key)
        if msg.persisted:
            self._gone.add(key)

    def _forget_closed(self, key: tuple[str, str]) -> None:
        msg = self.closed.pop(key, None)
        if msg is not None:
            self._dirty.discard(key)
            if msg.persisted:
                self._gone.add(key)

    def _bound(self, now: float) -> None:
        """Evict the oldest open messages beyond the count bound or the age bound."""
        limit, oldest = self.settings.max_open, now - self.settings.max_age
        while self.open:
            key, msg = next(iter(self.open.items()))
            if len(self.open) <= limit and msg.first_ts >= oldest:
                break
            self._drop(key, msg)
            self.stats.evicted += 1
            self._evicted += 1
            log.debug("message evicted host=%s queue_id=%s", *key)

    def _prune_closed(self, now: float) -> None:
        oldest = now - self.settings.reorder_window
        while self.closed:
            key, msg = next(iter(self.closed.items()))
            if msg.removed_ts is not None and msg.removed_ts >= oldest:
                break
            del self.closed[key]
            self._dirty.discard(key)
            if msg.persisted:
                self._gone.add(key)
