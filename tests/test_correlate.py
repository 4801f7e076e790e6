"""Correlator: real parser records of interleaved lines -> per-sender daily counts."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from mailtally.correlate import COLUMNS, Correlator, CorrelatorSettings
from mailtally.parse import LineParser

REF = datetime(2026, 12, 31, tzinfo=UTC).timestamp()


def tally(
    lines: Iterable[str], settings: CorrelatorSettings | None = None, tz: str = "UTC"
) -> tuple[dict[tuple[str, str], dict[str, int]], Correlator, list[tuple[object, ...]]]:
    """Feed lines; return counts per (sender, day), the correlator and detail rows."""
    parser = LineParser(ZoneInfo(tz), REF)
    corr = Correlator(ZoneInfo(tz), settings)
    for line in lines:
        corr.feed(parser.parse(line))
    batch = corr.take()
    counts = {k: dict(zip(COLUMNS, v, strict=True)) for k, v in batch.counts.items()}
    return counts, corr, list(batch.details)


def client(
    t: str, qid: str, ip: str = "10.0.0.5", user: str | None = None, service: str = "smtpd"
) -> str:
    sasl = f", sasl_method=PLAIN, sasl_username={user}" if user else ""
    prog = "postfix/smtpd" if service == "smtpd" else f"postfix/{service}/smtpd"
    return f"Dec  3 {t} relay1 {prog}[10]: {qid}: client=web.campus.example[{ip}]{sasl}"


def queued(
    t: str, qid: str, sender: str, nrcpt: int = 1, host: str = "relay1", day: str = "Dec  3"
) -> str:
    return (
        f"{day} {t} {host} postfix/qmgr[11]: {qid}: from=<{sender}>, size=900, "
        f"nrcpt={nrcpt} (queue active)"
    )


def delivery(
    t: str,
    qid: str,
    rcpt: str,
    status: str,
    host: str = "relay1",
    day: str = "Dec  3",
    dsn: str = "",
) -> str:
    dsn = dsn or {"sent": "2.0.0", "bounced": "5.1.1", "deferred": "4.4.1"}.get(status, "4.0.0")
    return (
        f"{day} {t} {host} postfix/smtp[12]: {qid}: to=<{rcpt}>, "
        f"relay=mx.dest.example[192.0.2.1]:25, delay=1, delays=0.1/0/0.5/0.4, dsn={dsn}, "
        f"status={status} (reply for {rcpt})"
    )


def removed(t: str, qid: str, host: str = "relay1", day: str = "Dec  3") -> str:
    return f"{day} {t} {host} postfix/qmgr[11]: {qid}: removed"


def row(
    counts: dict[tuple[str, str], dict[str, int]], sender: str, day: str = "2026-12-03"
) -> dict[str, int]:
    return counts.get((sender, day), dict.fromkeys(COLUMNS, 0))


def test_deferred_then_sent_counts_one_message_and_each_attempt() -> None:
    counts, corr, details = tally(
        [
            client("09:00:00", "AAAAA1"),
            queued("09:00:01", "AAAAA1", "alice@campus.example", nrcpt=2),
            delivery("09:00:02", "AAAAA1", "bob@dest.example", "sent"),
            delivery("09:00:02", "AAAAA1", "carol@dest.example", "deferred"),
            queued("09:10:00", "AAAAA1", "alice@campus.example", nrcpt=2),  # retry
            delivery("09:10:01", "AAAAA1", "carol@dest.example", "deferred"),
            queued("09:40:00", "AAAAA1", "alice@campus.example", nrcpt=2),
            delivery("09:40:01", "AAAAA1", "carol@dest.example", "sent"),
            removed("09:40:01", "AAAAA1"),
        ]
    )
    r = row(counts, "alice@campus.example")
    assert (r["messages"], r["sent"], r["deferred"], r["bounced"]) == (1, 2, 2, 0)
    assert [d[6] for d in details] == ["sent", "deferred", "deferred", "sent"]
    assert details[0][2] == "10.0.0.5"  # sender_ip from smtpd client=
    assert not corr.open


def test_sender_case_variants_are_one_sender() -> None:
    counts, _, _ = tally(
        [
            queued("09:00:01", "AAAAA1", "Alice@Campus.Example"),
            queued("09:00:02", "AAAAA2", "alice@campus.example"),
            queued("09:00:03", "AAAAA3", "ALICE@CAMPUS.EXAMPLE"),
        ]
    )
    assert row(counts, "alice@campus.example")["messages"] == 3
    assert len(counts) == 1


def test_auth_rcv_and_identity_sasl() -> None:
    lines = [
        client("09:00:00", "AAAAA1", user="Alice"),
        queued("09:00:01", "AAAAA1", "alice.smith@campus.example"),
        client("09:00:02", "AAAAA2"),
        queued("09:00:03", "AAAAA2", "alice.smith@campus.example"),
    ]
    counts, _, _ = tally(lines)
    r = row(counts, "alice.smith@campus.example")
    assert (r["messages"], r["auth_rcv"]) == (2, 1)

    counts, _, _ = tally(lines, CorrelatorSettings(identity="sasl"))
    assert (row(counts, "alice")["messages"], row(counts, "alice")["auth_rcv"]) == (1, 1)
    assert row(counts, "alice.smith@campus.example")["messages"] == 1


def test_queue_id_reused_after_removed_is_a_new_message() -> None:
    counts, _, _ = tally(
        [
            client("09:00:00", "AAAAA1"),
            queued("09:00:01", "AAAAA1", "alice@campus.example"),
            delivery("09:00:02", "AAAAA1", "x@dest.example", "sent"),
            removed("09:00:02", "AAAAA1"),
            client("09:05:00", "AAAAA1", ip="10.9.9.9"),
            queued("09:05:01", "AAAAA1", "bob@campus.example"),
            delivery("09:05:02", "AAAAA1", "y@dest.example", "bounced"),
            removed("09:05:02", "AAAAA1"),
        ]
    )
    assert row(counts, "alice@campus.example")["messages"] == 1
    assert row(counts, "alice@campus.example")["sent"] == 1
    assert (
        row(counts, "bob@campus.example")["messages"],
        row(counts, "bob@campus.example")["bounced"],
    ) == (1, 1)


def test_reused_queue_id_without_client_line_after_removed() -> None:
    # Bounce notifications and forwarded mail start at cleanup: no smtpd/pickup line.
    counts, _, _ = tally(
        [
            queued("09:00:01", "AAAAA1", "alice@campus.example"),
            removed("09:00:02", "AAAAA1"),
            queued("09:00:03", "AAAAA1", ""),
            delivery("09:00:04", "AAAAA1", "alice@campus.example", "sent"),
            removed("09:00:04", "AAAAA1"),
        ]
    )
    assert row(counts, "alice@campus.example")["messages"] == 1
    assert (row(counts, "<>")["messages"], row(counts, "<>")["sent"]) == (1, 1)


def test_lines_out_of_order_within_seconds_are_still_attributed() -> None:
    counts, corr, _ = tally(
        [
            client("09:00:00", "AAAAA1"),
            delivery("09:00:01", "AAAAA1", "early@dest.example", "sent"),  # before from=
            queued("09:00:01", "AAAAA1", "alice@campus.example", nrcpt=2),
            removed("09:00:02", "AAAAA1"),
            delivery("09:00:02", "AAAAA1", "late@dest.example", "sent"),  # after removed
        ]
    )
    assert row(counts, "alice@campus.example")["sent"] == 2
    assert corr.stats.orphan_deliveries == 0


def test_message_deferred_for_days_keeps_its_sender() -> None:
    lines = [client("09:00:00", "AAAAA1"), queued("09:00:01", "AAAAA1", "alice@campus.example")]
    for day in range(3, 8):
        lines.append(queued("10:00:00", "AAAAA1", "alice@campus.example", day=f"Dec  {day}"))
        lines.append(
            delivery("10:00:01", "AAAAA1", "x@dest.example", "deferred", day=f"Dec  {day}")
        )
    lines += [
        "Dec  8 09:00:02 relay1 postfix/qmgr[11]: AAAAA1: from=<alice@campus.example>, "
        "status=expired, returned to sender",
        removed("09:00:03", "AAAAA1", day="Dec  8"),
    ]
    counts, _, _ = tally(lines)
    assert row(counts, "alice@campus.example", "2026-12-03")["messages"] == 1
    for day in range(3, 8):
        assert row(counts, "alice@campus.example", f"2026-12-0{day}")["deferred"] == 1
    assert row(counts, "alice@campus.example", "2026-12-08")["expired"] == 1
    assert row(counts, "alice@campus.example", "2026-12-08")["messages"] == 0


def test_day_follows_the_configured_zone() -> None:
    # 17:00 UTC on Dec 3 is already Dec 4 in Taipei (UTC+8).
    line = (
        "2026-12-03T17:00:00.000000+00:00 relay1 postfix/qmgr[11]: AAAAA1: "
        "from=<a@b.example>, size=1, nrcpt=1 (queue active)"
    )
    counts, _, _ = tally([line], tz="Asia/Taipei")
    assert list(counts) == [("a@b.example", "2026-12-04")]
    counts, _, _ = tally([line], tz="UTC")
    assert list(counts) == [("a@b.example", "2026-12-03")]


def test_same_queue_id_on_two_relays_and_two_instances() -> None:
    counts, _, _ = tally(
        [
            queued("09:00:01", "AAAAA1", "alice@campus.example", host="relay1"),
            queued("09:00:01", "AAAAA1", "bob@campus.example", host="relay2"),
            "Dec  3 09:00:01 relay1 postfix-out/qmgr[9]: AAAAA1: from=<carol@campus.example>, "
            "size=1, nrcpt=1 (queue active)",
            delivery("09:00:02", "AAAAA1", "x@dest.example", "sent", host="relay2"),
            "Dec  3 09:00:02 relay1 postfix-out/smtp[9]: AAAAA1: to=<y@dest.example>, relay=none, "
            "delay=1, delays=1/0/0/0, dsn=5.4.4, status=bounced (Host not found)",
        ]
    )
    assert row(counts, "alice@campus.example")["sent"] == 0
    assert row(counts, "bob@campus.example")["sent"] == 1
    assert row(counts, "carol@campus.example")["bounced"] == 1


def test_noqueue_reject_counts_auth_blk_only_on_auth_services() -> None:
    def reject(service: str, sender: str) -> str:
        prog = "postfix/smtpd" if service == "smtpd" else f"postfix/{service}/smtpd"
        return (
            f"Dec  3 09:00:00 relay1 {prog}[5]: NOQUEUE: reject: RCPT from "
            f"unknown[192.0.2.9]: 554 5.7.1 <x@y.example>: Relay access denied; "
            f"from=<{sender}> to=<x@y.example> proto=ESMTP helo=<h>"
        )

    counts, corr, details = tally(
        [
            reject("submission", "Alice@campus.example"),
            reject("smtpd", "alice@campus.example"),
        ]
    )
    assert row(counts, "alice@campus.example")["auth_blk"] == 1
    assert [d[6] for d in details] == ["reject", "reject"]
    assert details[0][8 - 4] == "NOQUEUE"
    assert corr.stats.rejects == 2


def test_sasl_failures_count_for_the_username() -> None:
    counts, corr, _ = tally(
        [
            "Dec  3 09:00:00 relay1 postfix/submission/smtpd[5]: warning: unknown[192.0.2.7]: "
            "SASL PLAIN authentication failed: authentication failure, "
            "sasl_username=Bob@Campus.Example",
            "Dec  3 09:00:01 relay1 postfix/submission/smtpd[5]: warning: unknown[192.0.2.7]: "
            "SASL LOGIN authentication failed: UGFzc3dvcmQ6",
        ]
    )
    assert row(counts, "bob@campus.example")["auth_blk"] == 1
    assert corr.stats.unattributed == 1


def test_pickup_is_local_submission() -> None:
    counts, _, details = tally(
        [
            "Dec  3 09:00:00 relay1 postfix/pickup[5]: AAAAA1: uid=1000 from=<cron>",
            queued("09:00:01", "AAAAA1", "cron@relay1.campus.example"),
            delivery("09:00:02", "AAAAA1", "root@campus.example", "sent"),
        ]
    )
    assert row(counts, "cron@relay1.campus.example")["sent"] == 1
    assert details[0][2] == "local"


def test_strip_extension_merges_tagged_senders() -> None:
    lines = [
        queued("09:00:01", "AAAAA1", "alice+lists@campus.example"),
        queued("09:00:02", "AAAAA2", "alice@campus.example"),
    ]
    counts, _, _ = tally(lines)
    assert row(counts, "alice+lists@campus.example")["messages"] == 1
    counts, _, _ = tally(lines, CorrelatorSettings(strip_extension=True))
    assert row(counts, "alice@campus.example")["messages"] == 2


def test_open_messages_are_bounded_by_count_and_age() -> None:
    lines = [queued(f"09:00:{i:02d}", f"AAAAB{i:02d}", "a@b.example") for i in range(50)]
    _, corr, _ = tally(lines, CorrelatorSettings(max_open=10))
    assert len(corr.open) == 10
    assert corr.stats.evicted == 40

    lines = [
        queued("09:00:00", "AAAAA1", "a@b.example"),
        queued("09:00:00", "AAAAA2", "a@b.example", day="Dec  9"),
    ]
    _, corr, _ = tally(lines, CorrelatorSettings(max_age=86400 * 5))
    assert [k[1] for k in corr.open] == ["AAAAA2"]
    assert corr.stats.evicted == 1


def test_delivery_of_a_message_never_seen_queued_is_orphaned() -> None:
    counts, corr, _ = tally(
        [
            delivery("09:00:02", "AAAAA1", "x@dest.example", "sent"),
            removed("09:00:03", "AAAAA1"),
        ]
    )
    assert counts == {}
    assert corr.stats.orphan_deliveries == 1


def test_take_reports_open_message_changes_for_persistence() -> None:
    parser = LineParser(ZoneInfo("UTC"), REF)
    corr = Correlator(ZoneInfo("UTC"), CorrelatorSettings(reorder_window=10))
    for line in [client("09:00:00", "AAAAA1"), queued("09:00:01", "AAAAA1", "a@b.example")]:
        corr.feed(parser.parse(line))
    first = corr.take()
    assert [(m[1], m[7], m[8]) for m in first.upserts] == [("AAAAA1", "a@b.example", True)]
    corr.feed(parser.parse(removed("09:00:05", "AAAAA1")))
    corr.feed(parser.parse(removed("09:10:00", "AAAAA9")))  # unknown: ignored
    corr.feed(parser.parse(queued("09:10:00", "AAAAA2", "c@d.example")))
    corr.feed(parser.parse(removed("09:10:01", "AAAAA2")))  # prunes AAAAA1's tombstone
    second = corr.take()
    assert second.deletes == [("relay1", "AAAAA1")]
    assert [m[1] for m in second.upserts] == ["AAAAA2"]


AMAVIS = [
    "Dec  3 09:00:00 relay1 postfix/submission/smtpd[10]: AAAAA1: client=web[10.0.0.5], "
    "sasl_method=PLAIN, sasl_username=alice",
    queued("09:00:01", "AAAAA1", "alice@campus.example", nrcpt=2),
    # amavis hands the scanned message back over XFORWARD before it answers Postfix
    "Dec  3 09:00:02 relay1 postfix/smtpd[20]: BBBBB2: client=localhost[127.0.0.1], "
    "orig_queue_id=AAAAA1, orig_client=web[10.0.0.5]",
    queued("09:00:02", "BBBBB2", "alice@campus.example", nrcpt=2),
    "Dec  3 09:00:03 relay1 postfix/smtp[30]: AAAAA1: to=<x@dest.example>, "
    "relay=127.0.0.1[127.0.0.1]:10024, delay=2, delays=1/0/0/1, dsn=2.0.0, status=sent "
    "(250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok: queued as BBBBB2)",
    "Dec  3 09:00:03 relay1 postfix/smtp[30]: AAAAA1: to=<y@dest.example>, "
    "relay=127.0.0.1[127.0.0.1]:10024, delay=2, delays=1/0/0/1, dsn=2.0.0, status=sent "
    "(250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok: queued as BBBBB2)",
    removed("09:00:03", "AAAAA1"),
    delivery("09:00:04", "BBBBB2", "x@dest.example", "sent"),
    delivery("09:00:04", "BBBBB2", "y@dest.example", "bounced"),
    removed("09:00:04", "BBBBB2"),
]


def test_content_filter_round_trip_is_one_message() -> None:
    counts, corr, details = tally(AMAVIS)
    r = row(counts, "alice@campus.example")
    assert (r["messages"], r["auth_rcv"], r["sent"], r["bounced"]) == (1, 1, 1, 1)
    assert corr.stats.hops == 2
    assert [(d[2], d[4], d[6]) for d in details] == [
        ("10.0.0.5", "BBBBB2", "sent"),
        ("10.0.0.5", "BBBBB2", "bounced"),
    ]
    # identity: sasl follows the message through the filter
    counts, _, _ = tally(AMAVIS, CorrelatorSettings(identity="sasl"))
    assert (row(counts, "alice")["messages"], row(counts, "alice")["sent"]) == (1, 1)


def test_content_filter_without_xforward_is_configured() -> None:
    lines = [
        line.replace(", orig_queue_id=AAAAA1, orig_client=web[10.0.0.5]", "").replace(
            "postfix/smtpd[20]", "postfix/10025/smtpd[20]"
        )
        for line in AMAVIS
    ]
    counts, _, _ = tally(lines)  # not configured: two messages, four deliveries
    assert (
        row(counts, "alice@campus.example")["messages"],
        row(counts, "alice@campus.example")["sent"],
    ) == (2, 3)
    settings = CorrelatorSettings(
        content_filters=("[127.0.0.1]:10024",), reinject_services=frozenset({"10025"})
    )
    counts, corr, _ = tally(lines, settings)
    r = row(counts, "alice@campus.example")
    assert (r["messages"], r["auth_rcv"], r["sent"], r["bounced"]) == (1, 1, 1, 1)
    assert corr.stats.hops == 2


def test_content_filter_returning_to_a_second_instance() -> None:
    lines = [
        line.replace("relay1 postfix/smtpd[20]: BBBBB2", "relay1 postfix-out/smtpd[20]: BBBBB2")
        .replace("relay1 postfix/qmgr[11]: BBBBB2", "relay1 postfix-out/qmgr[11]: BBBBB2")
        .replace("relay1 postfix/smtp[12]: BBBBB2", "relay1 postfix-out/smtp[12]: BBBBB2")
        .replace(
            "relay1 postfix/qmgr[11]: BBBBB2: removed",
            "relay1 postfix-out/qmgr[11]: BBBBB2: removed",
        )
        for line in AMAVIS
    ]
    counts, _, details = tally(lines)
    r = row(counts, "alice@campus.example")
    assert (r["messages"], r["sent"], r["bounced"]) == (1, 1, 1)
    assert {d[3] for d in details} == {"relay1/postfix-out"}


def test_soft_bounce_counts_as_deferred() -> None:
    counts, _, details = tally(
        [
            queued("09:00:01", "AAAAA1", "alice@campus.example"),
            delivery("09:00:02", "AAAAA1", "x@dest.example", "SOFTBOUNCE", dsn="5.1.1"),
        ]
    )
    assert (
        row(counts, "alice@campus.example")["deferred"],
        row(counts, "alice@campus.example")["bounced"],
    ) == (1, 0)
    assert details[0][6] == "deferred"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("554 5.7.1 <x@dest.example>: Relay access denied", "relay_denied"),
        (
            "554 5.7.1 Service unavailable; Client host [192.0.2.9] blocked using"
            " zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.9",
            "rbl",
        ),
        (
            "550 5.1.1 <nobody@campus.example>: Recipient address rejected: User unknown in"
            " local recipient table",
            "unknown_user",
        ),
        (
            "550 5.1.1 <x@campus.example>: Recipient address rejected: User unknown in virtual"
            " mailbox table",
            "unknown_user",
        ),
        ("554 5.7.1 <a@b.example>: Recipient address rejected: Policy rejection", "policy"),
        ("504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname", "other"),
    ],
)
def test_reject_classes(reply: str, expected: str) -> None:
    from mailtally.correlate import REJECT_CLASSES, reject_class

    assert REJECT_CLASSES[reject_class(reply)] == expected
