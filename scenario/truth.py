"""Derive the expected per-sender daily counters from the ledger and the sink's answers.

No log line is read here. Each counter of DESIGN.md's table comes from one place:

    messages  one per `Submitted` in the ledger (smtplib got 250 after DATA, or
              sendmail(1) exited 0), plus one per distinct Message-ID the sink received
              from the null sender (bounces Postfix generated and delivered);
    auth_rcv  one per `Submitted` whose session had authenticated;
    auth_blk  one per failed AUTH exchange (key: the username tried) and one per RCPT
              refused on the submission service (key: the envelope sender);
    sent      one per recipient the sink accepted in a completed DATA;
    bounced   one per 5xx the sink gave to a RCPT;
    deferred  one per 4xx the sink gave to a RCPT (each retry is a new RCPT);
    expired   one per message whose non-delivery report from `<>` the sink received
              with a recipient in "Action: failed" and a 4.x.x status, i.e. returned
              after maximal_queue_lifetime with recipients still deferred (Postfix
              logs one `status=expired` line per message, not per recipient).

Why one sink answer is one Postfix delivery line: the sink refuses only at RCPT,
where Postfix's smtp client logs one `status=` line per recipient per attempt. A
refusal at connect, MAIL or DATA would make Postfix defer the whole site and log
"delivery temporarily suspended" for later messages without contacting the sink,
so the sink never does that.

The day of each count is the UTC date of the event that caused it: the client's
submission, the failed AUTH or reject, the sink's answer, the sink's receipt of the
bounce. `check_outcome` verifies that every recipient ended as the sink's rules say
it must, so a truth file is never written from a run that went differently.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage, Message
from email.parser import HeaderParser

from sink import Answer, Received
from traffic import Ledger, ScenarioError, Submitted

log = logging.getLogger(__name__)

COUNTERS = ("messages", "auth_rcv", "auth_blk", "sent", "bounced", "deferred", "expired")
TEMPFAIL = re.compile(r"tempfail(\d+)-")

Truth = dict[str, dict[str, dict[str, int]]]
Counts = defaultdict[str, defaultdict[str, dict[str, int]]]


@dataclass(frozen=True, slots=True)
class Report:
    """What one non-delivery report from the null sender says."""

    at: datetime
    original_message_id: str
    failed: dict[str, str]  # recipient (lower case) -> DSN Status


def sender_key(address: str) -> str:
    """Return the counter key of an envelope sender: lower case, `<>` for the null sender."""
    return address.lower() if address not in ("", "<>") else "<>"


def day(at: datetime) -> str:
    """Return the UTC date of `at` as YYYY-MM-DD."""
    return at.date().isoformat()


def parse_report(received: Received) -> Report | None:
    """Read a bounce's delivery-status and returned headers; None if it is no DSN."""
    failed: dict[str, str] = {}
    original = ""
    for part in received.message.walk():
        kind = part.get_content_type()
        if kind == "message/delivery-status":
            for block in part.get_payload():
                assert isinstance(block, Message)
                rcpt = str(block.get("Final-Recipient", "")).partition(";")[2].strip()
                if rcpt and str(block.get("Action", "")).strip() == "failed":
                    failed[rcpt.lower()] = str(block.get("Status", "")).strip()
        elif kind == "message/rfc822":
            inner = part.get_payload(0)
            assert isinstance(inner, Message)
            original = str(inner.get("Message-ID", ""))
        elif kind == "text/rfc822-headers":
            assert isinstance(part, EmailMessage)
            original = str(HeaderParser().parsestr(part.get_content()).get("Message-ID", ""))
    if not failed:
        return None
    return Report(received.at, original.strip(), failed)


def new_counts() -> Counts:
    """Return an empty {sender: {day: {counter: 0}}} that fills itself in on access."""
    return defaultdict(lambda: defaultdict(lambda: dict.fromkeys(COUNTERS, 0)))


def count_ledger(counts: Counts, ledger: Ledger) -> None:
    """Add messages, auth_rcv and auth_blk: what the clients did."""
    for s in ledger.submitted:
        row = counts[sender_key(s.sender)][day(s.at)]
        row["messages"] += 1
        row["auth_rcv"] += s.sasl_username is not None
    for b in ledger.blocked:
        counts[sender_key(b.key)][day(b.at)]["auth_blk"] += 1
    for f in ledger.refused:
        # A refused sender is listed with zeros (unless it has counts of its own that day).
        counts[sender_key(f.sender)].setdefault(day(f.at), dict.fromkeys(COUNTERS, 0))


def count_answers(counts: Counts, answers: list[Answer]) -> None:
    """Add sent, bounced and deferred: one per answer the sink gave."""
    for a in answers:
        row = counts[sender_key(a.mail_from)][day(a.at)]
        if a.phase == "data":
            row["sent"] += 1
        elif a.code >= 500:
            row["bounced"] += 1
        elif a.code >= 400:
            row["deferred"] += 1


def count_bounces(counts: Counts, ledger: Ledger, received: list[Received]) -> None:
    """Add the null sender's messages and the originals' expired, from the bounces."""
    by_id = {s.message_id: s for s in ledger.submitted}
    seen: set[str] = set()
    for r in received:
        if sender_key(r.mail_from) != "<>":
            continue
        message_id = str(r.message.get("Message-ID", ""))
        if message_id not in seen:
            seen.add(message_id)
            counts["<>"][day(r.at)]["messages"] += 1
        report = parse_report(r)
        if report and any(status.startswith("4.") for status in report.failed.values()):
            original = by_id[report.original_message_id]
            counts[sender_key(original.sender)][day(r.at)]["expired"] += 1


def derive(ledger: Ledger, answers: list[Answer], received: list[Received]) -> Truth:
    """Return {sender: {day: {counter: n}}} for everything the run did, sorted."""
    counts = new_counts()
    count_ledger(counts, ledger)
    count_answers(counts, answers)
    count_bounces(counts, ledger, received)
    return {
        sender: {d: dict(row) for d, row in sorted(days.items())}
        for sender, days in sorted(counts.items())
    }


def check_outcome(
    ledger: Ledger, answers: list[Answer], received: list[Received], expiry: bool
) -> None:
    """Raise ScenarioError unless every recipient ended as the sink's rules say."""
    problems: list[str] = []
    reports = [
        rep for r in received if sender_key(r.mail_from) == "<>" if (rep := parse_report(r))
    ]
    for s in ledger.submitted:
        for rcpt in s.recipients:
            problem = recipient_problem(s, rcpt, answers, reports, expiry)
            if problem:
                problems.append(f"{s.message_id} to {rcpt}: {problem}")
    known = {s.message_id for s in ledger.submitted}
    problems += [
        f"bounce for unknown message {rep.original_message_id}"
        for rep in reports
        if rep.original_message_id not in known
    ]
    if problems:
        raise ScenarioError("run differs from plan: " + "; ".join(problems))


def recipient_problem(
    s: Submitted, rcpt: str, answers: list[Answer], reports: list[Report], expiry: bool
) -> str:
    """Return what is wrong with the outcome of one recipient of `s`, or ""."""
    key = rcpt.lower()
    mine = [a for a in answers if a.recipient.lower() == key]
    data = [a for a in mine if a.phase == "data" and a.message_id == s.message_id]
    codes = [a.code for a in mine if a.phase == "rcpt"]
    returned = [
        rep.failed[key]
        for rep in reports
        if rep.original_message_id == s.message_id and key in rep.failed
    ]
    local = key.partition("@")[0]
    if local.startswith("reject-"):
        ok = codes == [550] and not data and [st[:1] for st in returned] == ["5"]
    elif local.startswith("dead-"):
        ok = bool(codes) and set(codes) == {450} and not data
        ok = ok and ([st[:1] for st in returned] == (["4"] if expiry else []))
    elif match := TEMPFAIL.match(local):
        ok = codes == [451] * int(match.group(1)) + [250] and len(data) == 1
    else:
        ok = codes == [250] and len(data) == 1
    if ok:
        return ""
    return f"rcpt answers {codes}, {len(data)} deliveries, returned with {returned}"
