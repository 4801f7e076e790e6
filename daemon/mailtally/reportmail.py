"""Turn a sender's Report into the mail the query frontend sends: a text and an HTML part.

The words come from Jinja2 templates, `reportmail_templates/<language>/report.txt` (whose
first line is `Subject: ...`) and `report.html` (autoescaped); this module cleans every
value that came from the log, lays out the text tables and builds the MIME message with
notify's policy, so both parts travel 7-bit safe.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from mailtally.notify.message import POLICY, safe_address
from mailtally.report import REPORT_COLUMNS, Report

if TYPE_CHECKING:
    from mailtally.config import Config

LANGUAGES = ("en", "zh-TW")
PACKAGED = Path(__file__).with_name("reportmail_templates")

# Detail rows shown at most; a month of a busy list sender can hold tens of thousands,
# and a mail of more than a few MB is neither delivered everywhere nor readable.
MAX_DETAILS = 2000

# The reference report's titles are its column names capitalised: "auth_blk" -> "Auth_blk".
TITLES = [column.capitalize() for column in REPORT_COLUMNS]


@dataclass(frozen=True, slots=True)
class ReportRequest:
    """Who asked for a report, for which range, and where it goes."""

    address: str  # the mailbox the report goes to (already validated by the caller)
    since: date
    until: date
    client_ip: str  # who asked (the web client, or "command line")
    language: str  # "en" | "zh-TW"
    asked_at: datetime  # aware


def compose_report_mail(
    report: Report,
    request: ReportRequest,
    from_addr: str,
    reply_to: str | None,
    hostname: str,
    max_details: int = MAX_DETAILS,
) -> EmailMessage:
    """Compose the report mail: multipart/alternative, text/plain then text/html, UTF-8.

    The summary has every day of the report and a Total row; the detail section (absent
    when `report.details` is None) shows the first `max_details` rows and says how many
    were left out. Every value from the log is stripped of control characters (text and
    HTML) and escaped (HTML). Raise ValueError for an unknown language, a naive
    `asked_at`, a negative `max_details` or an address `safe_address` refuses.
    """
    _check(request, from_addr, reply_to, max_details)
    context = _context(report, request, from_addr, reply_to, hostname, max_details)
    subject, text = _split(_render(f"{request.language}/report.txt", context))
    html = _render(f"{request.language}/report.html", {**context, "subject": subject})

    msg = EmailMessage(policy=POLICY)
    msg["From"] = from_addr
    msg["To"] = request.address
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(report.tz))
    msg["Message-ID"] = make_msgid(domain=from_addr.rpartition("@")[2] or hostname)
    # RFC 3834 section 5, as notify's notices: no vacation replies to a report.
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(text, charset="utf-8")
    msg.add_alternative(html, subtype="html", charset="utf-8")
    # After set_content and add_alternative, which clear or move the Content-* headers.
    msg["Content-Language"] = request.language  # RFC 3282
    return msg


def mail_report(config: Config, report: Report, request: ReportRequest, hostname: str) -> None:
    """Compose the report mail from ``notify.from`` and send it to `request.address`.

    Send through ``notify.smtp``, once, without the outbox's retries: the person asking
    is waiting. Raise notify's TemporaryError or PermanentError when it was not accepted.
    """
    from mailtally.notify.outbox import send_mail  # outbox imports the store and thresholds

    notify = config.notify
    message = compose_report_mail(report, request, notify.from_addr, notify.reply_to, hostname)
    send_mail(config, message, [request.address])


def clean(text: str) -> str:
    """Replace each unprintable character (CR, LF, TAB, NUL, bidi controls) by a space."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else " " for c in text)


def align(header: Sequence[str], rows: Sequence[Sequence[object]], sides: str) -> str:
    """Lay out a table as text columns two spaces apart; `sides` gives "l" or "r" per column.

    Widths count East Asian wide characters as two columns, as a terminal shows them.
    The last column is not padded, so a long response does not widen every line.
    """
    table = [list(header), *([str(c) for c in row] for row in rows)]
    widths = [max(_width(r[i]) for r in table) for i in range(len(sides))]
    lines = []
    for r in table:
        cells = [
            _pad(c, w, side) for c, w, side in zip(r[:-1], widths[:-1], sides[:-1], strict=True)
        ]
        last = _pad(r[-1], widths[-1], sides[-1]) if sides[-1] == "r" else r[-1]
        lines.append("  ".join([*cells, last]).rstrip())
    return "\n".join(lines)


def _width(text: str) -> int:
    if text.isascii():
        return len(text)
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int, side: str) -> str:
    space = " " * (width - _width(text))
    return space + text if side == "r" else text + space


def _check(request: ReportRequest, from_addr: str, reply_to: str | None, max_details: int) -> None:
    if request.language not in LANGUAGES:
        raise ValueError(f"unknown language {request.language!r}, expected one of {LANGUAGES}")
    if request.asked_at.tzinfo is None:
        raise ValueError("asked_at must be timezone-aware")
    if max_details < 0:
        raise ValueError(f"max_details must be 0 or more, got {max_details}")
    for field, address in (("to", request.address), ("from", from_addr), ("reply_to", reply_to)):
        # repr() so that a CR/LF in the address cannot forge a log line either
        if address is not None and safe_address(address) is None:
            raise ValueError(f"unsafe {field} address {address!r}")


def _context(
    report: Report,
    request: ReportRequest,
    from_addr: str,
    reply_to: str | None,
    hostname: str,
    max_details: int,
) -> dict[str, Any]:
    asked = request.asked_at.astimezone(report.tz)
    context: dict[str, Any] = {
        "sender": clean(report.sender),
        "address": request.address,
        "since": report.since,
        "until": report.until,
        "days_in_range": (report.until - report.since).days + 1,
        "client_ip": clean(request.client_ip),
        "asked_at": asked.strftime("%Y-%m-%d %H:%M:%S"),
        "zone": _zone(report.tz, asked),
        "language": request.language,
        "hostname": clean(hostname),
        "contact": reply_to or from_addr,
        "titles": TITLES,
        "days": [[d.day, *(getattr(d, c) for c in REPORT_COLUMNS)] for d in report.days],
        "total": [getattr(report.total, c) for c in REPORT_COLUMNS],
        "details": None,
        "detail_count": 0,
        "omitted": 0,
        "align": align,
    }
    if report.details is not None:
        shown = report.details[:max_details]
        context["details"] = [
            [
                n,
                clean(d.sender_ip),
                clean(d.relay),
                datetime.fromtimestamp(d.ts, report.tz).strftime("%Y-%m-%d %H:%M:%S"),
                clean(d.queue_id),
                clean(d.recipient),
                clean(d.status),
                clean(d.response),
            ]
            for n, d in enumerate(shown, 1)
        ]
        context["detail_count"] = len(report.details)
        context["omitted"] = len(report.details) - len(shown)
    return context


def _zone(tz: tzinfo, moment: datetime) -> str:
    """Name the zone with its offset at `moment`: "Asia/Taipei (UTC+08:00)", or "UTC"."""
    name = clean(str(tz))
    z = moment.strftime("%z") or "+0000"  # strftime's %z gives +0800
    offset = f"UTC{z[:3]}:{z[3:5]}"
    return name if name in {"UTC", offset} else f"{name} ({offset})"


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(PACKAGED),
        # On for .html: every value the log supplied is escaped; the .txt stays plain.
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )


def _render(name: str, context: dict[str, Any]) -> str:
    return _environment().get_template(name).render(context)


def _split(text: str) -> tuple[str, str]:
    """Split a rendered .txt into its subject (one printable line) and body."""
    head, blank, body = text.partition("\n\n")
    if not head.startswith("Subject:") or not blank:
        raise ValueError("a report template must begin with 'Subject: ...' and a blank line")
    return " ".join(clean(head.removeprefix("Subject:")).split()), body
