"""Parser: header forms, program names, year inference, bad input, public corpora."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from mailtally.parse import (
    AuthFailure,
    Client,
    Delivery,
    Expired,
    Foreign,
    LineParser,
    Notification,
    Other,
    Pickup,
    Queued,
    Reject,
    Removed,
    Unparsed,
)

UTC_ZONE = ZoneInfo("UTC")
REF = datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "postfix-grok-patterns"
CORPUS = Path(os.environ.get("MAILTALLY_CORPUS", CORPUS))


def parser(tz: str = "UTC", ref: float = REF) -> LineParser:
    return LineParser(ZoneInfo(tz), ref)


def at(*fields: int, tz: str = "UTC") -> float:
    return datetime(*fields, tzinfo=ZoneInfo(tz)).timestamp()


QMGR = "7EE668039: from=<alice@example.edu>, size=1234, nrcpt=2 (queue active)"


@pytest.mark.parametrize(
    ("line", "ts"),
    [
        (f"Dec  3 09:41:40 relay1 postfix/qmgr[125]: {QMGR}", at(2026, 12, 3, 9, 41, 40)),
        (f"Dec 03 09:41:40 relay1 postfix/qmgr[125]: {QMGR}", at(2026, 12, 3, 9, 41, 40)),
        (
            f"2026-12-03T09:41:40.123456+00:00 relay1 postfix/qmgr[125]: {QMGR}",
            at(2026, 12, 3, 9, 41, 40) + 0.123456,
        ),
        (
            f"2026-12-03T17:41:40.5+08:00 relay1 postfix/qmgr[125]: {QMGR}",
            at(2026, 12, 3, 9, 41, 40) + 0.5,
        ),
        (f"2026-12-03T09:41:40Z relay1 postfix/qmgr[125]: {QMGR}", at(2026, 12, 3, 9, 41, 40)),
    ],
    ids=["traditional", "postlogd", "rfc3339", "rfc3339-offset", "rfc3339-zulu"],
)
def test_three_header_forms_give_the_same_record(line: str, ts: float) -> None:
    rec = parser().parse(line)
    assert isinstance(rec, Queued)
    assert rec.ts == pytest.approx(ts, abs=1e-6)
    assert (rec.host, rec.queue_id, rec.sender, rec.size, rec.nrcpt) == (
        "relay1",
        "7EE668039",
        "alice@example.edu",
        1234,
        2,
    )


def test_traditional_stamp_is_read_in_the_configured_zone() -> None:
    rec = parser("Asia/Taipei").parse(f"Dec  3 09:41:40 relay1 postfix/qmgr[1]: {QMGR}")
    assert isinstance(rec, Queued)
    assert rec.ts == at(2026, 12, 3, 9, 41, 40, tz="Asia/Taipei")


@pytest.mark.parametrize(
    ("program", "host", "service"),
    [
        ("postfix/smtpd", "relay1", "smtpd"),
        ("postfix/submission/smtpd", "relay1", "submission"),
        ("postfix-out/smtpd", "relay1/postfix-out", "smtpd"),
        ("postfix-out/smtps/smtpd", "relay1/postfix-out", "smtps"),
    ],
)
def test_instance_and_service_names(program: str, host: str, service: str) -> None:
    line = f"Dec  3 09:41:40 relay1 {program}[7]: 4LqTkN3Yzbz9vBq: client=a.example[192.0.2.1]"
    rec = parser().parse(line)
    assert isinstance(rec, Client)
    assert (rec.host, rec.service) == (host, service)
    assert rec.queue_id == "4LqTkN3Yzbz9vBq"


def test_words_are_not_queue_ids() -> None:
    p = parser()
    assert not isinstance(p.parse("Dec  3 09:41:40 r postfix/qmgr[1]: warning: removed"), Removed)
    assert isinstance(
        p.parse("Dec  3 09:41:40 r postfix/qmgr[1]: 4LqTkN3Yzbz9vBq: removed"), Removed
    )


def test_year_is_inferred_across_new_year() -> None:
    # Read on Jan 1 2027: December lines belong to 2026, January ones to 2027.
    p = parser(ref=at(2027, 1, 1, 0, 30))
    dec = p.parse(f"Dec 31 23:59:59 r postfix/qmgr[1]: {QMGR}")
    jan = p.parse(f"Jan  1 00:00:01 r postfix/qmgr[1]: {QMGR}")
    assert isinstance(dec, Queued)
    assert isinstance(jan, Queued)
    assert dec.ts == at(2026, 12, 31, 23, 59, 59)
    assert jan.ts == at(2027, 1, 1, 0, 0, 1)


def test_stamp_slightly_ahead_of_reference_stays_in_its_year() -> None:
    # A file's mtime may trail its last line a little (clock skew, zone of the writer).
    rec = parser(ref=at(2026, 12, 3, 9, 0)).parse(f"Dec  3 11:00:00 r postfix/qmgr[1]: {QMGR}")
    assert isinstance(rec, Queued)
    assert rec.ts == at(2026, 12, 3, 11, 0)


def test_feb_29_in_a_leap_year_from_a_later_reference() -> None:
    rec = parser(ref=at(2028, 3, 1)).parse(f"Feb 29 10:00:00 r postfix/qmgr[1]: {QMGR}")
    assert isinstance(rec, Queued)
    assert rec.ts == at(2028, 2, 29, 10)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("", "header"),
        ("garbage", "header"),
        ("Dec  3 09:41", "header"),
        ("\x00\x00\x00\x00", "nul"),
        ("Dec  3 09:41:40 relay1 postfix/qmgr[125]: " + "x" * (1024 * 1024), "length"),
        (f"Foo 33 99:99:99 relay1 postfix/qmgr[125]: {QMGR}", "header"),
        (f"Dec 33 99:99:99 relay1 postfix/qmgr[125]: {QMGR}", "timestamp"),
        (f"Feb 30 10:00:00 relay1 postfix/qmgr[125]: {QMGR}", "timestamp"),
        (f"2026-13-40T09:41:40+00:00 relay1 postfix/qmgr[125]: {QMGR}", "timestamp"),
    ],
    ids=[
        "empty",
        "garbage",
        "truncated",
        "nul",
        "1MB",
        "bad-month",
        "bad-day",
        "feb-30",
        "bad-iso",
    ],
)
def test_bad_lines_are_unparsed_with_a_reason(line: str, reason: str) -> None:
    rec = parser().parse(line)
    assert rec == Unparsed(reason)


def test_truncated_postfix_lines_never_raise() -> None:
    p = parser()
    full = (
        "Dec  3 09:41:42 relay1 postfix/smtp[126]: 7EE668039: to=<bob@dest.example>, "
        "relay=mx.dest.example[192.0.2.1]:25, delay=2, delays=0.1/0/1/1, dsn=2.0.0, "
        "status=sent (250 2.0.0 Ok: queued as ABC)"
    )
    for cut in range(len(full)):
        assert p.parse(full[:cut]) is not None


def test_other_programs_are_foreign_not_unparsed() -> None:
    rec = parser().parse("Dec  3 09:41:40 relay1 dovecot: imap-login: Login: user=<alice>")
    assert rec == Foreign("dovecot")
    assert parser().parse("Dec  3 09:41:40 relay1 postfix/anvil[9]: statistics: x") == Other()


def test_delivery_fields() -> None:
    rec = parser().parse(
        "Dec  3 09:41:42 relay1 postfix/smtp[126]: 7EE668039: to=<bob@dest.example>, "
        "orig_to=<b@campus.example>, relay=mx.dest.example[192.0.2.1]:25, conn_use=2, "
        "delay=2, delays=0.1/0/1/1, tls=may:none, dsn=4.2.0, status=deferred "
        "(host mx.dest.example[192.0.2.1] said: 450 4.2.0 try later (in reply to RCPT TO))"
    )
    assert isinstance(rec, Delivery)
    assert rec.recipient == "bob@dest.example"
    assert rec.orig_to == "b@campus.example"
    assert rec.relay == "mx.dest.example[192.0.2.1]:25"
    assert (rec.dsn, rec.status) == ("4.2.0", "deferred")
    assert (
        rec.text
        == "host mx.dest.example[192.0.2.1] said: 450 4.2.0 try later (in reply to RCPT TO)"
    )


def test_recipient_with_comma_in_quoted_local_part() -> None:
    rec = parser().parse(
        'Dec  3 09:41:42 r postfix/smtp[1]: ABCDEF123: to=<"a, b"@x.example>, relay=none, '
        "delay=1, delays=1/0/0/0, dsn=5.1.1, status=bounced (unknown)"
    )
    assert isinstance(rec, Delivery)
    assert rec.recipient == '"a, b"@x.example'
    assert rec.status == "bounced"


def test_qmgr_expired_removed_and_bounce_notification() -> None:
    p = parser()
    exp = p.parse(
        "Dec  3 09:00:00 r postfix/qmgr[1]: 66C15648577B: from=<U@x.example>, "
        "status=expired, returned to sender"
    )
    rem = p.parse("Dec  3 09:00:00 r postfix/qmgr[1]: 66C15648577B: removed")
    note = p.parse(
        "Dec  3 09:00:00 r postfix/bounce[9]: 66C15648577B: sender non-delivery "
        "notification: 0A87A1A08"
    )
    assert isinstance(exp, Expired)
    assert exp.sender == "U@x.example"
    assert isinstance(rem, Removed)
    assert isinstance(note, Notification)
    assert (note.kind, note.new_queue_id) == ("sender non-delivery", "0A87A1A08")


def test_postsuper_removed() -> None:
    rec = parser().parse("Dec  3 09:00:00 r postfix/postsuper[1]: 0F5383D: removed")
    assert isinstance(rec, Removed)


def test_pickup_and_client_with_sasl() -> None:
    p = parser()
    pick = p.parse("Dec  3 09:00:00 r postfix/pickup[1]: D2FAE20586: uid=0 from=<fail2ban>")
    cli = p.parse(
        "Dec  3 09:00:00 r postfix/submission/smtpd[2]: D2FAE20587: "
        "client=webmail.campus.example[10.1.2.3], sasl_method=PLAIN, "
        "sasl_username=Alice@Campus.Example"
    )
    assert isinstance(pick, Pickup)
    assert (pick.uid, pick.sender) == ("0", "fail2ban")
    assert isinstance(cli, Client)
    assert (cli.client_name, cli.client_ip) == ("webmail.campus.example", "10.1.2.3")
    assert (cli.sasl_method, cli.sasl_username) == ("PLAIN", "Alice@Campus.Example")


def test_noqueue_reject_both_envelope_styles() -> None:
    p = parser()
    new = p.parse(
        "Dec  3 09:00:00 r postfix/smtpd[2]: NOQUEUE: reject: RCPT from unknown[192.0.2.9]: "
        "554 5.7.1 <x@y.example>: Relay access denied; from=<s@campus.example> "
        "to=<x@y.example> proto=ESMTP helo=<h>"
    )
    old = p.parse(
        "Dec  3 09:00:00 r postfix/smtpd[2]: NOQUEUE: reject: RCPT from [182.98.255.184]:2413: "
        "550 5.5.1 Protocol error; from=<l@yahoo.com>, to=<tom@example.com>, proto=SMTP, "
        "helo=<mx32>"
    )
    assert isinstance(new, Reject)
    assert (new.stage, new.client_ip, new.sender, new.recipient) == (
        "RCPT",
        "192.0.2.9",
        "s@campus.example",
        "x@y.example",
    )
    assert new.reply == "554 5.7.1 <x@y.example>: Relay access denied"
    assert isinstance(old, Reject)
    assert (old.client_ip, old.sender, old.recipient) == (
        "182.98.255.184",
        "l@yahoo.com",
        "tom@example.com",
    )


def test_sasl_failure_with_and_without_username() -> None:
    p = parser()
    new = p.parse(
        "Dec  3 09:00:00 r postfix/submission/smtpd[2]: warning: unknown[192.0.2.7]: "
        "SASL PLAIN authentication failed: authentication failure, "
        "sasl_username=bob@campus.example"
    )
    old = p.parse(
        "Dec  3 09:00:00 r postfix/smtpd[2]: warning: ec2.example[3.84.57.208]: "
        "SASL LOGIN authentication failed: UGFzc3dvcmQ6"
    )
    assert isinstance(new, AuthFailure)
    assert (new.method, new.username, new.client_ip) == (
        "PLAIN",
        "bob@campus.example",
        "192.0.2.7",
    )
    assert isinstance(old, AuthFailure)
    assert old.username is None


# -- the public postfix-grok-patterns corpus: real lines from many Postfix versions ---------

_DAEMONS = {
    "smtp",
    "smtpd",
    "qmgr",
    "local",
    "lmtp",
    "pipe",
    "virtual",
    "error",
    "cleanup",
    "bounce",
    "pickup",
    "anvil",
    "master",
    "postscreen",
    "postsuper",
    "scache",
    "dnsblog",
    "tlsproxy",
    "verify",
    "discard",
    "postdrop",
    "postmap",
    "sendmail",
    "tlsmgr",
    "trivial-rewrite",
}


def _corpus_cases() -> list[Path]:
    return sorted((CORPUS / "test").glob("*.yaml")) if CORPUS.is_dir() else []


@pytest.mark.skipif(not _corpus_cases(), reason="shared corpora not present beside the repo")
@pytest.mark.parametrize("case", _corpus_cases(), ids=lambda p: p.stem)
def test_corpus_line_parses(case: Path) -> None:
    spec = yaml.safe_load(case.read_text(encoding="utf-8"))
    data = str(spec["data"])
    results = spec.get("results") or {}
    daemon = case.stem.rsplit("_", 1)[0].replace("_", "-")
    program = f"postfix/{daemon if daemon in _DAEMONS else 'smtpd'}"
    rec = parser().parse(f"Dec  3 09:41:40 relay1 {program}[123]: {data}")
    assert not isinstance(rec, Unparsed | Foreign), data

    status = results.get("postfix_status")
    if daemon in {"smtp", "lmtp", "local", "pipe", "virtual", "error"} and status:
        assert isinstance(rec, Delivery), data
        assert rec.queue_id == results["postfix_queueid"]
        assert rec.status == status
        host = results.get("postfix_relay_hostname")
        if host:
            assert rec.relay.startswith(str(host))
    elif daemon == "qmgr" and "from=<" in data:
        assert isinstance(rec, Queued | Expired), data
        assert rec.queue_id == results["postfix_queueid"]
    elif daemon == "smtpd" and "client=" in data and "postfix_queueid" in results:
        assert isinstance(rec, Client), data
        assert rec.queue_id == results["postfix_queueid"]
        assert f"[{rec.client_ip}]" in data
    elif daemon == "smtpd" and data.startswith("NOQUEUE: reject: RCPT"):
        assert isinstance(rec, Reject), data
        assert rec.client_ip == results["postfix_client_ip"]
    elif results.get("postfix_message") == "removed":
        assert isinstance(rec, Removed), data
    elif rec is not None:
        assert isinstance(
            rec,
            Other
            | Client
            | Reject
            | Notification
            | Pickup
            | AuthFailure
            | Removed
            | Delivery
            | Queued
            | Expired,
        )


def test_corpus_is_present_in_ci() -> None:
    if os.environ.get("CI"):
        assert _corpus_cases(), f"no corpus at {CORPUS}"


def test_longest_queue_id_and_status_line_from_any_daemon() -> None:
    p = parser()
    qid = "4" * 20
    rec = p.parse(f"Dec  3 09:00:00 r postfix/qmgr[1]: {qid}: removed")
    assert isinstance(rec, Removed)
    assert rec.queue_id == qid
    # An older master.cf names the relay transport "relay" without a syslog_name.
    rec = p.parse(
        "Dec  3 09:00:00 r postfix/relay[1]: ABCDEF12: to=<a@b.example>, relay=mx[1.2.3.4]:25, "
        "delay=1, delays=1/0/0/0, dsn=2.0.0, status=sent (250 ok)"
    )
    assert isinstance(rec, Delivery)
    assert (rec.transport, rec.status) == ("relay", "sent")


def test_sasl_username_unavailable_is_no_username() -> None:
    rec = parser().parse(
        "Dec  3 09:00:00 r postfix/smtpd[2]: warning: unknown[192.0.2.7]: SASL LOGIN "
        "authentication failed: Invalid authentication mechanism, sasl_username=(unavailable)"
    )
    assert isinstance(rec, AuthFailure)
    assert rec.username is None


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
def test_hourly_zone_cache_matches_datetime_across_dst(zone: str) -> None:
    tz = ZoneInfo(zone)
    p = LineParser(tz, datetime(2026, 12, 31, tzinfo=UTC).timestamp())
    days = [(3, 8), (3, 29), (4, 5), (10, 4), (10, 25), (11, 1)]  # DST changes of 2026
    for month, day in days:
        for minute_of_day in range(0, 24 * 60, 7):
            hour, minute = divmod(minute_of_day, 60)
            stamp = (
                f"{datetime(2026, month, day, tzinfo=tz):%b} {day:2d} {hour:02d}:{minute:02d}:17"
            )
            expected = datetime(2026, month, day, hour, minute, 17, tzinfo=tz).timestamp()
            assert p.timestamp(stamp) == expected, stamp


def test_runs_the_build_it_was_asked_for() -> None:
    # tools/test.sh runs this file twice: compiled where mypyc built it, then pure.
    import mailtally.parse

    if os.environ.get("MAILTALLY_EXPECT_PURE") == "1":
        assert mailtally.parse.__file__.endswith(".py")
