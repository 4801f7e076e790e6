"""The report mail: composed from an ingested store, parsed back, mailed by the CLI."""

from __future__ import annotations

import email
import email.policy
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import DATA, report, run_cli, stamp, utc, write_log
from mailtally.report import REPORT_COLUMNS, Report, build_report
from mailtally.reportmail import MAX_DETAILS, ReportRequest, compose_report_mail
from mailtally.store import DetailRecord, open_reader
from smtpsink import Sink

SINCE, UNTIL = "2026-12-01", "2026-12-05"
ASKED = datetime(2026, 12, 5, 9, 30, 0, tzinfo=ZoneInfo("Asia/Taipei"))
FROM = "postmaster@campus.example"
TOTAL = {"en": "Total", "zh-TW": "總計"}
NOT_SHOWN = {
    "en": "{n} more delivery records not shown; ask for a shorter range.",
    "zh-TW": "另有 {n} 筆遞送紀錄未列出；請縮短查詢期間後再查詢。",  # noqa: RUF001
}
SHOWING = {
    "en": "Showing the first 10 of 44 delivery records.",
    "zh-TW": "以下列出全部 44 筆遞送紀錄中最早的 10 筆。",
}
DETAIL_HEADER = ("No.  ", "編號  ")
EVIL = "<script>alert(1)</script>"


@dataclass(frozen=True)
class Scenario:
    db: Path
    config: Path


def _ingest(tmp: Path, lines: list[str]) -> Scenario:
    config = tmp / "mailtally.yaml"
    db = tmp / "tally.db"
    config.write_text(f"timezone: UTC\ndatabase: {db}\n", encoding="utf-8")
    # The stamps carry no year: the file's mtime makes them 2026.
    log = write_log(tmp / "mail.log", lines, mtime=utc(2026, 12, 4, 0, 0, 0))
    run_cli("ingest", "--config", config, log)
    return Scenario(db, config)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    lines = (DATA / "scenario" / "mail.log").read_text(encoding="utf-8").splitlines()
    return _ingest(tmp_path_factory.mktemp("scenario"), lines)


def _report(db: Path, sender: str, details: bool = True) -> Report:
    store = open_reader(db)
    try:
        return build_report(
            store, sender, date.fromisoformat(SINCE), date.fromisoformat(UNTIL), UTC, details
        )
    finally:
        store.close()


def _request(language: str, address: str = "alice@campus.example") -> ReportRequest:
    since, until = date.fromisoformat(SINCE), date.fromisoformat(UNTIL)
    return ReportRequest(address, since, until, "203.0.113.9", language, ASKED)


def _compose(
    rep: Report, language: str, max_details: int = MAX_DETAILS, address: str | None = None
) -> EmailMessage:
    """Compose (to the sender, by default), serialise and parse back, as a client sees it."""
    request = _request(language, address or rep.sender)
    msg = compose_report_mail(rep, request, FROM, None, "relay1.campus.example", max_details)
    return _parse(msg.as_bytes())


def _parse(data: bytes) -> EmailMessage:
    parsed: EmailMessage = email.message_from_bytes(  # type: ignore[assignment]
        data, policy=email.policy.default
    )
    return parsed


def _parts(msg: EmailMessage) -> tuple[str, str]:
    assert msg.get_content_type() == "multipart/alternative"
    plain, html = msg.iter_parts()
    assert (plain.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert plain.get_content_charset() == html.get_content_charset() == "utf-8"
    # Encoded bodies keep the CRLF line ends of the wire; a mail client shows lines.
    return tuple(p.get_content().replace("\r\n", "\n") for p in (plain, html))  # type: ignore[return-value]


class _Tables(HTMLParser):
    """Every <table> as rows of (tag, style, text) cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, str, str]]]] = []
        self.tags: list[str] = []
        self._cell: tuple[str, str, list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in {"td", "th"}:
            self._cell = (tag, dict(attrs).get("style") or "", [])

    def handle_endtag(self, tag: str) -> None:
        if tag in {"td", "th"} and self._cell is not None:
            name, style, text = self._cell
            self.tables[-1][-1].append((name, style, "".join(text)))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[2].append(data)


def _tables(html: str) -> _Tables:
    parser = _Tables()
    parser.feed(html)
    parser.close()
    return parser


def _texts(row: list[tuple[str, str, str]]) -> list[str]:
    return [text for _, _, text in row]


def _detail_cells(d: dict[str, Any]) -> list[str]:
    """A `report --format json` detail in the mail's column order."""
    time = datetime.fromisoformat(d["time"]).strftime("%Y-%m-%d %H:%M:%S")
    fields = (d["sender_ip"], d["relay"], time, d["queue_id"], d["recipient"], d["status"])
    return [str(d["no"]), *fields, d["response"]]


@pytest.mark.parametrize(
    ("language", "sender"),
    [("en", "alice@campus.example"), ("zh-TW", "carol@campus.example")],
)
def test_both_parts_show_every_day_the_total_and_the_details_of_report_json(
    scenario: Scenario, language: str, sender: str
) -> None:
    expected = report(scenario.db, scenario.config, sender, SINCE, UNTIL, "--details")
    msg = _compose(_report(scenario.db, sender), language)
    text, html = _parts(msg)

    counts = [[d["date"], *(str(d[c]) for c in REPORT_COLUMNS)] for d in expected["days"]]
    counts.append([TOTAL[language], *(str(expected["total"][c]) for c in REPORT_COLUMNS)])
    assert len(counts) == 6  # five days, zeros included, and the total
    lines = text.splitlines()
    for row in counts:
        assert [line.split() for line in lines if line.split()[:1] == row[:1]] == [row]
    summary, details = _tables(html).tables[1:]
    assert [_texts(r) for r in summary[1:]] == counts
    assert all("text-align:right" in style for r in summary[1:] for _, style, _ in r[1:])

    assert expected["details"]
    assert [_texts(r) for r in details[1:]] == [_detail_cells(d) for d in expected["details"]]
    assert _text_details(text) == [_detail_cells(d) for d in expected["details"]]


def _text_details(text: str) -> list[list[str]]:
    """The text part's detail table, cut into cells where its header's columns start."""
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith(DETAIL_HEADER))
    header = _screen(lines[top])
    starts = [0] + [
        i for i in range(2, len(header)) if header[i - 2 : i] == [" ", " "] != [header[i]] * 2
    ]
    rows = []
    for line in lines[top + 1 :]:
        if not line:
            break
        screen = _screen(line)
        ends = [*starts[1:], len(screen)]
        rows.append(["".join(screen[a:b]).strip() for a, b in zip(starts, ends, strict=True)])
    return rows


def _screen(line: str) -> list[str]:
    """The line as terminal columns: a wide character takes two, the second one empty."""
    out = []
    for c in line:
        out += [c, ""] if unicodedata.east_asian_width(c) in "WF" else [c]
    return out


@pytest.mark.parametrize("language", ["en", "zh-TW"])
def test_headers_and_encoding_are_safe_for_any_smtp_server(
    scenario: Scenario, language: str
) -> None:
    composed = compose_report_mail(
        _report(scenario.db, "erin@campus.example"),
        _request(language, "erin@campus.example"),
        FROM,
        "help@campus.example",
        "relay1.campus.example",
    )
    data = composed.as_bytes()
    assert data.isascii()
    assert max(len(line) for line in data.split(b"\r\n")) <= 76
    msg = _parse(data)
    assert msg["From"] == FROM
    assert msg["To"] == "erin@campus.example"
    assert msg["Reply-To"] == "help@campus.example"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Content-Language"] == language
    assert msg["Message-ID"].endswith("@campus.example>")
    assert msg["Date"].datetime.tzinfo is not None
    assert "erin@campus.example" in msg["Subject"]
    assert "2026-12-01" in msg["Subject"]
    raw_subject = data.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0]
    assert (b"=?utf-8?" in raw_subject) == (language == "zh-TW")
    for part in msg.iter_parts():
        assert part["Content-Transfer-Encoding"] in {"7bit", "quoted-printable", "base64"}


def test_html_is_one_self_contained_document(scenario: Scenario) -> None:
    _, html = _parts(_compose(_report(scenario.db, "alice@campus.example"), "en"))
    tables = _tables(html)
    assert not {"script", "style", "link", "img", "iframe", "object", "form"} & set(tables.tags)
    assert "http:" not in html
    assert "https:" not in html
    assert "src=" not in html
    assert html.startswith("<!DOCTYPE html>")
    assert "=&#34;" not in html  # an attribute the template meant, escaped by mistake
    assert 'style="background:' in html  # every other detail row shaded
    assert all(cell[0] == "th" for t in tables.tables[1:] for cell in t[0])


def _evil_log() -> list[str]:
    """One message whose remote reply carries markup, a bare CR and terminal escapes."""
    t = stamp(utc(2026, 12, 3, 8, 0, 0))
    reply = f"550 5.7.1 {EVIL}\rBcc: x@evil.example \x1b[31mred\x1b[0m \u202egnp.exe"
    return [
        f"{t} relay1 postfix/smtpd[10]: BADC0DE1: client=web[10.0.0.7]",
        f"{t} relay1 postfix/qmgr[11]: BADC0DE1: from=<mallory@campus.example>, size=1,"
        " nrcpt=1 (queue active)",
        f"{t} relay1 postfix/smtp[12]: BADC0DE1: to=<victim@dest.example>, relay=mx[192.0.2.1]:25,"
        f" delay=1, delays=0/0/0/1, dsn=5.7.1, status=bounced (host mx said: {reply})",
        f"{t} relay1 postfix/qmgr[11]: BADC0DE1: removed",
    ]


def _assert_inert(msg: EmailMessage) -> None:
    text, html = _parts(msg)
    assert msg["Bcc"] is None
    assert all(part["Bcc"] is None for part in msg.iter_parts())
    assert "\r" not in text
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert not [line for line in text.splitlines() if line.lstrip().startswith("Bcc:")]
    assert EVIL in text  # plain text: shown as it was said, harmless
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "\r" not in html
    assert "\x1b" not in html


@pytest.mark.parametrize("language", ["en", "zh-TW"])
def test_a_hostile_reply_from_the_log_is_escaped_and_inert(tmp_path: Path, language: str) -> None:
    store = _ingest(tmp_path, _evil_log())
    rep = _report(store.db, "mallory@campus.example")
    assert rep.details is not None
    assert EVIL in rep.details[0].response
    assert "\r" in rep.details[0].response
    _assert_inert(_compose(rep, language))


def test_a_crlf_in_any_value_never_becomes_a_header(scenario: Scenario) -> None:
    rep = _report(scenario.db, "alice@campus.example")
    assert rep.details is not None
    crlf = f"{EVIL}\r\nBcc: x@evil.example"
    evil = DetailRecord(0.0, crlf, crlf, crlf, crlf, "bounced", f"550 {crlf}\r\n\r\n{crlf}")
    rep = replace(rep, sender="alice\r\nBcc: x@evil.example", details=[evil])
    msg = _compose(rep, "en", address="alice@campus.example")
    _assert_inert(msg)
    assert "\n" not in msg["Subject"]
    assert "Bcc" not in {k for k in msg}


@pytest.mark.parametrize("language", ["en", "zh-TW"])
def test_detail_rows_are_capped_with_the_count_left_out(scenario: Scenario, language: str) -> None:
    rep = _report(scenario.db, "erin@campus.example")
    assert rep.details is not None
    assert len(rep.details) == 44
    text, html = _parts(_compose(rep, language, max_details=10))
    note = NOT_SHOWN[language].format(n=34)
    assert note in text
    assert note in html
    details = _tables(html).tables[2]
    assert [_texts(r)[0] for r in details[1:]] == [str(n) for n in range(1, 11)]
    assert len(_text_details(text)) == 10
    assert SHOWING[language] in text
    assert SHOWING[language] in html

    text, html = _parts(_compose(rep, language, max_details=44))
    assert NOT_SHOWN[language].format(n=0) not in text
    assert "not shown" not in text
    assert "未列出" not in text
    assert len(_tables(html).tables[2]) == 45


@pytest.mark.parametrize("language", ["en", "zh-TW"])
def test_no_detail_section_without_details_and_a_note_when_there_are_none(
    scenario: Scenario, language: str
) -> None:
    heading = {"en": "Detailed logs", "zh-TW": "詳細紀錄"}[language]
    text, html = _parts(_compose(_report(scenario.db, "alice@campus.example", False), language))
    assert heading not in text
    assert heading not in html
    assert len(_tables(html).tables) == 2  # the header block and the summary

    empty = {"en": "No delivery records in this range.", "zh-TW": "這段期間沒有遞送紀錄。"}
    text, html = _parts(_compose(_report(scenario.db, "nobody@campus.example"), language))
    assert heading in text
    assert empty[language] in text
    assert empty[language] in html


def test_bad_requests_are_refused(scenario: Scenario) -> None:
    rep = _report(scenario.db, "alice@campus.example")
    good = _request("en")
    bad = [
        (replace(good, address="a@b.example\r\nBcc: x@evil.example"), FROM, "unsafe to"),
        (replace(good, language="fr"), FROM, "unknown language"),
        (replace(good, asked_at=datetime(2026, 12, 5, 9, 30)), FROM, "timezone-aware"),  # noqa: DTZ001
        (good, "postmaster", "unsafe from"),
    ]
    for request, from_addr, problem in bad:
        with pytest.raises(ValueError, match=problem):
            compose_report_mail(rep, request, from_addr, None, "relay1")


# --- mailtally report --mail ---------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().up()
    yield s
    s.down()


def _mail_config(tmp: Path, scenario: Scenario, port: int, extra: str = "") -> Path:
    path = tmp / "mail.yaml"
    path.write_text(
        f"timezone: UTC\ndatabase: {scenario.db}\n"
        f"notify:\n  smtp: {{host: 127.0.0.1, port: {port}, timeout: 5s}}\n"
        f"  from: {FROM}\n{extra}",
        encoding="utf-8",
    )
    return path


def _mail(config: Path, address: str, *extra: str) -> Any:
    return run_cli(
        "report",
        "--config",
        config,
        "--sender",
        "Alice@Campus.Example",
        "--since",
        SINCE,
        "--until",
        UNTIL,
        "--mail",
        address,
        *extra,
        check=False,
    )


def test_report_mail_is_delivered_with_details(
    tmp_path: Path, scenario: Scenario, sink: Sink
) -> None:
    config = _mail_config(tmp_path, scenario, sink.port)
    proc = _mail(config, "alice@campus.example")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == "report for alice@campus.example mailed to alice@campus.example\n"
    (got,) = sink.wait(1)
    assert (got.mail_from, got.rcpt_tos) == (FROM, ["alice@campus.example"])
    msg = got.message
    assert msg["Content-Language"] == "en"
    text, html = _parts(msg)
    assert "Asked from:  command line" in text
    assert "Detailed logs" in text
    expected = report(scenario.db, config, "alice@campus.example", SINCE, UNTIL, "--details")
    details = _tables(html).tables[2]
    assert [_texts(r) for r in details[1:]] == [_detail_cells(d) for d in expected["details"]]


def test_report_mail_language_from_option_or_notify(
    tmp_path: Path, scenario: Scenario, sink: Sink
) -> None:
    config = _mail_config(tmp_path, scenario, sink.port, "  languages: {campus.example: zh-TW}\n")
    assert _mail(config, "alice@campus.example").returncode == 0
    assert _mail(config, "alice@campus.example", "--language", "en").returncode == 0
    first, second = sink.wait(2)
    assert first.message["Content-Language"] == "zh-TW"
    assert "命令列（系統管理者）" in _parts(first.message)[0]  # noqa: RUF001
    assert second.message["Content-Language"] == "en"


def test_report_mail_smtp_down_is_one_line_and_exit_1(tmp_path: Path, scenario: Scenario) -> None:
    closed = Sink()  # a free port nobody listens on
    proc = _mail(_mail_config(tmp_path, scenario, closed.port), "alice@campus.example")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(
        "mailtally report: report for alice@campus.example not mailed to alice@campus.example: "
        f"127.0.0.1:{closed.port}: "
    )


def test_report_mail_refused_by_the_server_is_exit_1(
    tmp_path: Path, scenario: Scenario, sink: Sink
) -> None:
    sink.replies["alice@campus.example"] = "550 5.1.1 no such user"
    proc = _mail(_mail_config(tmp_path, scenario, sink.port), "alice@campus.example")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "550 no such user" in proc.stderr or "550 5.1.1 no such user" in proc.stderr


@pytest.mark.parametrize(
    "address", ["a@b.example\r\nBcc: x@evil.example", "not-an-address", "<a@b.example>", ""]
)
def test_report_mail_unsafe_address_is_exit_2(
    tmp_path: Path, scenario: Scenario, sink: Sink, address: str
) -> None:
    proc = _mail(_mail_config(tmp_path, scenario, sink.port), address)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("mailtally report: --mail ")
    assert sink.received == []
