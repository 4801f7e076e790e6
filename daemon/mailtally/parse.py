"""Turn single Postfix log lines into typed records; never raises on bad input.

Three header forms are understood, as real relays write them:

* rsyslog traditional: ``Dec  3 09:41:40 relay1 postfix/smtpd[123]: ...``
* rsyslog RFC 3339 (``RSYSLOG_FileFormat``):
  ``2026-12-03T09:41:40.123456+00:00 relay1 postfix/smtpd[123]: ...``
* Postfix's own ``maillog_file`` (postlogd): ``Dec 03 09:41:40 relay1 postfix/smtpd[123]: ...``

Traditional stamps carry neither year nor zone: they are read in the configured zone and
the year is inferred against a reference time (see `YearGuess`).

This runs once per log line, so it avoids regular expressions and allocations on the
common paths: lines no counter needs come back as the shared `OTHER` record, and only
lines that count get their timestamp converted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import cast

log = logging.getLogger(__name__)

# A stamp this far past the reference time is taken to be from the previous year.
FUTURE_SLACK = timedelta(days=1)
# Longer lines are not Postfix logging (rsyslog's default limit is 8 KiB).
MAX_LINE = 64 * 1024
# Entries kept by the timestamp caches before they start over.
CACHE_LIMIT = 100_000

DELIVERY_AGENTS = frozenset(
    {"smtp", "lmtp", "local", "virtual", "pipe", "error", "retry", "discard"}
)
COUNTED_STATUSES = frozenset({"sent", "bounced", "deferred", "expired"})

_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_TRADITIONAL_LEN = len("Dec  3 09:41:40")
_ISO_SECONDS_LEN = len("2026-12-03T09:41:40")
_QUEUE_ID_MIN, _QUEUE_ID_MAX = 5, 20
_SHORT_ID_CHARS = "0123456789ABCDEF"
_LONG_ID_CHARS = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"

_SIZE_NRCPT = re.compile(r"size=(\d+), nrcpt=(\d+)")
_CLIENT = re.compile(r"(.*?)\[([^\]]*)\](?::\d+)?\Z")
_SASL_FAIL = re.compile(
    r"warning: (.*?)\[([^\]]*)\](?::\d+)?: SASL (\S+) authentication failed: (.*?)"
    r"(?:, sasl_username=(.*))?\Z",
    re.DOTALL,
)
_REJECT = re.compile(
    r"(reject|milter-reject): (\S+) from (.*?)\[([^\]]*)\](?::\d+)?: (.*?); (from=<.*)\Z",
    re.DOTALL,
)


@dataclass(slots=True)
class Client:
    """smtpd ``QID: client=name[addr]``: a message entered over SMTP."""

    ts: float  # seconds since the epoch
    host: str  # the relay that logged it; "host/instance" for a second Postfix instance
    service: str  # master.cf service: "smtpd", "submission", "smtp", ...
    queue_id: str
    client_name: str
    client_ip: str
    sasl_method: str | None
    sasl_username: str | None


@dataclass(slots=True)
class Pickup:
    """pickup ``QID: uid=N from=<addr>``: a message submitted with sendmail(1)."""

    ts: float
    host: str
    service: str
    queue_id: str
    uid: str
    sender: str


@dataclass(slots=True)
class Queued:
    """qmgr ``QID: from=<addr>, size=N, nrcpt=M (queue active)``; repeated on each retry."""

    ts: float
    host: str
    service: str
    queue_id: str
    sender: str
    size: int
    nrcpt: int


@dataclass(slots=True)
class Expired:
    """qmgr ``QID: from=<addr>, status=expired, returned to sender``: the message gave up."""

    ts: float
    host: str
    service: str
    queue_id: str
    sender: str


@dataclass(slots=True)
class Delivery:
    """One ``to=<rcpt>, ... status=S (text)`` line: one recipient's outcome for one attempt."""

    ts: float
    host: str
    service: str
    queue_id: str
    transport: str  # the delivery agent: "smtp", "lmtp", "local", "virtual", "pipe", ...
    recipient: str
    orig_to: str | None
    relay: str
    dsn: str
    status: str  # "sent" | "bounced" | "deferred" | "expired" | other Postfix words
    text: str  # the parenthesised reply, without the parentheses


@dataclass(slots=True)
class Notification:
    """bounce ``QID: sender non-delivery notification: NEWQID`` and its delay/DSN kin."""

    ts: float
    host: str
    service: str
    queue_id: str
    kind: str  # "sender non-delivery", "sender delay", "postmaster non-delivery", ...
    new_queue_id: str


@dataclass(slots=True)
class Removed:
    """``QID: removed``: the queue file is gone and the queue id may be reused."""

    ts: float
    host: str
    service: str
    queue_id: str


@dataclass(slots=True)
class Reject:
    """A refused SMTP command: ``NOQUEUE: reject: RCPT from ...`` or with a queue id."""

    ts: float
    host: str
    service: str
    queue_id: str | None  # None for NOQUEUE
    stage: str  # "RCPT", "MAIL", "DATA", "END-OF-MESSAGE", ...
    client_name: str
    client_ip: str
    reply: str  # "554 5.7.1 <x@y>: Relay access denied"
    sender: str | None
    recipient: str | None


@dataclass(slots=True)
class AuthFailure:
    """smtpd ``warning: name[addr]: SASL LOGIN authentication failed: reason``."""

    ts: float
    host: str
    service: str
    client_name: str
    client_ip: str
    method: str
    reason: str
    username: str | None  # Postfix 3.x appends ", sasl_username=..." when it knows one


@dataclass(frozen=True, slots=True)
class Other:
    """A Postfix line that matters to no counter (connect, anvil, TLS, warnings...)."""


@dataclass(frozen=True, slots=True)
class Foreign:
    """A well-formed syslog line from a program that is not Postfix (dovecot, cron...)."""

    program: str


@dataclass(frozen=True, slots=True)
class Unparsed:
    """A line that could not be read; `reason` is a short fixed word for metrics."""

    reason: str  # "header" | "timestamp" | "encoding" | "nul" | "length"


Record = (
    Client
    | Pickup
    | Queued
    | Expired
    | Delivery
    | Notification
    | Removed
    | Reject
    | AuthFailure
    | Other
    | Foreign
    | Unparsed
)

OTHER = Other()
_UNSEEN = object()
UNPARSED_HEADER = Unparsed("header")
UNPARSED_TIMESTAMP = Unparsed("timestamp")
UNPARSED_ENCODING = Unparsed("encoding")
UNPARSED_NUL = Unparsed("nul")
UNPARSED_LENGTH = Unparsed("length")


class YearGuess:
    """Read year-less traditional stamps in `tz`, choosing the year from a reference time.

    A stamp that would lie more than `FUTURE_SLACK` after the reference belongs to the
    previous year, so a log spanning New Year, read in January, puts December in the old
    year. For a file the reference is its modification time; for a live source, now.
    """

    def __init__(self, tz: tzinfo, reference: float) -> None:
        self.tz = tz
        self.reference = reference
        self._limit = reference + FUTURE_SLACK.total_seconds()
        self._year = datetime.fromtimestamp(reference, tz).year

    def epoch(self, stamp: str) -> float | None:
        """Return the epoch seconds of ``Mmm dd HH:MM:SS``, or None if it is no date."""
        try:
            month = _MONTHS[stamp[:3]]
            day = int(stamp[4:6])
            hour, minute, second = int(stamp[7:9]), int(stamp[10:12]), int(stamp[13:15])
        except (KeyError, ValueError):
            return None
        value = self._at(self._year, month, day, hour, minute, second)
        if value is None or value > self._limit:
            value = self._at(self._year - 1, month, day, hour, minute, second)
        return value

    def _at(
        self, year: int, month: int, day: int, hour: int, minute: int, second: int
    ) -> float | None:
        try:
            return datetime(year, month, day, hour, minute, second, tzinfo=self.tz).timestamp()
        except ValueError:  # Feb 29 in a year without one, hour 25...
            return None


# A handler turns (stamp, host, service, daemon, message) into a record.
_Handler = Callable[[str, str, str, str, str], "Record"]
# What a syslog tag tells: host suffix, service, daemon, handler.
_Names = tuple[str, str, str, _Handler]


class LineParser:
    """Parse one decoded log line at a time into a `Record`.

    `syslog_names` are the Postfix ``syslog_name`` roots to accept: ``postfix`` also
    accepts multi-instance names such as ``postfix-out`` and per-service names such as
    ``postfix/submission/smtpd``. `reference` (epoch seconds) dates year-less stamps;
    `host`, when set, replaces the host field of every line.
    """

    def __init__(
        self,
        tz: tzinfo,
        reference: float,
        syslog_names: tuple[str, ...] = ("postfix",),
        host: str | None = None,
    ) -> None:
        self.years = YearGuess(tz, reference)
        self.syslog_names = syslog_names
        self.host = host
        self._stamps: dict[str, float | None] = {}
        self._programs: dict[str, object] = {}  # tag -> names, None (foreign)
        self._handlers: dict[str, _Handler] = {
            "smtpd": self._smtpd,
            "qmgr": self._qmgr,
            "pickup": self._pickup,
            "cleanup": self._cleanup,
            "bounce": self._bounce,
            **dict.fromkeys(DELIVERY_AGENTS, self._delivery),
        }

    def parse(self, line: str) -> Record:
        """Return the record for `line` (without its newline); never raises."""
        try:
            if len(line) > MAX_LINE:
                return UNPARSED_LENGTH
            first = line[:1]
            if "A" <= first <= "Z":  # "Dec  3 09:41:40 host prog[pid]: msg"
                if line[_TRADITIONAL_LEN : _TRADITIONAL_LEN + 1] != " " or (
                    line[:3] not in _MONTHS
                ):
                    return UNPARSED_HEADER
                stamp = line[:_TRADITIONAL_LEN]
                start = _TRADITIONAL_LEN + 1
            elif "0" <= first <= "9":  # "2026-12-03T09:41:40.123456+00:00 host prog: msg"
                start = line.find(" ") + 1
                stamp = line[: start - 1]
                if stamp[4:5] != "-" or stamp[10:11] != "T":
                    return UNPARSED_HEADER
            else:
                return UNPARSED_NUL if "\x00" in line else UNPARSED_HEADER
            tag_at = line.find(" ", start) + 1
            msg_at = line.find(" ", tag_at) + 1
            if not tag_at or msg_at <= tag_at or line[msg_at - 2] != ":":
                return UNPARSED_NUL if "\x00" in line else UNPARSED_HEADER
            tag = line[tag_at : msg_at - 1]
            known = self._programs.get(tag, _UNSEEN)
            if known is _UNSEEN:
                known = self._program(tag)
            if known is None:
                return Foreign(_program_name(tag))
            suffix, service, daemon, handler = cast(_Names, known)
            host = self.host or line[start : tag_at - 1] + suffix
            return handler(stamp, host, service, daemon, line[msg_at:])
        except Exception:  # a parser bug must not stop ingestion; the line is counted
            log.exception("parser failed line=%.200r", line)
            return UNPARSED_HEADER

    def _program(self, tag: str) -> _Names | None:
        """Classify a syslog tag (``postfix/smtpd[123]:``) and cache the answer."""
        known = self._names(_program_name(tag))
        if len(self._programs) > CACHE_LIMIT:  # one entry per process id seen
            self._programs.clear()
        self._programs[tag] = known
        return known

    def _names(self, program: str) -> _Names | None:
        parts = program.split("/")
        root = parts[0]
        if len(parts) < 2 or not any(  # noqa: PLR2004 - "postfix/daemon" at least
            root == n or root.startswith(n + "-") for n in self.syslog_names
        ):
            return None
        daemon = parts[-1]
        service = parts[1] if len(parts) > 2 else daemon  # noqa: PLR2004
        # A second instance has its own queue, so its queue ids are its own.
        suffix = "" if root == self.syslog_names[0] else "/" + root
        return suffix, service, daemon, self._handlers.get(daemon, self._any)

    def timestamp(self, stamp: str) -> float | None:
        """Return epoch seconds for a header stamp, or None when it is no real date."""
        try:
            return self._stamps[stamp]
        except KeyError:
            pass
        if len(stamp) == _TRADITIONAL_LEN:
            value = self.years.epoch(stamp)
        else:
            # RFC 3339 stamps differ in their fraction on every line: cache the second.
            frac = ""
            zone = stamp[_ISO_SECONDS_LEN:]
            if zone[:1] == ".":
                end = 1
                while end < len(zone) and zone[end].isdigit():
                    end += 1
                frac, zone = zone[:end], zone[end:]
            if frac:
                whole = self.timestamp(stamp[:_ISO_SECONDS_LEN] + zone)
                return None if whole is None else whole + float(frac)
            value = self._iso(stamp)
        if len(self._stamps) > CACHE_LIMIT:
            self._stamps.clear()
        self._stamps[stamp] = value
        return value

    def _iso(self, stamp: str) -> float | None:
        try:
            parsed = datetime.fromisoformat(stamp)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=self.years.tz)
        return parsed.timestamp()

    # -- per-daemon handlers: (stamp, host, service, daemon, message) -> record --------

    def _any(self, stamp: str, host: str, service: str, daemon: str, msg: str) -> Record:
        # postsuper and any other program may remove a queue file.
        if msg[-9:] == ": removed":
            qid = msg[:-9]
            if _is_queue_id(qid):
                ts = self.timestamp(stamp)
                return UNPARSED_TIMESTAMP if ts is None else Removed(ts, host, service, qid)
        return OTHER

    def _smtpd(self, stamp: str, host: str, service: str, daemon: str, msg: str) -> Record:
        colon = msg.find(": ")
        if colon < _QUEUE_ID_MIN:
            return OTHER  # connect, disconnect, lost connection, timeout ...
        qid = msg[:colon]
        if colon <= _QUEUE_ID_MAX and _is_queue_id(qid):
            rest = msg[colon + 2 :]
            if rest[:7] == "client=":
                return self._client(stamp, host, service, qid, rest)
            if rest[:8] == "reject: " or rest[:15] == "milter-reject: ":
                return self._reject(stamp, host, service, qid, rest)
            return OTHER
        if msg[:9] == "NOQUEUE: ":
            return self._reject(stamp, host, service, None, msg[9:])
        if msg[:9] == "warning: " and "authentication failed" in msg:
            m = _SASL_FAIL.match(msg)
            if m is None:
                return OTHER
            ts = self.timestamp(stamp)
            if ts is None:
                return UNPARSED_TIMESTAMP
            name, addr, method, reason, user = m.groups()
            return AuthFailure(ts, host, service, name, addr, method, reason, user or None)
        return OTHER

    def _client(self, stamp: str, host: str, service: str, qid: str, rest: str) -> Record:
        fields = rest.split(", ")
        m = _CLIENT.match(fields[0], 7)
        if m is None:
            return OTHER
        ts = self.timestamp(stamp)
        if ts is None:
            return UNPARSED_TIMESTAMP
        method = user = None
        for field in fields[1:]:
            if field[:12] == "sasl_method=":
                method = field[12:] or None
            elif field[:14] == "sasl_username=":
                user = field[14:] or None
        return Client(ts, host, service, qid, m.group(1), m.group(2), method, user)

    def _reject(self, stamp: str, host: str, service: str, qid: str | None, rest: str) -> Record:
        m = _REJECT.match(rest)
        if m is None:
            return OTHER
        ts = self.timestamp(stamp)
        if ts is None:
            return UNPARSED_TIMESTAMP
        _, stage, name, addr, reply, envelope = m.groups()
        sender, recipient = _angle(envelope, "from=<"), _angle(envelope, "to=<")
        return Reject(ts, host, service, qid, stage, name, addr, reply, sender, recipient)

    def _qmgr(self, stamp: str, host: str, service: str, daemon: str, msg: str) -> Record:
        colon = msg.find(": ")
        qid = msg[:colon]
        if colon <= 0 or not _is_queue_id(qid):
            return OTHER
        rest = msg[colon + 2 :]
        if rest[:6] == "from=<":
            end = rest.find(">, ", 6)
            if end < 0:
                return OTHER
            sender, tail = rest[6:end], rest[end + 3 :]
            if tail[:5] == "size=":
                ts = self.timestamp(stamp)
                if ts is None:
                    return UNPARSED_TIMESTAMP
                m = _SIZE_NRCPT.match(tail)
                size, nrcpt = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
                return Queued(ts, host, service, qid, sender, size, nrcpt)
            if tail[:14] == "status=expired":
                ts = self.timestamp(stamp)
                return (
                    UNPARSED_TIMESTAMP if ts is None else Expired(ts, host, service, qid, sender)
                )
            return OTHER
        if rest == "removed":
            ts = self.timestamp(stamp)
            return UNPARSED_TIMESTAMP if ts is None else Removed(ts, host, service, qid)
        return OTHER

    def _delivery(self, stamp: str, host: str, service: str, daemon: str, msg: str) -> Record:
        colon = msg.find(": ")
        qid = msg[:colon]
        if colon <= 0 or not _is_queue_id(qid):
            return OTHER
        rest = msg[colon + 2 :]
        if rest[:3] != "to=":
            return self._any(stamp, host, service, daemon, msg)
        cut = rest.find(", status=")
        if cut < 0:
            return OTHER
        fields, tail = rest[:cut], rest[cut + 9 :]
        # The recipient may hold ", " inside a quoted local part: take it up to ">, ".
        if fields[:4] == "to=<":
            end = fields.find(">, ")
            if end < 0:
                return OTHER
            recipient, fields = fields[4:end], fields[end + 3 :]
        else:  # local(8) may log a bare address: "to=user@host, orig_to=..."
            recipient, _, fields = fields[3:].partition(", ")
        orig_to = None
        relay = dsn = ""
        for field in fields.split(", "):
            key, _, value = field.partition("=")
            if key == "relay":
                relay = value
            elif key == "dsn":
                dsn = value
            elif key == "orig_to":
                orig_to = value.strip("<>")
        status, _, text = tail.partition(" ")
        if status[-1:] == ",":  # "status=expired, returned to sender"
            status = status[:-1]
        if text[:1] == "(" and text[-1:] == ")":
            text = text[1:-1]
        ts = self.timestamp(stamp)
        if ts is None:
            return UNPARSED_TIMESTAMP
        return Delivery(
            ts, host, service, qid, daemon, recipient, orig_to, relay, dsn, status, text
        )

    def _pickup(self, stamp: str, host: str, service: str, daemon: str, msg: str) -> Record:
        colon = msg.find(": ")
        qid = msg[:colon]
        rest = msg[colon + 2 :]
        if colon <= 0 or rest[:4] != "uid=" or not _is_queue_id(qid):
            return OTHER
        uid, _, sender = rest[4:].partition(" from=<")
        ts = self.timestamp(stamp)
        if ts is None:
            return UNPARSED_TIMESTAMP
        return Pickup(ts, host, service, qid, uid, sender.removesuffix(">"))

    def _cleanup(self, stamp: str, host: str, service: str, daemon: str, msg: str) -> Record:
        colon = msg.find(": ")
        qid = msg[:colon]
        if colon <= 0 or not _is_queue_id(qid):
            return OTHER
        rest = msg[colon + 2 :]
        if rest[:8] == "reject: " or rest[:15] == "milter-reject: ":
            return self._reject(stamp, host, service, qid, rest)
        return self._any(stamp, host, service, daemon, msg)

    def _bounce(self, stamp: str, host: str, service: str, daemon: str, msg: str) -> Record:
        colon = msg.find(": ")
        qid = msg[:colon]
        rest = msg[colon + 2 :]
        if colon <= 0 or " notification: " not in rest or not _is_queue_id(qid):
            return OTHER
        kind, _, new_qid = rest.partition(" notification: ")
        ts = self.timestamp(stamp)
        if ts is None:
            return UNPARSED_TIMESTAMP
        return Notification(ts, host, service, qid, kind, new_qid)


def _program_name(tag: str) -> str:
    """Return ``postfix/smtpd`` from the tag ``postfix/smtpd[123]:``."""
    bracket = tag.find("[")
    return tag[:bracket] if bracket > 0 else tag[:-1]


def _is_queue_id(text: str) -> bool:
    """Tell a Postfix queue id: short hex ``7EE668039`` or long ``4LqTkN3Yzbz9vBq``.

    Long ids use digits and letters without vowels, so words such as ``warning`` or
    ``NOQUEUE`` are never taken for one (see Postfix's mail_queue.h).
    """
    return _QUEUE_ID_MIN <= len(text) <= _QUEUE_ID_MAX and (
        not text.strip(_SHORT_ID_CHARS) or not text.strip(_LONG_ID_CHARS)
    )


def _angle(text: str, key: str) -> str | None:
    """Return the address in ``key...>`` inside `text` (``from=<a@b>``), or None."""
    start = text.find(key)
    if start < 0:
        return None
    start += len(key)
    end = text.find(">", start)
    return text[start:end] if end >= 0 else None
