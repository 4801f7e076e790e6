"""Turn single Postfix log lines into typed records; never raises on bad input.

Three header forms are understood, as real relays write them:

* rsyslog traditional: ``Dec  3 09:41:40 relay1 postfix/smtpd[123]: ...``
* rsyslog RFC 3339 (``RSYSLOG_FileFormat``):
  ``2026-12-03T09:41:40.123456+00:00 relay1 postfix/smtpd[123]: ...``
* Postfix's own ``maillog_file`` (postlogd): ``Dec 03 09:41:40 relay1 postfix/smtpd[123]: ...``

Traditional stamps carry neither year nor zone: they are read in the configured zone and
the year is inferred against a reference time (see `YearGuess`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

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

_HEADER = re.compile(
    r"(?:([A-Z][a-z]{2} [ 0-3]\d \d\d:\d\d:\d\d)(?:\.\d+)?"
    r"|(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?))"
    r" (\S+) ([^\s\[:]+)(?:\[\d+\])?: (.*)",
    re.DOTALL,
)
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{5,20}\Z")
_CLIENT = re.compile(r"(.*?)\[([^\]]*)\](?::\d+)?\Z")
_SASL_FAIL = re.compile(
    r"warning: (.*?)\[([^\]]*)\](?::\d+)?: SASL (\S+) authentication failed: (.*?)"
    r"(?:, sasl_username=(.*))?\Z",
    re.DOTALL,
)
_REJECT = re.compile(
    r"(reject|milter-reject): (\S+) from (.*?)\[([^\]]*)\](?::\d+)?: (.*?);"
    r" (from=<.*)\Z",
    re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class Header:
    """What every Postfix line carries: when, where and which process."""

    ts: float  # seconds since the epoch, UTC
    host: str
    instance: str  # "postfix", "postfix-out": the syslog_name's first component
    service: str  # master.cf service: "smtpd", "submission", "smtp", ...
    daemon: str  # the program: "smtpd", "qmgr", "smtp", ...


@dataclass(frozen=True, slots=True)
class Client:
    """smtpd ``QID: client=name[addr]``: a message entered over SMTP."""

    head: Header
    queue_id: str
    client_name: str
    client_ip: str
    sasl_method: str | None
    sasl_username: str | None


@dataclass(frozen=True, slots=True)
class Pickup:
    """pickup ``QID: uid=N from=<addr>``: a message submitted with sendmail(1)."""

    head: Header
    queue_id: str
    uid: str
    sender: str


@dataclass(frozen=True, slots=True)
class Queued:
    """qmgr ``QID: from=<addr>, size=N, nrcpt=M (queue active)``; repeated on each retry."""

    head: Header
    queue_id: str
    sender: str
    size: int
    nrcpt: int


@dataclass(frozen=True, slots=True)
class Expired:
    """qmgr ``QID: from=<addr>, status=expired, returned to sender``: the message gave up."""

    head: Header
    queue_id: str
    sender: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """One ``to=<rcpt>, ... status=S (text)`` line: one recipient's outcome for one attempt."""

    head: Header
    queue_id: str
    recipient: str
    orig_to: str | None
    relay: str
    dsn: str
    status: str  # "sent" | "bounced" | "deferred" | "expired" | other Postfix words
    text: str  # the parenthesised reply, without the parentheses


@dataclass(frozen=True, slots=True)
class Notification:
    """bounce ``QID: sender non-delivery notification: NEWQID`` and its delay/DSN kin."""

    head: Header
    queue_id: str
    kind: str  # "sender non-delivery", "sender delay", "postmaster non-delivery", ...
    new_queue_id: str


@dataclass(frozen=True, slots=True)
class Removed:
    """``QID: removed``: the queue file is gone and the queue id may be reused."""

    head: Header
    queue_id: str


@dataclass(frozen=True, slots=True)
class Reject:
    """A refused SMTP command: ``NOQUEUE: reject: RCPT from ...`` or with a queue id."""

    head: Header
    queue_id: str | None  # None for NOQUEUE
    stage: str  # "RCPT", "MAIL", "DATA", "END-OF-MESSAGE", ...
    client_name: str
    client_ip: str
    reply: str  # "554 5.7.1 <x@y>: Relay access denied"
    sender: str | None
    recipient: str | None


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """smtpd ``warning: name[addr]: SASL LOGIN authentication failed: reason``."""

    head: Header
    client_name: str
    client_ip: str
    method: str
    reason: str
    username: str | None  # Postfix 3.x appends ", sasl_username=..." when it knows one


@dataclass(frozen=True, slots=True)
class Other:
    """A Postfix line that matters to no counter (connect, anvil, TLS, warnings...)."""

    host: str
    daemon: str


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
        self._cache: dict[str, float] = {}

    def epoch(self, stamp: str) -> float | None:
        """Return the epoch seconds of ``Mmm dd HH:MM:SS``, or None if it is no date."""
        cached = self._cache.get(stamp)
        if cached is not None:
            return cached
        try:
            month = _MONTHS[stamp[:3]]
            day = int(stamp[4:6])
            hour, minute, second = int(stamp[7:9]), int(stamp[10:12]), int(stamp[13:15])
            value = self._at(self._year, month, day, hour, minute, second)
            if value is None or value > self._limit:
                value = self._at(self._year - 1, month, day, hour, minute, second)
        except (KeyError, ValueError):
            return None
        if value is not None:
            if len(self._cache) > CACHE_LIMIT:
                self._cache.clear()
            self._cache[stamp] = value
        return value

    def _at(
        self, year: int, month: int, day: int, hour: int, minute: int, second: int
    ) -> float | None:
        try:
            return datetime(year, month, day, hour, minute, second, tzinfo=self.tz).timestamp()
        except ValueError:  # Feb 29 in a year without one
            return None


class LineParser:
    """Parse one decoded log line at a time into a `Record`.

    `syslog_names` are the Postfix ``syslog_name`` roots to accept: ``postfix`` also
    accepts multi-instance names such as ``postfix-out`` and per-service names such as
    ``postfix/submission/smtpd``. `reference` (epoch seconds) dates year-less stamps.
    """

    def __init__(
        self,
        tz: tzinfo,
        reference: float,
        syslog_names: tuple[str, ...] = ("postfix",),
        host: str | None = None,
    ) -> None:
        self.years = YearGuess(tz, reference)
        self.host = host  # replaces every line's host field when set
        self.syslog_names = syslog_names
        self._iso_cache: dict[str, float] = {}
        self._programs: dict[str, tuple[str, str, str] | None] = {}

    def parse(self, line: str) -> Record:
        """Return the record for `line` (without its newline); never raises."""
        try:
            return self._parse(line)
        except Exception:  # a parser bug must not stop ingestion; the line is counted
            log.exception("parser failed line=%.200r", line)
            return UNPARSED_HEADER

    def _parse(self, line: str) -> Record:
        if len(line) > MAX_LINE:
            return UNPARSED_LENGTH
        m = _HEADER.match(line)
        if m is None:
            return UNPARSED_NUL if "\x00" in line else UNPARSED_HEADER
        trad, iso, host, program, msg = m.groups()
        names = self._program(program)
        if names is None:
            return Foreign(program)
        handler = _HANDLERS.get(names[2])
        if handler is None:
            return _removed_or_other(self, trad, iso, host, names, msg)
        return handler(self, trad, iso, host, names, msg)

    def _program(self, program: str) -> tuple[str, str, str] | None:
        try:
            return self._programs[program]
        except KeyError:
            pass
        parts = program.split("/")
        root = parts[0]
        names: tuple[str, str, str] | None = None
        if len(parts) >= 2 and any(  # noqa: PLR2004
            root == n or root.startswith(n + "-") for n in self.syslog_names
        ):
            daemon = parts[-1]
            service = parts[1] if len(parts) > 2 else daemon  # noqa: PLR2004
            names = (root, service, daemon)
        self._programs[program] = names
        return names

    def header(
        self, trad: str | None, iso: str | None, host: str, names: tuple[str, str, str]
    ) -> Header | None:
        """Build the `Header` of a line, or None when its stamp is no real date."""
        ts = self.years.epoch(trad) if trad is not None else self._iso(iso or "")
        if ts is None:
            return None
        return Header(ts, self.host or host, *names)

    def _iso(self, stamp: str) -> float | None:
        # Cache on everything but the fraction: consecutive lines share the second.
        base, frac, zone = stamp[:19], "", stamp[19:]
        if zone.startswith("."):
            end = 1
            while end < len(zone) and zone[end].isdigit():
                end += 1
            frac, zone = zone[:end], zone[end:]
        key = base + zone
        value = self._iso_cache.get(key)
        if value is None:
            try:
                parsed = datetime.fromisoformat(key)
            except ValueError:
                return None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=self.years.tz)
            value = parsed.timestamp()
            if len(self._iso_cache) > CACHE_LIMIT:
                self._iso_cache.clear()
            self._iso_cache[key] = value
        return value + float(frac) if frac else value


def _split_queue_id(msg: str) -> tuple[str, str] | None:
    qid, sep, rest = msg.partition(": ")
    if not sep or _QUEUE_ID.match(qid) is None:
        return None
    return qid, rest


def _removed_or_other(
    p: LineParser,
    trad: str | None,
    iso: str | None,
    host: str,
    names: tuple[str, str, str],
    msg: str,
) -> Record:
    # postsuper and any other program may remove a queue file.
    if msg.endswith(": removed"):
        split = _split_queue_id(msg)
        if split is not None and split[1] == "removed":
            head = p.header(trad, iso, host, names)
            return UNPARSED_TIMESTAMP if head is None else Removed(head, split[0])
    return Other(host, names[2])


def _smtpd(
    p: LineParser,
    trad: str | None,
    iso: str | None,
    host: str,
    names: tuple[str, str, str],
    msg: str,
) -> Record:
    if msg.startswith("warning: "):
        if "authentication failed" not in msg:
            return Other(host, names[2])
        m = _SASL_FAIL.match(msg)
        if m is None:
            return Other(host, names[2])
        head = p.header(trad, iso, host, names)
        if head is None:
            return UNPARSED_TIMESTAMP
        name, addr, method, reason, user = m.groups()
        return AuthFailure(head, name, addr, method, reason, user or None)
    split = _split_queue_id(msg)
    if split is None:
        return (
            _reject(p, trad, iso, host, names, None, msg[9:])
            if msg.startswith("NOQUEUE: ")
            else Other(host, names[2])
        )
    qid, rest = split
    if rest.startswith("client="):
        return _client(p, trad, iso, host, names, qid, rest)
    if rest.startswith(("reject: ", "milter-reject: ")):
        return _reject(p, trad, iso, host, names, qid, rest)
    return Other(host, names[2])


def _client(
    p: LineParser,
    trad: str | None,
    iso: str | None,
    host: str,
    names: tuple[str, str, str],
    qid: str,
    rest: str,
) -> Record:
    fields = rest.split(", ")
    m = _CLIENT.match(fields[0][7:])
    if m is None:
        return Other(host, names[2])
    head = p.header(trad, iso, host, names)
    if head is None:
        return UNPARSED_TIMESTAMP
    method = user = None
    for field in fields[1:]:
        if field.startswith("sasl_method="):
            method = field[12:] or None
        elif field.startswith("sasl_username="):
            user = field[14:] or None
    return Client(head, qid, m.group(1), m.group(2), method, user)


def _reject(
    p: LineParser,
    trad: str | None,
    iso: str | None,
    host: str,
    names: tuple[str, str, str],
    qid: str | None,
    rest: str,
) -> Record:
    m = _REJECT.match(rest)
    if m is None:
        return Other(host, names[2])
    head = p.header(trad, iso, host, names)
    if head is None:
        return UNPARSED_TIMESTAMP
    _, stage, name, addr, reply, envelope = m.groups()
    return Reject(
        head, qid, stage, name, addr, reply, _angle(envelope, "from=<"), _angle(envelope, "to=<")
    )


def _angle(text: str, key: str) -> str | None:
    """Return the address in ``key...>`` inside `text` (``from=<a@b>``), or None."""
    start = text.find(key)
    if start < 0:
        return None
    start += len(key)
    end = text.find(">", start)
    return text[start:end] if end >= 0 else None


def _qmgr(
    p: LineParser,
    trad: str | None,
    iso: str | None,
    host: str,
    names: tuple[str, str, str],
    msg: str,
) -> Record:
    split = _split_queue_id(msg)
    if split is None:
        return Other(host, names[2])
    qid, rest = split
    if rest.startswith("from=<"):
        end = rest.find(">, ", 6)
        if end < 0:
            return Other(host, names[2])
        sender, tail = rest[6:end], rest[end + 3 :]
        if tail.startswith("size="):
            head = p.header(trad, iso, host, names)
            if head is None:
                return UNPARSED_TIMESTAMP
            size = nrcpt = 0
            for field in tail.split(", "):
                key, _, value = field.partition("=")
                if key == "size":
                    size = _int(value)
                elif key == "nrcpt":
                    nrcpt = _int(value.partition(" ")[0])
            return Queued(head, qid, sender, size, nrcpt)
        if tail.startswith("status=expired"):
            head = p.header(trad, iso, host, names)
            return UNPARSED_TIMESTAMP if head is None else Expired(head, qid, sender)
        return Other(host, names[2])
    if rest == "removed":
        head = p.header(trad, iso, host, names)
        return UNPARSED_TIMESTAMP if head is None else Removed(head, qid)
    return Other(host, names[2])


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def _delivery(
    p: LineParser,
    trad: str | None,
    iso: str | None,
    host: str,
    names: tuple[str, str, str],
    msg: str,
) -> Record:
    split = _split_queue_id(msg)
    if split is None:
        return Other(host, names[2])
    qid, rest = split
    if not rest.startswith("to="):
        return _removed_or_other(p, trad, iso, host, names, msg)
    cut = rest.find(", status=")
    if cut < 0:
        return Other(host, names[2])
    fields, tail = rest[:cut], rest[cut + 9 :]
    # The recipient may contain ", " inside a quoted local part: take it up to ">, ".
    if fields.startswith("to=<"):
        end = fields.find(">, ")
        if end < 0:
            return Other(host, names[2])
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
    status = status.rstrip(",")
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    head = p.header(trad, iso, host, names)
    if head is None:
        return UNPARSED_TIMESTAMP
    return Delivery(head, qid, recipient, orig_to, relay, dsn, status, text)


def _pickup(
    p: LineParser,
    trad: str | None,
    iso: str | None,
    host: str,
    names: tuple[str, str, str],
    msg: str,
) -> Record:
    split = _split_queue_id(msg)
    if split is None or not split[1].startswith("uid="):
        return Other(host, names[2])
    uid, _, sender = split[1][4:].partition(" from=<")
    head = p.header(trad, iso, host, names)
    if head is None:
        return UNPARSED_TIMESTAMP
    return Pickup(head, split[0], uid, sender.removesuffix(">"))


def _cleanup(
    p: LineParser,
    trad: str | None,
    iso: str | None,
    host: str,
    names: tuple[str, str, str],
    msg: str,
) -> Record:
    split = _split_queue_id(msg)
    if split is None:
        return Other(host, names[2])
    if split[1].startswith(("reject: ", "milter-reject: ")):
        return _reject(p, trad, iso, host, names, split[0], split[1])
    return _removed_or_other(p, trad, iso, host, names, msg)


def _bounce(
    p: LineParser,
    trad: str | None,
    iso: str | None,
    host: str,
    names: tuple[str, str, str],
    msg: str,
) -> Record:
    split = _split_queue_id(msg)
    if split is None or " notification: " not in split[1]:
        return Other(host, names[2])
    kind, _, new_qid = split[1].partition(" notification: ")
    head = p.header(trad, iso, host, names)
    if head is None:
        return UNPARSED_TIMESTAMP
    return Notification(head, split[0], kind, new_qid)


_HANDLERS = {
    "smtpd": _smtpd,
    "qmgr": _qmgr,
    "pickup": _pickup,
    "cleanup": _cleanup,
    "bounce": _bounce,
    **{agent: _delivery for agent in DELIVERY_AGENTS},
}
