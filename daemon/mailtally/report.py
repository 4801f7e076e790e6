"""Build a sender's per-day summary and delivery details, and render them.

The shape follows the reference "SMTP log query" report: every day of the range is
present (zeros included), then a Total row; `sum` adds auth_blk, auth_rcv, bounced,
deferred, expired and sent. The JSON form is a contract (DESIGN.md).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from mailtally.correlate import COLUMNS, DayOf
from mailtally.store import DayRow, DetailRecord, Store

# Column order of the reference report, then our extra `messages`.
REPORT_COLUMNS = (
    "sum",
    "auth_blk",
    "auth_rcv",
    "bounced",
    "deferred",
    "expired",
    "sent",
    "messages",
)
DETAIL_COLUMNS = (
    "no",
    "time",
    "sender_ip",
    "relay",
    "queue_id",
    "recipient",
    "status",
    "response",
)
_TITLES = {
    "sum": "Sum",
    "auth_blk": "Auth_blk",
    "auth_rcv": "Auth_rcv",
    "bounced": "Bounced",
    "deferred": "Deferred",
    "expired": "Expired",
    "sent": "Sent",
    "messages": "Messages",
}


@dataclass(frozen=True, slots=True)
class Report:
    """One sender's report over since..until (local dates, inclusive)."""

    sender: str
    since: date
    until: date
    days: list[DayRow]
    total: DayRow
    details: list[DetailRecord] | None
    tz: tzinfo


def build_report(
    store: Store, sender: str, since: date, until: date, tz: tzinfo, details: bool = False
) -> Report:
    """Read the sender's counters (and details) for the range from the store."""
    stored = store.day_rows(sender, since.isoformat(), until.isoformat())
    days = []
    day = since
    while day <= until:
        key = day.isoformat()
        days.append(stored.get(key, DayRow(key)))
        day += timedelta(days=1)
    total = DayRow("Total", *(sum(getattr(d, c) for d in days) for c in COLUMNS))
    rows = None
    if details:
        start, end = DayOf(tz).span(since, until)
        rows = list(store.details(sender, start, end))
    return Report(sender, since, until, days, total, rows, tz)


def _counts(row: DayRow) -> dict[str, int]:
    return {c: getattr(row, c) for c in REPORT_COLUMNS}


def _local(ts: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(ts, tz).isoformat(timespec="seconds")


def _detail_dicts(report: Report) -> list[dict[str, Any]]:
    return [
        {
            "no": n,
            "time": _local(d.ts, report.tz),
            "sender_ip": d.sender_ip,
            "relay": d.relay,
            "queue_id": d.queue_id,
            "recipient": d.recipient,
            "status": d.status,
            "response": d.response,
        }
        for n, d in enumerate(report.details or (), 1)
    ]


def as_json(report: Report) -> str:
    """Render the DESIGN.md JSON object."""
    obj = {
        "sender": report.sender,
        "since": report.since.isoformat(),
        "until": report.until.isoformat(),
        "days": [{"date": d.day, **_counts(d)} for d in report.days],
        "total": _counts(report.total),
        "details": _detail_dicts(report),
    }
    return json.dumps(obj, ensure_ascii=False, indent=2)


def as_csv(report: Report) -> str:
    """Render the summary as CSV (a Total row last); details follow after a blank line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("date", *REPORT_COLUMNS))
    for row in (*report.days, report.total):
        writer.writerow((row.day, *_counts(row).values()))
    if report.details is not None:
        out.write("\n")
        writer.writerow(DETAIL_COLUMNS)
        for d in _detail_dicts(report):
            writer.writerow(d.values())
    return out.getvalue()


def as_table(report: Report) -> str:
    """Render the summary (and details) as aligned text for a terminal."""
    header = ("Date", *(_TITLES[c] for c in REPORT_COLUMNS))
    body = [
        (row.day, *(str(v) for v in _counts(row).values())) for row in (*report.days, report.total)
    ]
    lines = [f"Sender: {report.sender}   {report.since} .. {report.until}", ""]
    lines += _align([header, *body], right_from=1)
    if report.details is not None:
        lines += ["", f"Details: {len(report.details)} rows", ""]
        titles = (
            "No.",
            "Time",
            "Sender IP",
            "SMTP Relay",
            "ID",
            "Recipient",
            "Status",
            "Response",
        )
        rows = [tuple(str(v) for v in d.values()) for d in _detail_dicts(report)]
        lines += _align([titles, *rows], right_from=None)
    return "\n".join(lines) + "\n"


def _align(rows: list[tuple[str, ...]], right_from: int | None) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [
            c.rjust(w) if right_from is not None and i >= right_from else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def top_rows(store: Store, day: date, by: str, limit: int) -> list[dict[str, Any]]:
    """Return the day's busiest senders as dicts with the report columns."""
    return [{"sender": s, **_counts(row)} for s, row in store.top(day.isoformat(), by, limit)]


def top_as_table(day: date, by: str, rows: list[dict[str, Any]]) -> str:
    header = ("Sender", *(_TITLES[c] for c in REPORT_COLUMNS))
    body = [(r["sender"], *(str(r[c]) for c in REPORT_COLUMNS)) for r in rows]
    lines = [f"Busiest senders on {day} by {by}", ""]
    lines += _align([header, *body], right_from=1)
    return "\n".join(lines) + "\n"


def top_as_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("sender", *REPORT_COLUMNS))
    for r in rows:
        writer.writerow((r["sender"], *(r[c] for c in REPORT_COLUMNS)))
    return out.getvalue()
