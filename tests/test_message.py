"""Notices composed from the real templates, serialised, parsed back and sent over SMTP."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
from collections.abc import Iterator
from dataclasses import replace
from datetime import date, datetime
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from conftest import free_port
from mailtally.errors import ConfigError
from mailtally.notify.message import (
    PACKAGED,
    TITLES,
    Crossing,
    Envelope,
    SenderDay,
    Templates,
    compose_crossing,
    compose_daily,
    compose_digest,
    safe_address,
)
from mailtally.report import _TITLES
from mailtally.store import DayRow

ZONE = ZoneInfo("Asia/Taipei")
NOW = datetime(2024, 5, 3, 8, 0, 5, tzinfo=ZONE)
# Every count different, so a number found in the text belongs to one column.
ROW = DayRow(
    "2024-05-02",
    messages=215,
    auth_rcv=214,
    auth_blk=2,
    sent=433,
    bounced=17,
    deferred=9,
    expired=1,
)
ALICE = SenderDay(
    "alice@nthu.edu.tw",
    date(2024, 5, 2),
    ROW,
    [("gmail.com", 301), ("yahoo.com.tw", 120), ("xn--fiqs8s.example", 3)],
    datetime(2024, 5, 2, 9, 41, 40, tzinfo=ZONE),
)
WARN = Crossing("warn", "messages", 200, 201)
ALERT = Crossing("alert", "sum", 600, 676)
KINDS = ("crossing", "daily", "digest")
LANGUAGES = ("en", "zh-TW")


def envelope(language: str = "en", **changes: Any) -> Envelope:
    env = Envelope(
        from_addr="postmaster@nthu.edu.tw",
        reply_to="mailadm@cc.nthu.edu.tw",
        to=["alice@nthu.edu.tw"],
        cc=["admin1@cc.nthu.edu.tw", "admin2@cc.nthu.edu.tw"],
        language=language,
        hostname="smtp.nthu.edu.tw",
    )
    return replace(env, **changes)


def compose(kind: str, env: Envelope, templates: Templates | None = None) -> EmailMessage:
    templates = templates or Templates()
    if kind == "crossing":
        return compose_crossing(env, ALICE, WARN, templates, NOW)
    if kind == "daily":
        return compose_daily(env, ALICE, [WARN, ALERT], templates, NOW)
    bob = SenderDay("bob", ALICE.day, DayRow("2024-05-02", auth_blk=250), [], None)
    return compose_digest(env, ALICE.day, [(ALICE, [WARN, ALERT]), (bob, [])], templates, NOW)


def roundtrip(msg: EmailMessage) -> tuple[bytes, EmailMessage]:
    raw = msg.as_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return raw, parsed


def body_of(parsed: EmailMessage) -> str:
    """The decoded text; the parser keeps the wire's CRLF line ends, so make them LF."""
    content = parsed.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def subject_of(parsed: EmailMessage) -> str:
    """The decoded Subject.

    A subject that fits on a line of its own is folded right after "Subject:" by the
    stdlib, and its own parser then keeps the folding space; strip it.
    """
    return str(parsed["Subject"]).strip()


# -- composing every kind ---------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_headers_come_back_exact(kind: str, language: str) -> None:
    _, parsed = roundtrip(compose(kind, envelope(language)))

    assert parsed["From"] == "postmaster@nthu.edu.tw"
    assert parsed["To"] == "alice@nthu.edu.tw"
    assert parsed["Cc"] == "admin1@cc.nthu.edu.tw, admin2@cc.nthu.edu.tw"
    assert parsed["Reply-To"] == "mailadm@cc.nthu.edu.tw"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["X-Auto-Response-Suppress"] == "All"
    assert parsed["Content-Language"] == language
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content_charset() == "utf-8"
    assert "Precedence" not in parsed
    assert re.fullmatch(r"<[0-9.]+@nthu\.edu\.tw>", parsed["Message-ID"])
    assert parsedate_to_datetime(parsed["Date"]) == NOW
    assert parsed["Date"].endswith("+0800")


def test_cc_and_reply_to_are_left_out_when_empty() -> None:
    _, parsed = roundtrip(compose("crossing", envelope(cc=[], reply_to=None)))

    assert "Cc" not in parsed
    assert "Reply-To" not in parsed
    assert "write to postmaster@nthu.edu.tw" in body_of(parsed)


def test_message_ids_differ_between_messages() -> None:
    ids = {compose("crossing", envelope())["Message-ID"] for _ in range(5)}

    assert len(ids) == 5


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_serialised_message_is_ascii_with_short_lines(kind: str, language: str) -> None:
    raw, parsed = roundtrip(compose(kind, envelope(language)))
    cte = parsed["Content-Transfer-Encoding"]
    head, _, body = raw.partition(b"\r\n\r\n")

    assert cte in {"7bit", "quoted-printable", "base64"}
    assert raw.isascii()  # no 8bit: a server without 8BITMIME takes it as is
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    if cte != "7bit":
        assert all(len(line) <= 76 for line in body.split(b"\r\n"))  # RFC 2045 6.7, 6.8
    if language == "zh-TW":
        assert cte in {"quoted-printable", "base64"}


def test_english_notices_are_readable_7bit() -> None:
    for kind in ("crossing", "daily"):
        _, parsed = roundtrip(compose(kind, envelope("en")))

        assert parsed["Content-Transfer-Encoding"] == "7bit"


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", ["crossing", "daily"])
def test_sender_notice_shows_the_day_row_and_destinations(kind: str, language: str) -> None:
    _, parsed = roundtrip(compose(kind, envelope(language)))
    body = body_of(parsed)

    assert "alice@nthu.edu.tw" in subject_of(parsed)
    assert "2024-05-02" in subject_of(parsed)
    assert "  Sum  Auth_blk  Auth_rcv  Bounced  Deferred  Expired  Sent  Messages\n" in body
    assert "  676         2       214       17         9        1   433       215\n" in body
    for domain, count in ALICE.destinations:
        assert re.search(rf"^ +{count}  {re.escape(domain)}$", body, re.MULTILINE)
    assert "09:41:40" in body
    assert "mailadm@cc.nthu.edu.tw" in body
    assert "smtp.nthu.edu.tw" in body


@pytest.mark.parametrize("language", LANGUAGES)
def test_crossing_names_limit_and_value(language: str) -> None:
    _, parsed = roundtrip(compose("crossing", envelope(language)))
    body = body_of(parsed)

    assert "200" in subject_of(parsed)
    assert "200" in body
    assert "201" in body
    assert "warn" in body


@pytest.mark.parametrize("language", LANGUAGES)
def test_daily_lists_every_crossing(language: str) -> None:
    body = body_of(roundtrip(compose("daily", envelope(language)))[1])
    items = [line for line in body.splitlines() if line.startswith("  - ")]
    yesterday = "Yesterday (2024-05-02)" if language == "en" else "昨天（2024-05-02）"  # noqa: RUF001

    assert len(items) == 2
    assert all(word in items[0] for word in ("200", "201", "warn"))
    assert all(word in items[1] for word in ("Sum", "600", "676", "alert"))
    assert yesterday in body


def test_daily_says_the_date_when_it_is_not_yesterday() -> None:
    later = datetime(2024, 5, 9, 8, 0, tzinfo=ZONE)
    msg = compose_daily(envelope(), ALICE, [WARN], Templates(), later)

    body = body_of(roundtrip(msg)[1])

    assert "Yesterday" not in body
    assert "On 2024-05-02, you sent more mail as alice@nthu.edu.tw" in body


def test_daily_needs_a_crossing() -> None:
    with pytest.raises(ValueError, match="at least one crossing"):
        compose_daily(envelope(), ALICE, [], Templates(), NOW)


@pytest.mark.parametrize("language", LANGUAGES)
def test_digest_has_one_line_per_sender(language: str) -> None:
    _, parsed = roundtrip(compose("digest", envelope(language)))
    lines = body_of(parsed).splitlines()
    alice = [line for line in lines if line.startswith("alice@nthu.edu.tw ")]
    bob = [line for line in lines if line.startswith("bob ")]

    assert "2" in subject_of(parsed)
    assert len(alice) == 1
    assert len(bob) == 1
    assert alice[0].split() == [
        "alice@nthu.edu.tw",
        *map(str, (676, 2, 214, 17, 9, 1, 433, 215)),
        "09:41:40",
        "gmail.com",
        "(301)",
        "warn",
        "messages>200,",
        "alert",
        "sum>600",
    ]
    assert bob[0].split() == ["bob", "250", "250", *["0"] * 6, "-", "-", "-"]
    header = next(line for line in lines if line.startswith("Sender "))
    assert header.split()[1:9] == list(TITLES.values())


def test_digest_without_senders_says_so() -> None:
    msg = compose_digest(envelope(), ALICE.day, [], Templates(), NOW)

    assert "No sender passed a limit." in body_of(roundtrip(msg)[1])


def test_titles_are_the_reports() -> None:
    assert TITLES == _TITLES


def test_chinese_round_trips() -> None:
    raw, parsed = roundtrip(compose("crossing", envelope("zh-TW")))
    body = body_of(parsed)

    assert b"=?utf-8?" in raw.partition(b"\r\n\r\n")[0]
    assert subject_of(parsed) == (
        "[mailtally] alice@nthu.edu.tw 於 2024-05-02 寄出的信件數超過每日上限 200"
    )
    assert "您的密碼很可能已經外洩" in body
    assert "請立即變更密碼" in body
    assert "Auth_blk  遭阻擋的寄信" in body


def test_sasl_username_sender_renders_in_the_body() -> None:
    day = replace(ALICE, sender="alice")

    msg = compose_crossing(envelope(), day, WARN, Templates(), NOW)
    _, parsed = roundtrip(msg)

    assert subject_of(parsed).startswith("[mailtally] alice sent more than 200 messages")
    assert "mail sent as alice passed the daily limit" in body_of(parsed)


def test_day_without_deliveries_or_first_seen() -> None:
    day = SenderDay("carol@nthu.edu.tw", ALICE.day, DayRow("2024-05-02", auth_blk=300), [], None)

    msg = compose_crossing(
        envelope(), day, Crossing("warn", "auth_blk", 200, 300), Templates(), NOW
    )
    body = body_of(roundtrip(msg)[1])

    assert "No delivery to a recipient has been logged yet." in body
    assert "first mail" not in body
    assert "blocked submissions (Auth_blk)" in body


# -- templates ----------------------------------------------------------------------


def test_packaged_templates_pass_the_check() -> None:
    Templates().check()


def test_packaged_templates_are_all_there() -> None:
    names = sorted(str(p.relative_to(PACKAGED)) for p in PACKAGED.glob("*/*.txt"))

    assert names == sorted(f"{lang}/{kind}.txt" for lang in LANGUAGES for kind in KINDS)


def test_admin_template_overrides_one_and_the_rest_fall_back(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "crossing.txt").write_text(
        "Subject: Limit {{ crossing.limit }} for {{ sender }}\n\n"
        "Ours: {{ row.sum }} on {{ day }}.\n",
        encoding="utf-8",
    )
    templates = Templates(tmp_path)
    templates.check()

    crossing = roundtrip(compose("crossing", envelope(), templates))[1]
    daily = roundtrip(compose("daily", envelope(), templates))[1]
    chinese = roundtrip(compose("crossing", envelope("zh-TW"), templates))[1]

    assert subject_of(crossing) == "Limit 200 for alice@nthu.edu.tw"
    assert body_of(crossing) == "Ours: 676 on 2024-05-02.\n"
    assert "What the columns mean:" in body_of(daily)
    assert "欄位說明" in body_of(chinese)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "zh-TW").mkdir()
    path = tmp_path / "zh-TW" / "digest.txt"
    path.write_text("Subject: x\n\nfine\n{% for r in rows %}\n{{ r }\n", encoding="utf-8")

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:5: "):
        Templates(tmp_path).check()


def test_typo_in_a_variable_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    path = tmp_path / "en" / "daily.txt"
    path.write_text("Subject: {{ sender }}\n\nline 3\n{{ destinatons }}\n", encoding="utf-8")
    templates = Templates(tmp_path)

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:4: .*'destinatons'"):
        templates.check()
    with pytest.raises(ConfigError, match="destinatons"):
        compose("daily", envelope(), templates)


def test_typo_in_an_attribute_is_caught(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    path = tmp_path / "en" / "crossing.txt"
    path.write_text("Subject: x\n\n{{ crossing.limt }}\n", encoding="utf-8")

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: .*limt"):
        Templates(tmp_path).check()


def test_template_without_subject_line_is_refused(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    path = tmp_path / "en" / "crossing.txt"
    path.write_text("Hello {{ sender }}\n\nbody\n", encoding="utf-8")

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: expected 'Subject: "):
        Templates(tmp_path).check()


def test_missing_template_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="template directory not found"):
        Templates(tmp_path / "nope").check()


def test_template_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "zh-TW").mkdir()
    (tmp_path / "zh-TW" / "daily.txt").write_bytes("Subject: 您好\n\n".encode("big5"))

    with pytest.raises(ConfigError, match=re.escape("zh-TW/daily.txt: template is not UTF-8")):
        Templates(tmp_path).check()


# -- header injection ---------------------------------------------------------------

GOOD = [
    "a@b.example",
    "alice@nthu.edu.tw",
    "user@nthu.edu.tw.evil.example",
    "first.last+tag@mail.example.org",
    "o'brien@example.ie",
    "x!#$%&'*/=?^_`{|}~-@example.com",
    "a@xn--fiqs8s.example",
    "a@localhost",
    "A@B.EXAMPLE",
    "a" * 64 + "@example.com",
    "a@" + ".".join(["b" * 63] * 3) + "." + "c" * 61,  # 253 characters
]
BAD = [
    "",
    "a",
    "@b.example",
    "a@",
    "a@b.example\r\nBcc: x@y.example",
    "a@b.example\nBcc: x@y.example",
    "a@b.example\r",
    "a@b.example>",
    "<a@b.example>",
    "Alice <a@b.example>",
    '"a b"@c.example',
    '"a"@c.example',
    "a b@c.example",
    "a@b.example ",
    " a@b.example",
    "a\t@b.example",
    "a@b.example,c@d.example",
    "a@b.example;c@d.example",
    "a@b.example:25",
    "a(comment)@b.example",
    "a\\@b.example",
    "a@[127.0.0.1]",
    "a@@b",
    "a@b@c.example",
    "a@b.example\x00",
    "a\x01@b.example",
    "a\x7f@b.example",
    "a" * 65 + "@example.com",
    "a@-b.example",
    "a@b-.example",
    "a@b..example",
    "a@.b.example",
    "a@b.example.",
    "a@b_c.example",
    "a@" + "b" * 64 + ".example",
    "a@" + ".".join(["b" * 63] * 3) + "." + "c" * 62,  # 254 characters
    ".a@b.example",
    "a.@b.example",
    "a..b@c.example",
    "ä@b.example",
    "a@bücher.example",
    "a@b.example\u2028",
]


@pytest.mark.parametrize("text", GOOD)
def test_safe_address_accepts(text: str) -> None:
    assert safe_address(text) == text


@pytest.mark.parametrize("text", BAD)
def test_safe_address_refuses(text: str) -> None:
    assert safe_address(text) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"from_addr": "postmaster@nthu.edu.tw\r\nBcc: x@evil.example"},
        {"reply_to": "mailadm@nthu.edu.tw>"},
        {"to": ["alice@nthu.edu.tw", "a@b.example,c@d.example"]},
        {"cc": ['"a b"@c.example']},
        {"to": ["a@b.example\nRCPT TO:<x@evil.example>"]},
    ],
)
def test_compose_refuses_an_unsafe_address(changes: dict[str, Any]) -> None:
    env = envelope(**changes)

    for kind in KINDS:
        with pytest.raises(ValueError, match=r"unsafe \w+ address '"):
            compose(kind, env)


def test_compose_refuses_no_recipient_unknown_language_and_naive_time() -> None:
    with pytest.raises(ValueError, match="To address"):
        compose("crossing", envelope(to=[]))
    with pytest.raises(ValueError, match="unknown language 'zh-CN'"):
        compose("crossing", envelope("zh-CN"))
    with pytest.raises(ValueError, match="timezone-aware"):
        compose_crossing(envelope(), ALICE, WARN, Templates(), NOW.replace(tzinfo=None))


@pytest.mark.parametrize("language", LANGUAGES)
def test_sender_with_line_breaks_cannot_make_a_header(language: str) -> None:
    day = replace(ALICE, sender="mallory\r\nBcc: victim@evil.example\rX-Evil: 1\x00\u202e")

    raw, parsed = roundtrip(compose_crossing(envelope(language), day, WARN, Templates(), NOW))
    head = raw.partition(b"\r\n\r\n")[0]

    assert "Bcc" not in parsed
    assert "X-Evil" not in parsed
    assert not re.search(rb"^(Bcc|X-Evil):", head, re.MULTILINE | re.IGNORECASE)
    assert "mallory Bcc: victim@evil.example X-Evil: 1 " in subject_of(parsed)
    assert not any(c in subject_of(parsed) for c in "\r\n\x00\u202e")


def test_blank_line_in_a_sender_ends_the_subject_but_makes_no_header() -> None:
    day = replace(ALICE, sender="mallory\n\nBcc: victim@evil.example")

    raw, parsed = roundtrip(compose_crossing(envelope(), day, WARN, Templates(), NOW))

    assert "Bcc" not in parsed
    assert not re.search(rb"^Bcc:", raw.partition(b"\r\n\r\n")[0], re.MULTILINE | re.I)
    assert subject_of(parsed) == "[mailtally] mallory"
    assert body_of(parsed).startswith("Bcc: victim@evil.example sent more than 200")


def test_subject_template_over_several_lines_is_joined(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "crossing.txt").write_text(
        "Subject: Limit\n  {{ crossing.limit }}\r\tpassed\n\nbody\n", encoding="utf-8"
    )

    _, parsed = roundtrip(compose("crossing", envelope(), Templates(tmp_path)))

    assert subject_of(parsed) == "Limit 200 passed"
    assert body_of(parsed) == "body\n"


# -- a real SMTP server ---------------------------------------------------------------


class Sink:
    """aiosmtpd handler that keeps every envelope it is given."""

    def __init__(self) -> None:
        self.envelopes: list[SmtpEnvelope] = []

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: SmtpEnvelope
    ) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


@pytest.mark.parametrize("language", LANGUAGES)
def test_smtp_server_takes_the_message(sink: tuple[Sink, int], language: str) -> None:
    handler, port = sink
    msg = compose("crossing", envelope(language))

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        refused = smtp.send_message(msg)

    assert refused == {}
    [got] = handler.envelopes
    assert got.mail_from == "postmaster@nthu.edu.tw"
    assert got.rcpt_tos == ["alice@nthu.edu.tw", "admin1@cc.nthu.edu.tw", "admin2@cc.nthu.edu.tw"]
    assert "SMTPUTF8" not in got.mail_options
    assert isinstance(got.content, bytes)
    parsed = email.message_from_bytes(got.content, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Message-ID"] == msg["Message-ID"]
    assert subject_of(parsed) == msg["Subject"]
    assert body_of(parsed) == body_of(msg)
    assert "  676         2       214       17         9        1   433       215\n" in (
        body_of(parsed)
    )
