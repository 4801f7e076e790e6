"""Turn a sender's day and the limits it passed into a mail: text from templates, MIME here.

The text comes from Jinja2 templates, `<language>/<kind>.txt`, looked up in the admin's
directory first and among the packaged ones second. This module adds the headers, picks
the transfer encoding, and refuses any address that could add a header or an SMTP command.
"""

from __future__ import annotations

import email.policy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import jinja2

from mailtally.errors import ConfigError
from mailtally.notify.address import MAX_DOMAIN as MAX_DOMAIN
from mailtally.notify.address import MAX_LOCAL as MAX_LOCAL
from mailtally.notify.address import safe_address as safe_address
from mailtally.report import REPORT_COLUMNS
from mailtally.store import DayRow

log = logging.getLogger(__name__)

LANGUAGES = ("en", "zh-TW")
KINDS = ("crossing", "daily", "digest")
PACKAGED = Path(__file__).with_name("templates")

# The reference report's titles are its column names capitalised: "auth_blk" -> "Auth_blk".
TITLES = {column: column.capitalize() for column in REPORT_COLUMNS}

# policy.SMTP alone has cte_type "8bit": set_content would then send short-lined Chinese
# text as raw 8bit, which needs the server's 8BITMIME. With "7bit" it picks 7bit for
# ASCII, else quoted-printable or base64. 76 because RFC 2045 section 6.7 caps
# quoted-printable lines at 76 characters and the encoder wraps at max_line_length
# (78 by default); headers fold there too.
POLICY = email.policy.SMTP.clone(cte_type="7bit", max_line_length=76)

# RFC 5321 4.5.3.1.1 (local part, octets) and the longest DNS name in dotted text form.

# What a crossing's metric is called in running text; the template places it. The
# fullwidth brackets that RUF001 flags are the right punctuation in Chinese text.
_METRIC_NAMES = {
    "en": {
        "messages": "messages",
        "recipients": "recipients",
        "sum": "counted events (Sum)",
        "auth_blk": "blocked submissions (Auth_blk)",
        "auth_rcv": "authenticated messages (Auth_rcv)",
        "bounced": "bounced deliveries (Bounced)",
        "deferred": "deferred delivery attempts (Deferred)",
        "expired": "expired messages (Expired)",
        "sent": "delivered recipients (Sent)",
    },
    "zh-TW": {
        "messages": "寄出的信件數",
        "recipients": "收件者人數",
        "sum": "合計次數（Sum）",  # noqa: RUF001
        "auth_blk": "登入寄信遭阻擋次數（Auth_blk）",  # noqa: RUF001
        "auth_rcv": "登入後寄出的信件數（Auth_rcv）",  # noqa: RUF001
        "bounced": "退信次數（Bounced）",  # noqa: RUF001
        "deferred": "延遲遞送次數（Deferred）",  # noqa: RUF001
        "expired": "逾期退回的信件數（Expired）",  # noqa: RUF001
        "sent": "成功遞送次數（Sent）",  # noqa: RUF001
    },
}


@dataclass(frozen=True, slots=True)
class SenderDay:
    """One sender's day as a notice shows it."""

    sender: str  # the counted key: an address, or a SASL username
    day: date
    row: DayRow
    destinations: list[tuple[str, int]]  # recipient domain, delivery attempts; busiest first
    first_seen: datetime | None  # first activity that day, aware, in the configured zone


@dataclass(frozen=True, slots=True)
class Crossing:
    """A limit passed: the notice is made when the count exceeds `limit`."""

    level: str  # the rule's level name: "warn", "alert", ...
    metric: str  # "messages", "recipients", "sum" or a column ("bounced", "sent", ...)
    limit: int
    value: int  # the count when the notice was made


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who a notice is from and to, in which language; every address plain local@domain."""

    from_addr: str
    reply_to: str | None
    to: list[str]
    cc: list[str]  # admin copies, may be empty
    language: str  # "en" | "zh-TW"
    hostname: str  # the relay's name, for the text and as the Message-ID fallback


class Templates:
    """The notice templates, loaded once each: the admin's directory first, then ours.

    Each is `<language>/<kind>.txt`; its first line is `Subject: ...` and the header part
    ends at the first blank line (further lines are joined to the subject). Blocks eat
    the newline after them and the indentation before (trim_blocks, lstrip_blocks). An
    edited file shows in a new Templates, as the daemon makes on reload.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        loaders: list[jinja2.BaseLoader] = [jinja2.FileSystemLoader(PACKAGED)]
        if directory is not None:
            loaders.insert(0, jinja2.FileSystemLoader(directory))
        self._env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # plain text; nothing is HTML
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,
        )

    def check(self) -> None:
        """Load every template and render it with sample data; raise ConfigError if one fails."""
        if self.directory is not None and not self.directory.is_dir():
            raise ConfigError(f"{self.directory}: template directory not found")
        for language in LANGUAGES:
            for kind in KINDS:
                for context in _samples(kind, language):
                    self.render(kind, language, context)

    def render(self, kind: str, language: str, context: Mapping[str, Any]) -> tuple[str, str]:
        """Render one template into its subject (one line, no controls) and body.

        Raise ConfigError naming the file and line when the template is missing, does not
        parse, uses an undefined variable or lacks the `Subject:` line.
        """
        template = self._load(f"{language}/{kind}.txt")
        try:
            text = template.render(context)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as exc:
            where = _where(template.filename, _line(exc, template.filename))
            raise ConfigError(f"{where}: {exc}") from exc
        return _split(text, template.filename)

    def _load(self, name: str) -> jinja2.Template:
        try:
            return self._env.get_template(name)
        except jinja2.TemplateNotFound:
            places = [str(p) for p in (self.directory, PACKAGED) if p is not None]
            raise ConfigError(f"{name}: template not found in {' or '.join(places)}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"{_where(exc.filename, exc.lineno)}: {exc.message}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{name}: template is not UTF-8: {exc}") from exc


def compose_crossing(
    env: Envelope, day: SenderDay, crossing: Crossing, templates: Templates, now: datetime
) -> EmailMessage:
    """Compose the notice a sender gets when a count passes a limit during the day."""
    _check(env, now)
    context = {**_sender_context(env, day, now), "crossing": crossing}
    return _message(env, templates.render("crossing", env.language, context), now)


def compose_daily(
    env: Envelope,
    day: SenderDay,
    crossings: list[Crossing],
    templates: Templates,
    now: datetime,
) -> EmailMessage:
    """Compose the next-day notice: "yesterday you sent more than N messages"."""
    _check(env, now)
    if not crossings:
        raise ValueError("a daily notice needs at least one crossing")
    context = {**_sender_context(env, day, now), "crossings": crossings}
    return _message(env, templates.render("daily", env.language, context), now)


def compose_digest(
    env: Envelope,
    day: date,
    rows: list[tuple[SenderDay, list[Crossing]]],
    templates: Templates,
    now: datetime,
) -> EmailMessage:
    """Compose the admins' digest: one line per sender over a limit that day, in `rows` order."""
    _check(env, now)
    context = {**_common_context(env, now), **_digest_context(day, rows)}
    return _message(env, templates.render("digest", env.language, context), now)


def _check(env: Envelope, now: datetime) -> None:
    if env.language not in LANGUAGES:
        raise ValueError(f"unknown language {env.language!r}, expected one of {LANGUAGES}")
    if not env.to:
        raise ValueError("a notice needs at least one To address")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    fields = [("from", env.from_addr), ("reply_to", env.reply_to)]
    fields += [("to", a) for a in env.to] + [("cc", a) for a in env.cc]
    for field, address in fields:
        # repr() so that a CR/LF in the address cannot forge a log line either
        if address is not None and safe_address(address) is None:
            raise ValueError(f"unsafe {field} address {address!r}")


def _message(env: Envelope, rendered: tuple[str, str], now: datetime) -> EmailMessage:
    subject, body = rendered
    msg = EmailMessage(policy=POLICY)
    msg["From"] = env.from_addr
    msg["To"] = ", ".join(env.to)
    if env.cc:
        msg["Cc"] = ", ".join(env.cc)
    if env.reply_to:
        msg["Reply-To"] = env.reply_to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=env.from_addr.rpartition("@")[2] or env.hostname)
    # RFC 3834 section 5: responders (vacation, Sieve) must not answer auto-generated
    # mail. Exchange and Outlook look at X-Auto-Response-Suppress instead. No
    # "Precedence: bulk": it is not a standard (RFC 2076), this is one warning to one
    # person rather than bulk mail, sendmail gives bulk mail a negative class that
    # returns no bounce (we want to learn that a warning did not arrive), and list
    # software such as ezmlm-reject drops it.
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(body, charset="utf-8")
    # After set_content, which clears every Content-* header.
    msg["Content-Language"] = env.language  # RFC 3282
    return msg


def _common_context(env: Envelope, now: datetime) -> dict[str, Any]:
    return {
        "hostname": env.hostname,
        "contact": env.reply_to or env.from_addr,
        "language": env.language,
        "now": now,
        "metric_name": _metric_namer(env.language),
    }


def _sender_context(env: Envelope, day: SenderDay, now: datetime) -> dict[str, Any]:
    return {
        **_common_context(env, now),
        "sender": day.sender,
        "day": day.day,
        "yesterday": day.day == now.date() - timedelta(days=1),
        "row": day.row,
        "table": _summary_table(day.row),
        "destinations": day.destinations,
        "first_seen": day.first_seen,
    }


def _digest_context(day: date, rows: list[tuple[SenderDay, list[Crossing]]]) -> dict[str, Any]:
    return {"day": day, "rows": rows, "table": _digest_table(rows)}


def _metric_namer(language: str) -> Callable[[str], str]:
    names = _METRIC_NAMES[language]

    def metric_name(metric: str) -> str:
        return names.get(metric, metric)

    return metric_name


def _summary_table(row: DayRow) -> str:
    titles = [TITLES[c] for c in REPORT_COLUMNS]
    values = [str(getattr(row, c)) for c in REPORT_COLUMNS]
    return _align([titles, values], "r" * len(titles))


def _digest_table(rows: Sequence[tuple[SenderDay, Sequence[Crossing]]]) -> str:
    titles = ["Sender", *TITLES.values(), "First seen", "Top destination", "Limits"]
    lines = [titles]
    for day, crossings in rows:
        seen = day.first_seen.strftime("%H:%M:%S") if day.first_seen else "-"
        top = f"{day.destinations[0][0]} ({day.destinations[0][1]})" if day.destinations else "-"
        limits = ", ".join(f"{c.level} {c.metric}>{c.limit}" for c in crossings)
        counts = [str(getattr(day.row, c)) for c in REPORT_COLUMNS]
        lines.append([day.sender, *counts, seen, top, limits or "-"])
    return _align(lines, "l" + "r" * len(REPORT_COLUMNS) + "lll")


def _align(rows: Sequence[Sequence[str]], sides: str) -> str:
    """Pad cells into columns two spaces apart; `sides` says "l" or "r" for each column."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(sides))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if side == "r" else c.ljust(w)
            for c, w, side in zip(r, widths, sides, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _split(text: str, filename: str | None) -> tuple[str, str]:
    head, blank, body = text.partition("\n\n")
    if not head.startswith("Subject:") or not blank:
        raise ConfigError(f"{_where(filename, 1)}: expected 'Subject: ...' then a blank line")
    # Whatever a rendered value held (CR, LF, NUL, bidi controls), the subject stays one line.
    printable = "".join(c if c.isprintable() else " " for c in head.removeprefix("Subject:"))
    return " ".join(printable.split()), body


def _line(exc: BaseException, filename: str | None) -> int | None:
    """Find the template line in the traceback, which Jinja rewrites to show it."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if filename is not None and tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _where(filename: str | None, line: int | None) -> str:
    return f"{filename or '<template>'}:{line}" if line else filename or "<template>"


def _samples(kind: str, language: str) -> list[dict[str, Any]]:
    """Contexts that reach both branches of the packaged templates' conditions."""
    env = Envelope("postmaster@example.edu", None, ["user@example.edu"], [], language, "relay")
    busy = SenderDay(
        "user@example.edu",
        date(2024, 5, 2),
        DayRow("2024-05-02", 201, 201, 1, 400, 3, 2, 0),
        [("example.com", 399), ("example.net", 6)],
        datetime(2024, 5, 2, 9, 41, 40, tzinfo=UTC),
    )
    bare = SenderDay("user", date(2024, 5, 2), DayRow("2024-05-02"), [], None)
    crossings = [Crossing("warn", "messages", 200, 201), Crossing("block", "sum", 1000, 1001)]
    next_day = datetime(2024, 5, 3, 8, 0, tzinfo=UTC)
    later = datetime(2024, 5, 9, 8, 0, tzinfo=UTC)
    if kind == "digest":
        return [
            {**_common_context(env, next_day), **_digest_context(busy.day, rows)}
            for rows in ([(busy, crossings), (bare, crossings[:1])], [])
        ]
    extra = {"crossing": crossings[0]} if kind == "crossing" else {"crossings": crossings}
    return [
        {**_sender_context(env, day, now), **extra}
        for day, now in ((busy, next_day), (bare, later))
    ]
