"""Journal source: real journal files -> the records the parser gives for the same lines."""

from __future__ import annotations

import json
import logging
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import DATA
from journalfiles import JOURNAL_REMOTE, archive, entry, vacuum, write_entries, write_journal
from mailtally.config import JournalOptions
from mailtally.correlate import COLUMNS, Correlator
from mailtally.errors import SourceError
from mailtally.parse import LineParser, Record, Unparsed
from mailtally.sources.journal import MISSING, JournalSource, journal_missing
from mailtally.store import Position

pytestmark = [
    pytest.mark.journal,
    pytest.mark.skipif(journal_missing() is not None, reason="needs systemd-python"),
    pytest.mark.skipif(not JOURNAL_REMOTE.exists(), reason="needs systemd-journal-remote"),
]

UTC_ZONE = ZoneInfo("UTC")
SCENARIO = (DATA / "scenario" / "mail.log.rfc3339").read_text(encoding="utf-8").splitlines()
LOGGER = "mailtally.sources.journal"

# make(directory, start="oldest", position=None, names=("postfix",)) -> a JournalSource
Make = Callable[..., JournalSource]


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Path]:
    """A journal directory, not made yet; removed afterwards (each file takes 8 MiB)."""
    path = tmp_path / "journal"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sources() -> Iterator[list[JournalSource]]:
    """JournalSources made by a test, closed after it."""
    made: list[JournalSource] = []
    yield made
    for src in made:
        src.close()


@pytest.fixture
def make(sources: list[JournalSource]) -> Make:
    def make(
        directory: Path | None,
        start: str = "oldest",
        position: Position | None = None,
        names: tuple[str, ...] = ("postfix",),
    ) -> JournalSource:
        def lookup(key: str) -> Position | None:
            return position if position is not None and position.source == key else None

        options = JournalOptions(directory=directory, start=start)
        src = JournalSource(options, lookup, UTC_ZONE, names)
        sources.append(src)
        return src

    return make


def parsed(lines: list[str], names: tuple[str, ...] = ("postfix",)) -> list[Record]:
    """What the parser makes of the same lines read from a file."""
    return LineParser(UTC_ZONE, datetime.now(UTC).timestamp(), names).parse_all(list(lines))


def drain(src: JournalSource, limit: int = 100_000) -> list[Record]:
    out: list[Record] = []
    while records := src.read(limit):
        out += records
    return out


def readable(src: JournalSource, timeout: float = 0.0) -> bool:
    return bool(select.select([src.fileno()], [], [], timeout)[0])


def stamped(start: datetime, n: int, qid_base: int = 0xB0000) -> list[str]:
    """n one-line messages (a qmgr ``from=``) one second apart from `start`."""
    return [
        f"{(start + timedelta(seconds=i)).isoformat(timespec='microseconds')} relay1 "
        f"postfix/qmgr[11]: {qid_base + i:X}: from=<s{i}@campus.example>, size=1, nrcpt=1 "
        "(queue active)"
        for i in range(n)
    ]


def counters(records: list[Record]) -> tuple[dict[tuple[str, str], dict[str, int]], list[object]]:
    corr = Correlator(UTC_ZONE)
    corr.feed_all(records)
    batch = corr.take()
    counts = {k: dict(zip(COLUMNS, v, strict=True)) for k, v in batch.counts.items()}
    return counts, list(batch.details)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# truth.json holds the report's columns; recipients (nrcpt) came later.
TRUTH_COLUMNS = ("messages", "auth_rcv", "auth_blk", "sent", "bounced", "deferred", "expired")


def test_journal_counts_exactly_what_the_file_counts(directory: Path, make: Make) -> None:
    write_journal(directory, SCENARIO)
    src = make(directory)
    records = drain(src, limit=500)
    assert records == parsed(SCENARIO)
    assert counters(records) == counters(parsed(SCENARIO))
    truth = json.loads((DATA / "scenario" / "truth.json").read_text(encoding="utf-8"))
    expected = {
        (sender, day): row
        for sender, days in truth["senders"].items()
        for day, row in days.items()
        if any(row.values())  # a reject on a service not in auth_services counts nothing
    }
    got = {
        key: {column: value for column, value in row.items() if column in TRUTH_COLUMNS}
        for key, row in counters(records)[0].items()
    }
    assert got == expected  # what the real Postfix of the scenario did
    assert src.lines == len(SCENARIO)
    assert src.skipped == 0


def test_key_name_and_position(directory: Path, make: Make) -> None:
    write_journal(directory, SCENARIO[:3])
    asked: list[str] = []
    options = JournalOptions(directory=directory, start="oldest")
    src = JournalSource(options, asked.append, UTC_ZONE)
    try:
        assert (asked, src.key, src.name) == (
            [f"journal:{directory}"],
            f"journal:{directory}",
            str(directory),
        )
        assert src.positions() == []
        drain(src)
        [position] = src.positions()
        assert (position.source, position.offset, position.name) == (src.key, 0, str(directory))
        assert str(position.cursor).startswith("s=")
        assert src.positions() == []  # nothing moved since
    finally:
        src.close()


def test_local_journal_key(make: Make) -> None:
    src = make(None, start="now")
    assert (src.key, src.name) == ("journal:local", "local journal")
    assert {p.source for p in src.positions()} <= {"journal:local"}


def test_resume_from_cursor_skips_exactly_what_was_consumed(directory: Path, make: Make) -> None:
    write_journal(directory, SCENARIO)
    first = make(directory)
    head = first.read(400) + first.read(300)
    [position] = first.positions()
    first.close()

    second = make(directory, start="now", position=position)  # the cursor wins over start
    tail = drain(second)
    assert len(head) == 700
    assert head + tail == parsed(SCENARIO)
    [moved] = second.positions()
    assert moved.cursor != position.cursor

    third = make(directory, position=moved)  # the cursor is the last entry: nothing new
    assert drain(third) == []
    assert third.positions() == []


def test_start_now_hands_out_only_later_entries(directory: Path, make: Make) -> None:
    write_journal(directory, SCENARIO[:100])
    src = make(directory, start="now")
    assert drain(src) == []
    [tail] = src.positions()  # where "now" is, kept so that a restart misses nothing
    write_journal(directory, SCENARIO[100:150])
    assert readable(src, timeout=5)
    assert drain(src) == parsed(SCENARIO[:150])[100:]

    restarted = make(directory, start="now", position=tail)
    assert drain(restarted) == parsed(SCENARIO[:150])[100:]
    assert drain(make(directory, start="oldest")) == parsed(SCENARIO[:150])


def test_start_now_on_an_empty_journal_misses_nothing(directory: Path, make: Make) -> None:
    directory.mkdir()
    src = make(directory, start="now")
    assert drain(src) == []
    assert src.positions() == []
    write_journal(directory, SCENARIO[:20])
    assert readable(src, timeout=5)
    assert drain(src) == parsed(SCENARIO[:20])


def test_appended_entries_wake_the_descriptor(directory: Path, make: Make) -> None:
    write_journal(directory, SCENARIO[:10])
    src = make(directory)
    assert drain(src) == parsed(SCENARIO[:10])
    assert not readable(src)
    for start, end in ((10, 60), (60, 61), (61, 300)):
        write_journal(directory, SCENARIO[start:end])  # a second run onto the same file
        assert readable(src, timeout=5)
        assert src.read(1000) == parsed(SCENARIO[:end])[start:]
        assert not readable(src)


def test_limit_keeps_the_descriptor_readable_until_all_is_read(
    directory: Path, make: Make
) -> None:
    write_journal(directory, SCENARIO[:25])
    src = make(directory)
    got: list[Record] = []
    while readable(src):
        got += src.read(10)
    assert got == parsed(SCENARIO[:25])
    assert src.read(10) == []


def test_entry_not_utf8_is_counted_unparsed(directory: Path, make: Make) -> None:
    lines = SCENARIO[:5]
    bad = entry(lines[2], MESSAGE=b"7087E20C3F5: client=caf\xe9[127.0.0.2]")
    write_entries(directory, [entry(lines[0]), entry(lines[1]), bad, entry(lines[3])])
    records = drain(make(directory))
    assert records == [*parsed(lines[:2]), Unparsed("encoding"), *parsed(lines[3:4])]
    corr = Correlator(UTC_ZONE)
    corr.feed_all(records)
    assert corr.stats.unparsed == {"encoding": 1}


def test_only_postfix_entries_are_handed_out(directory: Path, make: Make) -> None:
    base = SCENARIO[3]  # 7087E20C3F5: client=unknown[127.0.0.2]
    write_entries(
        directory,
        [
            entry(base),
            entry(base, SYSLOG_IDENTIFIER="dovecot", MESSAGE="imap-login: Login: user=<a>"),
            entry(base, SYSLOG_IDENTIFIER="postfixadmin"),  # a name sharing the prefix
            entry(base, SYSLOG_IDENTIFIER="postfix-out/smtpd"),  # a second instance
            entry(base, SYSLOG_IDENTIFIER="cron", SYSLOG_FACILITY="9"),  # not asked for
            entry(base, SYSLOG_FACILITY="16"),  # Postfix on local0: the exact match finds it
            entry(base, SYSLOG_IDENTIFIER="postfix/submission/smtpd", SYSLOG_FACILITY="16"),
            entry(base, SYSLOG_IDENTIFIER="postfix/anvil", SYSLOG_FACILITY="16"),  # no counts
            entry(base, SYSLOG_IDENTIFIER="mta/smtpd"),  # another syslog_name, configured below
        ],
    )
    kept = [
        base,
        base.replace("postfix/", "postfix-out/"),
        base,
        base.replace("postfix/", "postfix/submission/"),
    ]
    src = make(directory)
    assert drain(src) == parsed(kept)
    assert src.skipped == 3  # dovecot, postfixadmin and mta/smtpd, all on facility mail

    both = make(directory, names=("postfix", "mta"))
    mta = base.replace("postfix/", "mta/")
    assert drain(both) == parsed([*kept, mta], names=("postfix", "mta"))


def test_lines_without_pid_and_stamps_at_minute_edges(directory: Path, make: Make) -> None:
    lines = [
        "2026-12-03T09:41:59.999999+00:00 relay1 postfix/qmgr[11]: ABCDE1: from=<a@x.example>, "
        "size=1, nrcpt=1 (queue active)",
        "2026-12-03T09:42:00.000000+00:00 relay1 postfix/qmgr: ABCDE2: from=<b@x.example>, "
        "size=1, nrcpt=1 (queue active)",
        "2026-12-03T23:59:59.000001+00:00 relay1 postfix/qmgr[11]: ABCDE3: from=<c@x.example>, "
        "size=1, nrcpt=1 (queue active)",
    ]
    no_syslog_pid = entry(lines[0])
    del no_syslog_pid["SYSLOG_PID"]  # _PID stands in
    write_entries(directory, [no_syslog_pid, entry(lines[1]), entry(lines[2])])
    records = drain(make(directory))
    assert records == parsed(lines)
    assert [r.ts for r in records] == [
        datetime(2026, 12, 3, 9, 41, 59, 999999, UTC).timestamp(),
        datetime(2026, 12, 3, 9, 42, tzinfo=UTC).timestamp(),
        datetime(2026, 12, 3, 23, 59, 59, 1, UTC).timestamp(),
    ]


def test_rotation_and_vacuum_under_the_reader(
    directory: Path,
    make: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    active = write_journal(directory, SCENARIO[:200])
    src = make(directory)
    assert src.read(150) == parsed(SCENARIO)[:150]
    archive(active)  # journald's rotation: rename, then a new active file
    write_journal(directory, SCENARIO[200:300])
    assert readable(src, timeout=5)
    assert src.read(100) == parsed(SCENARIO)[150:250]

    vacuum(directory, keep_files=1)  # deletes the archived file, 250 of 300 read
    assert sorted(p.name for p in directory.iterdir()) == ["remote.journal"]
    assert drain(src) == parsed(SCENARIO)[250:300]
    write_journal(directory, SCENARIO[300:320])
    assert drain(src) == parsed(SCENARIO)[300:320]
    assert warnings(caplog) == []


def test_vacuum_of_the_file_being_read(
    directory: Path,
    make: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    archive(write_journal(directory, SCENARIO[:100]))
    write_journal(directory, SCENARIO[100:200])
    src = make(directory)
    assert src.read(60) == parsed(SCENARIO)[:60]
    vacuum(directory, keep_files=1)  # 60..99 are gone with the file the reader stands in
    assert drain(src) == parsed(SCENARIO[:200])[100:]
    assert warnings(caplog) == []


def test_cursor_of_a_vacuumed_file_goes_on_after_it(
    directory: Path,
    make: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    archive(write_journal(directory, SCENARIO[:100]))
    write_journal(directory, SCENARIO[100:200])
    first = make(directory)
    assert first.read(60) == parsed(SCENARIO)[:60]
    [position] = first.positions()
    first.close()

    vacuum(directory, keep_files=1)  # entries 60..99 are gone with their file
    second = make(directory, position=position)
    assert drain(second) == parsed(SCENARIO[:200])[100:]
    assert warnings(caplog) == [
        f"journal cursor not found, continuing after it cursor={position.cursor}"
    ]


def test_cursor_of_an_emptied_journal_waits_for_new_entries(
    directory: Path,
    make: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    archive(write_journal(directory, SCENARIO[:10]))
    first = make(directory)
    drain(first)
    [position] = first.positions()
    first.close()

    for old in directory.iterdir():  # every file vacuumed away
        old.unlink()
    second = make(directory, position=position)
    assert drain(second) == []
    assert second.positions() == []
    write_journal(directory, SCENARIO[10:20])
    assert readable(second, timeout=5)
    assert drain(second) == parsed(SCENARIO[:20])[10:]
    assert len(warnings(caplog)) == 1  # the cursor, not found once entries came


def test_missing_directory_appearing_later(
    directory: Path,
    make: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    src = make(directory)
    fd = src.fileno()
    assert src.read(100) == []
    assert src.read(100) == []
    write_journal(directory, SCENARIO[:30])
    assert drain(src) == parsed(SCENARIO[:30])
    assert src.fileno() == fd
    write_journal(directory, SCENARIO[30:40])
    assert readable(src, timeout=5)
    assert drain(src) == parsed(SCENARIO[:40])[30:]
    assert warnings(caplog) == [f"journal directory missing, waiting for it name={directory}"]
    assert f"journal readable again name={directory}" in caplog.messages


def test_missing_directory_with_start_now_takes_what_came_after_the_start(
    directory: Path,
    make: Make,
) -> None:
    now = datetime.now(UTC)
    src = make(directory, start="now")
    assert src.read(100) == []
    before, after = stamped(now - timedelta(hours=1), 3), stamped(now + timedelta(minutes=1), 4)
    write_journal(directory, before + after)
    assert drain(src) == parsed(after)


def test_directory_removed_and_made_again(
    directory: Path,
    make: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_journal(directory, SCENARIO[:50])
    src = make(directory)
    fd = src.fileno()
    assert drain(src) == parsed(SCENARIO[:50])
    shutil.rmtree(directory)
    assert src.read(100) == []
    write_journal(directory, SCENARIO[50:80])  # a fresh directory, a fresh file
    assert drain(src) == parsed(SCENARIO[:80])[50:]
    assert src.fileno() == fd
    write_journal(directory, SCENARIO[80:90])
    assert readable(src, timeout=5)
    assert drain(src) == parsed(SCENARIO[:90])[80:]
    assert warnings(caplog)[0] == f"journal directory missing, waiting for it name={directory}"


def test_invalid_stored_cursor_falls_back_to_start(
    directory: Path,
    make: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_journal(directory, SCENARIO[:5])
    bad = Position(f"journal:{directory}", 0, "not a cursor", str(directory))
    assert drain(make(directory, position=bad)) == parsed(SCENARIO[:5])
    assert warnings(caplog) == ["journal cursor invalid, ignoring it cursor=not a cursor"]


def test_without_systemd_python(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The module imports without it (the file source and check-config import it).
    code = "import sys; sys.modules['systemd'] = None; import mailtally.sources.journal as j; "
    code += "print(j.journal_missing())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == MISSING + "\n"
    monkeypatch.setitem(sys.modules, "systemd", None)
    monkeypatch.setitem(sys.modules, "systemd.journal", None)
    assert journal_missing() == MISSING
    options = JournalOptions(directory=tmp_path)
    with pytest.raises(SourceError, match=r"^the journal source needs systemd-python: apt"):
        JournalSource(options, lambda key: None, UTC_ZONE)
