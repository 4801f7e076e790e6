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
lines that count get their timestamp converted. The most frequent records write out
their ``__init__``: mypyc (setup.py) compiles a written-out one, not the one that
``@dataclass`` generates at import time.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

log = logging.getLogger(__name__)

# A stamp this far past the reference time is taken to be from the previous year.
FUTURE_SLACK = timedelta(days=1)
REFRESH_SECONDS = 600.0  # how stale a live source's reference time may get
# Longer lines are not Postfix logging (rsyslog's default limit is 8 KiB).
MAX_LINE = 64 * 1024
# Entries kept by the timestamp caches before they start over.
CACHE_LIMIT = 100_000
# Parser failures logged with a traceback per parser; the rest are only counted.
MAX_LOGGED_FAILURES = 10

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
_ISO_MINUTE_LEN = len("2026-12-03T09:41")
_QUEUE_ID_MIN, _QUEUE_ID_MAX = 5, 20
_NOT_QUEUE_IDS = frozenset({"warning", "NOQUEUE", "error", "fatal", "panic", "info"})

_SIZE_NRCPT = re.compile(r"size=(\d+), nrcpt=(\d+)")
_SASL_FAIL = re.compile(
    r"warning: (.*?)\[([^\]]*)\](?::\d+)?: SASL (\S+) authentication failed: (.*?)"
    r"(?:, sasl_username=(.*))?\Z",
    re.DOTALL,
)
_REJECT = re.compile(
    r"(reject|milter-reject): (\S+) from (.*?)\[([^\]]*)\](?::\d+)?: (.*?); (from=<.*)\Z",
    re.DOTALL,
)


@dataclass(init=False)
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
    orig_queue_id: str | None  # set when a content filter hands the message back (XFORWARD)

    def __init__(
        self,
        ts: float,
        host: str,
        service: str,
        queue_id: str,
        client_name: str,
        client_ip: str,
        sasl_method: str | None,
        sasl_username: str | None,
        orig_queue_id: str | None = None,
    ) -> None:
        self.ts = ts
        self.host = host
        self.service = service
        self.queue_id = queue_id
        self.client_name = client_name
        self.client_ip = client_ip
        self.sasl_method = sasl_method
        self.sasl_username = sasl_username
        self.orig_queue_id = orig_queue_id


@dataclass
class Pickup:
    """pickup ``QID: uid=N from=<addr>``: a message submitted with sendmail(1)."""

    ts: float
    host: str
    service: str
    queue_id: str
    uid: str
    sender: str


@dataclass(init=False)
class Queued:
    """qmgr ``QID: from=<addr>, size=N, nrcpt=M (queue active)``; repeated on each retry."""

    ts: float
    host: str
    service: str
    queue_id: str
    sender: str
    size: int
    nrcpt: int

    def __init__(
        self, ts: float, host: str, service: str, queue_id: str, sender: str, size: int, nrcpt: int
    ) -> None:
        self.ts = ts
        self.host = host
        self.service = service
        self.queue_id = queue_id
        self.sender = sender
        self.size = size
        self.nrcpt = nrcpt


@dataclass
class Expired:
    """qmgr ``QID: from=<addr>, status=expired, returned to sender``: the message gave up."""

    ts: float
    host: str
    service: str
    queue_id: str
    sender: str


@dataclass(init=False)
class Delivery:
    """One ``to=<rcpt>, ... status=S (text)`` line: one recipient's outcome for one attempt.

    `relay`, `dsn` and `text` are read from `response` when asked for: the counters
    need only the status, and most deliveries are never looked at again.
    """

    ts: float
    host: str
    service: str
    queue_id: str
    transport: str  # the delivery agent: "smtp", "lmtp", "local", "virtual", "pipe", ...
    recipient: str
    orig_to: str | None
    status: str  # "sent" | "bounced" | "deferred" | "expired" | other Postfix words
    response: str  # the line from "relay=" on: relay, delays, dsn, status and reply

    def __init__(
        self,
        ts: float,
        host: str,
        service: str,
        queue_id: str,
        transport: str,
        recipient: str,
        orig_to: str | None,
        status: str,
        response: str,
    ) -> None:
        self.ts = ts
        self.host = host
        self.service = service
        self.queue_id = queue_id
        self.transport = transport
        self.recipient = recipient
        self.orig_to = orig_to
        self.status = status
        self.response = response

    @property
    def relay(self) -> str:
        """``mx.example[192.0.2.1]:25``, ``local``, ``none``..."""
        if not self.response.startswith("relay="):
            return ""
        end = self.response.find(", ")
        return self.response[6:end] if end >= 0 else self.response[6:]

    @property
    def dsn(self) -> str:
        """The enhanced status code, ``2.0.0``."""
        start = self.response.rfind(", dsn=", 0, self.response.find(", status="))
        return self.response[start + 6 : self.response.find(",", start + 6)] if start >= 0 else ""

    @property
    def text(self) -> str:
        """The parenthesised reply, without the parentheses."""
        status_at = self.response.find(", status=")
        space = self.response.find(" ", status_at + 9)
        text = self.response[space + 1 :] if status_at >= 0 and space >= 0 else ""
        return text[1:-1] if text.startswith("(") and text.endswith(")") else text


@dataclass
class Notification:
    """bounce ``QID: sender non-delivery notification: NEWQID`` and its delay/DSN kin."""

    ts: float
    host: str
    service: str
    queue_id: str
    kind: str  # "sender non-delivery", "sender delay", "postmaster non-delivery", ...
    new_queue_id: str


@dataclass(init=False)
class Removed:
    """``QID: removed``: the queue file is gone and the queue id may be reused."""

    ts: float
    host: str
    service: str
    queue_id: str

    def __init__(self, ts: float, host: str, service: str, queue_id: str) -> None:
        self.ts = ts
        self.host = host
        self.service = service
        self.queue_id = queue_id


@dataclass
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


@dataclass
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
        self._hours: dict[str, float | None] = {}  # "Dec  3 09" -> epoch of 09:00:00
        self._uneven: set[str] = set()  # hours whose UTC offset changes inside them

    def epoch(self, stamp: str) -> float | None:
        """Return the epoch seconds of ``Mmm dd HH:MM:SS``, or None if it is no date.

        The zone is consulted once per hour of stamps, and minutes and seconds add on,
        unless the offset changes within that hour (Lord Howe's half-hour DST): then
        each stamp of the hour is read on its own, as ``datetime`` with ``fold=0`` does.
        """
        hour_key = stamp[:9]
        try:
            base = self._hours[hour_key]
        except KeyError:
            if len(self._hours) > CACHE_LIMIT:
                self._hours.clear()
            base = self._hours[hour_key] = self._hour(hour_key)
        if base is None or stamp[9:10] != ":" or stamp[12:13] != ":":
            return None
        minute, second = stamp[10:12], stamp[13:15]
        if not (minute.isdigit() and second.isdigit()) or minute > "59" or second > "60":
            return None
        if hour_key in self._uneven:
            when = datetime.fromtimestamp(base, self.tz)
            exact = when.replace(minute=int(minute), second=min(int(second), 59), fold=0)
            return exact.timestamp() + (int(second) == 60)  # noqa: PLR2004 - leap second
        return base + int(minute) * 60 + int(second)

    def _hour(self, hour_key: str) -> float | None:
        try:
            month = _MONTHS[hour_key[:3]]
            day, hour = int(hour_key[4:6]), int(hour_key[7:9])
        except (KeyError, ValueError):
            return None
        year = self._year
        value = self._at(year, month, day, hour)
        if value is None or value > self._limit:
            year -= 1
            value = self._at(year, month, day, hour)
        if value is not None and self._at(year, month, day, hour, 59) != value + 59 * 60:
            self._uneven.add(hour_key)
        return value

    def _at(self, year: int, month: int, day: int, hour: int, minute: int = 0) -> float | None:
        try:
            return datetime(year, month, day, hour, minute, tzinfo=self.tz).timestamp()
        except ValueError:  # Feb 29 in a year without one, hour 25...
            return None


# Which handler reads a daemon's lines. Handlers scan the line in place (find and
# startswith at offsets) and slice only what they keep.
_ANY, _SMTPD, _QMGR, _DELIVERY, _PICKUP, _CLEANUP, _BOUNCE = range(7)
_KINDS = {
    "smtpd": _SMTPD,
    "qmgr": _QMGR,
    "pickup": _PICKUP,
    "cleanup": _CLEANUP,
    "bounce": _BOUNCE,
    **dict.fromkeys(DELIVERY_AGENTS, _DELIVERY),
}
# What a syslog tag tells: host suffix (second instance), service, daemon, handler kind.
_Names = tuple[str, str, str, int]


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
        self._stamps: dict[str, float | None] = {}  # traditional stamp -> epoch
        self._minutes: dict[str, float | None] = {}  # RFC 3339 minute and zone -> epoch
        self._programs: dict[str, _Names | None] = {}  # tag -> names, None if foreign
        self._failures = 0

    def refresh(self, reference: float) -> None:
        """Date year-less stamps from a new reference time (a live source: now)."""
        if abs(reference - self.years.reference) >= REFRESH_SECONDS:
            self.years = YearGuess(self.years.tz, reference)
            self._stamps.clear()

    def parse_all(self, lines: list[str | None]) -> list[Record]:
        """Parse a block of lines; None (a line that was not UTF-8) is unparsed."""
        return [self.parse(line) if line is not None else UNPARSED_ENCODING for line in lines]

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
                h = _TRADITIONAL_LEN + 1
            elif "0" <= first <= "9":  # "2026-12-03T09:41:40.123456+00:00 host prog: msg"
                h = line.find(" ") + 1
                if line[4:5] != "-" or line[10:11] != "T" or not h:
                    return UNPARSED_HEADER
            else:
                return UNPARSED_NUL if "\x00" in line else UNPARSED_HEADER
            t = line.find(" ", h) + 1
            m = line.find(" ", t) + 1
            if not t or m <= t or line[m - 2] != ":":
                return UNPARSED_NUL if "\x00" in line else UNPARSED_HEADER
            tag = line[t : m - 1]
            try:
                names = self._programs[tag]
            except KeyError:
                names = self._program(tag)
            if names is None:
                return Foreign(_program_name(tag))
            kind = names[3]
            if kind == _SMTPD:
                return self._smtpd(line, m, h, t, names)
            if kind == _DELIVERY:
                return self._delivery(line, m, h, t, names)
            if kind == _QMGR:
                return self._qmgr(line, m, h, t, names)
            if kind == _CLEANUP:
                return self._cleanup(line, m, h, t, names)
            if kind == _BOUNCE:
                return self._bounce(line, m, h, t, names)
            if kind == _PICKUP:
                return self._pickup(line, m, h, t, names)
            return self._any(line, m, h, t, names)
        except Exception:  # a parser bug must not stop ingestion; the line is counted
            self._failures += 1
            if self._failures <= MAX_LOGGED_FAILURES:
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
        return suffix, service, daemon, _KINDS.get(daemon, _ANY)

    def timestamp(self, stamp: str) -> float | None:
        """Return epoch seconds for a header stamp, or None when it is no real date."""
        if len(stamp) == _TRADITIONAL_LEN:
            try:
                return self._stamps[stamp]
            except KeyError:
                value = self.years.epoch(stamp)
        else:
            # RFC 3339 stamps differ in their fraction on every line and carry their
            # offset: cache the minute, add seconds and fraction.
            zone = stamp[_ISO_SECONDS_LEN:]
            frac = 0.0
            if zone[:1] == ".":
                end = 1
                while end < len(zone) and zone[end].isdigit():
                    end += 1
                frac, zone = float(zone[:end]), zone[end:]
            seconds = stamp[_ISO_MINUTE_LEN + 1 : _ISO_SECONDS_LEN]
            if stamp[_ISO_MINUTE_LEN : _ISO_MINUTE_LEN + 1] != ":" or not seconds.isdigit():
                return None
            minute_key = stamp[:_ISO_MINUTE_LEN] + zone
            try:
                base = self._minutes[minute_key]
            except KeyError:
                if len(self._minutes) > CACHE_LIMIT:
                    self._minutes.clear()
                base = self._iso(stamp[:_ISO_MINUTE_LEN] + ":00" + zone)
                self._minutes[minute_key] = base
            return None if base is None else base + int(seconds) + frac
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

    def _host(self, line: str, h: int, t: int, names: _Names) -> str:
        return self.host or line[h : t - 1] + names[0]

    # -- per-daemon handlers ----------------------------------------------------

    def _any(self, line: str, m: int, h: int, t: int, names: _Names) -> Record:
        """Any daemon: ``QID: removed`` (postsuper) or a ``to=<...>, status=`` line."""
        at = _queue_id_end(line, m)
        if at < 0:
            return OTHER
        if line.startswith("to=", at):
            return self._delivery(line, m, h, t, names)
        if len(line) - at == len("removed") and line.endswith("removed"):
            ts = self.timestamp(line[: h - 1])
            if ts is None:
                return UNPARSED_TIMESTAMP
            return Removed(ts, self._host(line, h, t, names), names[1], line[m : at - 2])
        return OTHER

    def _smtpd(self, line: str, m: int, h: int, t: int, names: _Names) -> Record:
        at = _queue_id_end(line, m)
        if at >= 0:
            if line.startswith("client=", at):
                return self._client(line, m, h, t, names, at)
            if line.startswith(("reject: ", "milter-reject: "), at):
                return self._reject(line, h, t, names, line[m : at - 2], at)
            return OTHER
        if line.startswith("NOQUEUE: ", m):
            return self._reject(line, h, t, names, None, m + 9)
        if line.startswith("warning: ", m) and line.find("authentication failed", m) > 0:
            match = _SASL_FAIL.match(line, m)
            if match is None:
                return OTHER
            ts = self.timestamp(line[: h - 1])
            if ts is None:
                return UNPARSED_TIMESTAMP
            name, addr, method, reason, user = match.groups()
            if user == "(unavailable)":  # Postfix did not learn the name
                user = None
            return AuthFailure(
                ts,
                self._host(line, h, t, names),
                names[1],
                name,
                addr,
                method,
                reason,
                user or None,
            )
        return OTHER

    def _client(self, line: str, m: int, h: int, t: int, names: _Names, at: int) -> Record:
        # "client=name[addr]" then, after AUTH, ", sasl_method=PLAIN, sasl_username=u"
        field_end = line.find(", ", at)
        if field_end < 0:
            field_end = len(line)
        bracket = line.rfind("[", at, field_end)
        close = line.find("]", bracket)
        if bracket < 0 or close < 0:
            return OTHER
        ts = self.timestamp(line[: h - 1])
        if ts is None:
            return UNPARSED_TIMESTAMP
        method = _field(line, ", sasl_method=", field_end)
        user = _field(line, ", sasl_username=", field_end)
        origin = _field(line, ", orig_queue_id=", field_end)
        return Client(
            ts,
            self._host(line, h, t, names),
            names[1],
            line[m : at - 2],
            line[at + 7 : bracket],
            line[bracket + 1 : close],
            method,
            user,
            origin,
        )

    def _reject(
        self, line: str, h: int, t: int, names: _Names, qid: str | None, at: int
    ) -> Record:
        match = _REJECT.match(line, at)
        if match is None:
            return OTHER
        ts = self.timestamp(line[: h - 1])
        if ts is None:
            return UNPARSED_TIMESTAMP
        _, stage, name, addr, reply, envelope = match.groups()
        sender, recipient = _angle(envelope, "from=<"), _angle(envelope, "to=<")
        host = self._host(line, h, t, names)
        return Reject(ts, host, names[1], qid, stage, name, addr, reply, sender, recipient)

    def _qmgr(self, line: str, m: int, h: int, t: int, names: _Names) -> Record:
        at = _queue_id_end(line, m)
        if at < 0:
            return OTHER
        if line.startswith("from=<", at):
            end = line.find(">, ", at + 6)
            if end < 0:
                return OTHER
            rest = end + 3
            if line.startswith("size=", rest):
                ts = self.timestamp(line[: h - 1])
                if ts is None:
                    return UNPARSED_TIMESTAMP
                match = _SIZE_NRCPT.match(line, rest)
                size, nrcpt = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
                return Queued(
                    ts,
                    self._host(line, h, t, names),
                    names[1],
                    line[m : at - 2],
                    line[at + 6 : end],
                    size,
                    nrcpt,
                )
            if line.startswith("status=expired", rest):
                ts = self.timestamp(line[: h - 1])
                if ts is None:
                    return UNPARSED_TIMESTAMP
                return Expired(
                    ts,
                    self._host(line, h, t, names),
                    names[1],
                    line[m : at - 2],
                    line[at + 6 : end],
                )
            return OTHER
        return self._any(line, m, h, t, names)

    def _delivery(self, line: str, m: int, h: int, t: int, names: _Names) -> Record:
        at = _queue_id_end(line, m)
        if at < 0:
            return OTHER
        if not line.startswith("to=", at):
            return self._any(line, m, h, t, names)
        cut = line.find(", status=", at)
        if cut < 0:
            return OTHER
        # The recipient may hold ", " inside a quoted local part: take it up to ">, ".
        if line.startswith("to=<", at):
            end = line.find(">, ", at, cut + 2)
            if end < 0:
                return OTHER
            recipient, rest = line[at + 4 : end], end + 3
        else:  # local(8) may log a bare address: "to=user@host, orig_to=..."
            end = line.find(", ", at, cut + 2)
            recipient, rest = line[at + 3 : end], end + 2
        orig_to = None
        if line.startswith("orig_to=", rest):
            end = line.find(", ", rest, cut + 2)
            orig_to = line[rest + 8 : end].strip("<>")
            rest = end + 2
        space = line.find(" ", cut + 9)
        status = line[cut + 9 : space] if space >= 0 else line[cut + 9 :]
        if status.endswith(","):  # "status=expired, returned to sender"
            status = status[:-1]
        ts = self.timestamp(line[: h - 1])
        if ts is None:
            return UNPARSED_TIMESTAMP
        return Delivery(
            ts,
            self._host(line, h, t, names),
            names[1],
            line[m : at - 2],
            names[2],
            recipient,
            orig_to,
            status,
            line[rest:],
        )

    def _pickup(self, line: str, m: int, h: int, t: int, names: _Names) -> Record:
        at = _queue_id_end(line, m)
        if at < 0 or not line.startswith("uid=", at):
            return OTHER
        uid, _, sender = line[at + 4 :].partition(" from=<")
        ts = self.timestamp(line[: h - 1])
        if ts is None:
            return UNPARSED_TIMESTAMP
        host = self._host(line, h, t, names)
        return Pickup(ts, host, names[1], line[m : at - 2], uid, sender.removesuffix(">"))

    def _cleanup(self, line: str, m: int, h: int, t: int, names: _Names) -> Record:
        at = _queue_id_end(line, m)
        if at < 0 or line.startswith("message-id=", at):
            return OTHER
        if line.startswith(("reject: ", "milter-reject: "), at):
            return self._reject(line, h, t, names, line[m : at - 2], at)
        return self._any(line, m, h, t, names)

    def _bounce(self, line: str, m: int, h: int, t: int, names: _Names) -> Record:
        at = _queue_id_end(line, m)
        if at < 0:
            return OTHER
        kind_end = line.find(" notification: ", at)
        if kind_end < 0:
            return OTHER
        ts = self.timestamp(line[: h - 1])
        if ts is None:
            return UNPARSED_TIMESTAMP
        return Notification(
            ts,
            self._host(line, h, t, names),
            names[1],
            line[m : at - 2],
            line[at:kind_end],
            line[kind_end + 15 :],
        )


def _queue_id_end(line: str, m: int) -> int:
    """Return where the text after ``QID: `` starts if the message at `m` has one, else -1."""
    colon = line.find(": ", m, m + _QUEUE_ID_MAX + 2)
    if colon - m < _QUEUE_ID_MIN or not _is_queue_id(line[m:colon]):
        return -1
    return colon + 2


def _program_name(tag: str) -> str:
    """Return ``postfix/smtpd`` from the tag ``postfix/smtpd[123]:``."""
    bracket = tag.find("[")
    return tag[:bracket] if bracket > 0 else tag[:-1]


def _is_queue_id(text: str) -> bool:
    """Tell a Postfix queue id (``7EE668039``, ``4LqTkN3Yzbz9vBq``) from a word.

    Only a few words stand where a queue id does ("warning: ", "NOQUEUE: "); any other
    word taken for a queue id is followed by no keyword a handler looks for.
    """
    return text.isalnum() and text not in _NOT_QUEUE_IDS


def _field(line: str, key: str, start: int) -> str | None:
    """Return the value after `key` (``", sasl_method="``) up to the next ", ", or None."""
    at = line.find(key, start)
    if at < 0:
        return None
    at += len(key)
    end = line.find(", ", at)
    return (line[at:end] if end >= 0 else line[at:]) or None


def _angle(text: str, key: str) -> str | None:
    """Return the address in ``key...>`` inside `text` (``from=<a@b>``), or None."""
    start = text.find(key)
    if start < 0:
        return None
    start += len(key)
    end = text.find(">", start)
    return text[start:end] if end >= 0 else None
