"""Thresholds: the YAML rules, which rule applies to a sender, when a level is passed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import stamp
from mailtally.config import parse_config
from mailtally.correlate import Correlator
from mailtally.errors import ConfigError
from mailtally.parse import LineParser
from mailtally.store import DayRow, open_store
from mailtally.thresholds import CrossingJudge

RULES = """\
notify: {from: noc@example.edu}
thresholds:
  count: messages
  default: {warn: 200, alert: 1000, watch: {bounced: {warn: 10}}}
  domains:
    example.edu: {warn: 500}
    cs.example.edu: {alert: 3000, count: recipients}
    lists.example.edu: {exempt: true}
  senders:
    "*@bulk.example.edu": {warn: 5000}
    "owner@lists.example.edu": {exempt: false, warn: 50}
    "ceo@example.edu": {warn: 20}
  exempt: ["mailer-daemon@*", "monitor@example.edu"]
"""


def config(text: str = RULES):  # type: ignore[no-untyped-def]
    return parse_config(text, Path("mailtally.yaml"))


def limits(sender: str) -> dict[tuple[str, str], int]:
    eff = config().thresholds_rules().effective(sender)
    return {(lv.metric, lv.level): lv.limit for lv in eff.levels}


def test_default_rule_is_warn_at_200() -> None:
    eff = config("{}").thresholds_rules().effective("alice@example.org")
    assert [(lv.metric, lv.level, lv.limit) for lv in eff.levels] == [("messages", "warn", 200)]
    assert not eff.exempt


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("a@other.example", {("messages", "warn"): 200, ("messages", "alert"): 1000}),
        ("a@example.edu", {("messages", "warn"): 500, ("messages", "alert"): 1000}),
        # Parent domain first, then the subdomain's own keys (and its count).
        ("a@cs.example.edu", {("recipients", "warn"): 500, ("recipients", "alert"): 3000}),
        ("a@bulk.example.edu", {("messages", "warn"): 5000, ("messages", "alert"): 1000}),
        ("ceo@example.edu", {("messages", "warn"): 20, ("messages", "alert"): 1000}),
        ("alice", {("messages", "warn"): 200, ("messages", "alert"): 1000}),  # a SASL name
    ],
)
def test_overrides_refine_the_default_key_by_key(sender: str, expected: dict) -> None:  # type: ignore[type-arg]
    got = limits(sender)
    assert got.pop(("bounced", "warn")) == 10
    assert got == expected


@pytest.mark.parametrize(
    ("sender", "exempt"),
    [
        ("x@lists.example.edu", True),
        ("owner@lists.example.edu", False),  # the more specific rule decides
        ("mailer-daemon@example.edu", True),
        ("monitor@example.edu", True),
        ("noc@example.edu", True),  # the notifier's own From address
        ("<>", True),
        ("someone@example.edu", False),
    ],
)
def test_exemptions(sender: str, exempt: bool) -> None:
    assert config().thresholds_rules().effective(sender).exempt is exempt


def test_a_level_is_passed_by_the_count_above_it() -> None:
    eff = config().thresholds_rules().effective("a@other.example")
    assert eff.passed(DayRow("2026-12-03", messages=200)) == []
    passed = eff.passed(DayRow("2026-12-03", messages=201, bounced=11))
    assert sorted((lv.metric, lv.level, value) for lv, value in passed) == [
        ("bounced", "warn", 11),
        ("messages", "warn", 201),
    ]


def test_count_sum_and_recipients() -> None:
    text = "thresholds: {count: sum, default: {warn: 10}}\n"
    eff = config(text).thresholds_rules().effective("a@b.example")
    row = DayRow("2026-12-03", messages=1, sent=6, bounced=3, auth_rcv=2)
    assert [(lv.metric, v) for lv, v in eff.passed(row)] == [("sum", 11)]
    text = "thresholds: {count: recipients, default: {warn: 10}}\n"
    eff = config(text).thresholds_rules().effective("a@b.example")
    assert eff.passed(DayRow("2026-12-03", messages=1, recipients=10)) == []
    assert len(eff.passed(DayRow("2026-12-03", messages=1, recipients=11))) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'thresholds:\n  domains:\n    "example.edu": {warn: lots}\n',
            'mailtally.yaml:3: thresholds.domains."example.edu".warn: expected a positive'
            " integer, got 'lots'",
        ),
        (
            "thresholds:\n  default: {warn: 0}\n",
            "mailtally.yaml:2: thresholds.default.warn: expected a positive integer, got 0",
        ),
        (
            "thresholds:\n  default: {Warn!: 5}\n",
            "mailtally.yaml:2: thresholds.default: 'Warn!' is not a level name (lower case"
            " letters, digits, _)",
        ),
        (
            "thresholds:\n  count: messagez\n",
            "mailtally.yaml:2: thresholds.count: expected messages, recipients or sum,"
            " got 'messagez'",
        ),
        (
            "thresholds:\n  default: {watch: {bouncd: {warn: 3}}}\n",
            "mailtally.yaml:2: thresholds.default.watch.bouncd: expected messages,"
            " recipients, sum, auth_rcv, auth_blk, sent, bounced, deferred or expired,"
            " got 'bouncd'",
        ),
        ("notify:\n  form: a@b.example\n", "mailtally.yaml:2: notify.form: unknown key"),
        ("notify:\n  from: not an address\n", "mailtally.yaml:2: notify.from: expected a mail"),
        ("notify:\n  daily_at: '25:00'\n", "mailtally.yaml:2: notify.daily_at: expected a time"),
        (
            "notify:\n  smtp: {starttls: true, tls: true}\n",
            "mailtally.yaml:2: notify.smtp: starttls and tls exclude each other",
        ),
    ],
)
def test_bad_rules_name_the_key_and_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config(text)
    assert str(exc.value).startswith(message)


def test_judge_only_looks_at_recent_days() -> None:
    tz = ZoneInfo("UTC")
    rules = config().thresholds_rules()
    today = datetime.now(tz).date()
    judge = CrossingJudge(rules, tz)
    assert judge.wants("a@other.example", today.isoformat())
    assert judge.wants("a@other.example", (today - timedelta(days=1)).isoformat())
    assert not judge.wants("a@other.example", (today - timedelta(days=2)).isoformat())
    assert not judge.wants("<>", today.isoformat())
    everything = CrossingJudge(rules, tz, days_back=None)
    assert everything.wants("a@other.example", "2020-01-01")


def test_a_batch_makes_each_notice_once_and_counts_recipients(tmp_path: Path) -> None:
    tz = ZoneInfo("UTC")
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    lines = []
    for i in range(205):
        t = stamp(now + timedelta(seconds=i), "rfc3339")
        qid = f"{0xC0000 + i:X}"
        lines += [
            f"{t} relay1 postfix/smtpd[10]: {qid}: client=web[10.0.0.5]",
            f"{t} relay1 postfix/qmgr[11]: {qid}: from=<Heavy@Other.example>, size=1, nrcpt=3"
            " (queue active)",
        ]
    store = open_store(tmp_path / "t.db")
    judge = CrossingJudge(config().thresholds_rules(), tz)
    correlator = Correlator(tz)
    parser = LineParser(tz, now.timestamp())
    made = []
    for part in (lines[:300], lines[300:400], lines[400:]):  # 150, 200, 205 messages
        correlator.feed_all(parser.parse_all(list(part)))
        made.append(store.commit_batch(correlator.take(), [], now.timestamp(), judge))
    assert made == [0, 0, 1]
    day = now.date().isoformat()
    row = store.day_rows("heavy@other.example", day, day)[day]
    assert (row.messages, row.recipients) == (205, 615)
    ((notice, state, error),) = store.notices()
    assert (notice.kind, notice.sender, notice.level, notice.metric) == (
        "crossing",
        "heavy@other.example",
        "warn",
        "messages",
    )
    assert (notice.threshold, notice.value, state, error) == (200, 205, "pending", None)
    # Judged again (a restart's rescan, a re-read batch): still one notice.
    assert store.add_notices(judge.notices("heavy@other.example", row), now.timestamp()) == 0
    store.close()


def test_check_config_shows_a_senders_limits(tmp_path: Path) -> None:
    from conftest import run_cli

    cfg = tmp_path / "m.yaml"
    cfg.write_text(RULES, encoding="utf-8")
    out = run_cli("check-config", cfg, "--sender", "<CEO@Example.edu>").stdout
    assert out.splitlines() == [
        f"{cfg}: ok",
        "sender ceo@example.edu: rules applied: default < domain example.edu"
        " < sender ceo@example.edu",
        "  warn: more than 10 bounced a day",
        "  warn: more than 20 messages a day",
        "  alert: more than 1000 messages a day",
    ]
    out = run_cli("check-config", cfg, "--sender", "x@lists.example.edu").stdout
    assert "  exempt: no limits" in out.splitlines()
