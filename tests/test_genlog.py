"""The log generator (bench/genlog.py) and, end to end, mailtally's counts against its truth."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("messages", "auth_rcv", "auth_blk", "sent", "bounced", "deferred", "expired")
SUM_OF = ("auth_blk", "auth_rcv", "bounced", "deferred", "expired", "sent")
NEW_YEAR_START = "2026-12-31T00:00:00+00:00"
HEADERS = {
    "traditional": r"[A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d",
    "postlogd": r"[A-Z][a-z]{2} [0-3]\d \d\d:\d\d:\d\d",
    "rfc3339": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00",
}
SHORT_QID = re.compile(r"[0-9A-F]{8,12}\Z")
LONG_QID = re.compile(
    r"[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10}z[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-y]+\Z"
)


def _load_genlog() -> ModuleType:
    spec = importlib.util.spec_from_file_location("genlog", ROOT / "bench" / "genlog.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["genlog"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


genlog = _load_genlog()


def make(
    out: Path, lines: int, fmt: str = "traditional", seed: int = 1, start: str | None = None
) -> dict[str, Any]:
    params = genlog.Params(
        lines, seed, fmt, start or genlog.DEFAULT_START, 3, genlog.default_days(lines), "UTC"
    )
    return genlog.generate(params, out, out.with_suffix(".json"))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """A 20k-line file and its truth in each format, same seed."""
    base = tmp_path_factory.mktemp("small")
    return {
        fmt: (base / f"{fmt}.log", make(base / f"{fmt}.log", 20_000, fmt))
        for fmt in genlog.FORMATS
    }


# -- an independent reading of the log, by DESIGN.md's rules, to check the model's truth --

_HEAD = re.compile(
    r"(?:([A-Z][a-z]{2}) ([ 0-3]\d) \S+|(\d{4})-(\d\d)-(\d\d)T\S+)"
    r" (\S+) ([^\[\s]+)\[\d+\]: (.*)"
)
_MONTHS = {m: i for i, m in enumerate(genlog.MONTHS, 1)}


def count_by_design(path: Path, first_year: int) -> dict[str, dict[str, dict[str, int]]]:
    """Count a generated log (UTC, starting in December or later of `first_year`)."""
    out: dict[str, dict[str, Counter[str]]] = {}
    sender_of: dict[tuple[str, str, str], str] = {}
    authed: dict[tuple[str, str, str], bool] = {}

    def bump(key: str, day: str, col: str) -> None:
        out.setdefault(key, {}).setdefault(day, Counter())[col] += 1

    for raw in path.read_text(encoding="utf-8").splitlines():
        m = _HEAD.match(raw)
        assert m is not None, raw
        mon, dd, y, mo, d, host, prog, msg = m.groups()
        if mon:  # a year-less stamp: January and later belong to the next year
            month = _MONTHS[mon]
            day = f"{first_year + (month < 6)}-{month:02d}-{int(dd):02d}"
        else:
            day = f"{y}-{mo}-{d}"
        parts = prog.split("/")
        if not parts[0].startswith("postfix") or len(parts) < 2:
            continue
        service = parts[1] if len(parts) > 2 else parts[-1]
        qid, _, rest = msg.partition(": ")
        key = (host, parts[0], qid)
        if "authentication failed: " in msg:
            user = msg.rsplit(", sasl_username=", 1)[1]
            if user != "(unavailable)":
                bump(user.lower(), day, "auth_blk")
        elif msg.startswith("NOQUEUE: reject: ") and service == "submission":
            sender = re.search(r"; from=<([^>]*)>", msg)
            assert sender is not None
            bump(sender.group(1).lower() or "<>", day, "auth_blk")
        elif parts[-1] == "smtpd" and rest.startswith("client="):
            authed[key] = ", sasl_username=" in rest
        elif parts[-1] == "qmgr" and rest.startswith("from=<"):
            sender = rest[6 : rest.index(">")].lower() or "<>"
            if rest.endswith(", status=expired, returned to sender"):
                bump(sender, day, "expired")
            elif key not in sender_of:
                sender_of[key] = sender
                bump(sender, day, "messages")
                if authed.get(key):
                    bump(sender, day, "auth_rcv")
        elif rest.startswith("to=<"):
            status = re.search(r", status=(\w+) ", rest)
            assert status is not None
            bump(sender_of[key], day, status.group(1))
        elif rest == "removed":
            sender_of.pop(key, None)
            authed.pop(key, None)
    return {
        s: {d: {c: row[c] for c in COLUMNS} for d, row in sorted(days.items())}
        for s, days in out.items()
    }


# -- the generator ------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_whatever_the_hash_seed(
    tmp_path: Path, small: dict[str, Any]
) -> None:
    path, _ = small["traditional"]
    again = tmp_path / "again.log"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "genlog.py"),
            "--lines",
            "20000",
            "--seed",
            "1",
            "--format",
            "traditional",
            "--out",
            str(again),
            "--truth",
            str(tmp_path / "again.json"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    assert again.read_bytes() == path.read_bytes()
    assert (tmp_path / "again.json").read_bytes() == path.with_suffix(".json").read_bytes()


def test_another_seed_gives_another_log(tmp_path: Path, small: dict[str, Any]) -> None:
    make(tmp_path / "seed2.log", 20_000, seed=2)
    assert (tmp_path / "seed2.log").read_bytes() != small["traditional"][0].read_bytes()


@pytest.mark.parametrize("fmt", ["traditional", "rfc3339", "postlogd"])
def test_writes_exactly_the_lines_asked_in_the_format_asked(
    fmt: str, small: dict[str, Any]
) -> None:
    path, truth = small[fmt]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == truth["lines"] == 20_000
    header = re.compile(HEADERS[fmt] + r" relay[123] [\w/-]+\[\d+\]: \S")
    assert [x for x in lines if not header.match(x)] == []
    assert sum(truth["line_kinds"].values()) == 20_000


def test_lines_are_in_time_order(small: dict[str, Any]) -> None:
    path, truth = small["rfc3339"]
    stamps = [x.split(" ", 1)[0] for x in path.read_text(encoding="utf-8").splitlines()]
    assert stamps == sorted(stamps)
    assert stamps[0] == truth["first_line"]
    assert stamps[-1] == truth["last_line"]


def test_truth_is_the_same_in_every_format(small: dict[str, Any]) -> None:
    truths = [small[fmt][1]["senders"] for fmt in genlog.FORMATS]
    assert truths[0] == truths[1] == truths[2]


@pytest.mark.parametrize("fmt", ["traditional", "rfc3339", "postlogd"])
def test_truth_agrees_with_an_independent_reading_of_the_log(
    fmt: str, small: dict[str, Any]
) -> None:
    path, truth = small[fmt]
    assert count_by_design(path, 2026) == truth["senders"]


def test_truth_across_new_year_agrees_with_the_log(tmp_path: Path) -> None:
    path = tmp_path / "newyear.log"
    truth = make(path, 20_000, start=NEW_YEAR_START)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("Dec 31 ")
    assert "\nJan  1 " in text
    days = {d for days in truth["senders"].values() for d in days}
    assert {"2026-12-31", "2027-01-01"} <= days
    assert count_by_design(path, 2026) == truth["senders"]
    last = datetime.fromisoformat(truth["last_line"]).timestamp()
    assert int(last) < path.stat().st_mtime <= last + 1


def test_truth_is_internally_consistent(small: dict[str, Any]) -> None:
    truth = small["traditional"][1]
    for sender, days in truth["senders"].items():
        assert sender == sender.lower()
        finished = sum(r["sent"] + r["bounced"] + r["expired"] for r in days.values())
        assert finished <= truth["recipients"].get(sender, 0), sender
        for day, row in days.items():
            date.fromisoformat(day)
            assert set(row) == set(COLUMNS)
            assert 0 <= row["auth_rcv"] <= row["messages"], (sender, day)
            assert any(row.values())
    kinds = truth["line_kinds"]
    total = Counter[str]()
    for days in truth["senders"].values():
        for row in days.values():
            total.update(row)
    assert total["messages"] <= kinds["qmgr_from"]
    assert (total["sent"], total["bounced"], total["deferred"], total["expired"]) == (
        kinds["sent"],
        kinds["bounced"],
        kinds["deferred"],
        kinds["expired"],
    )


def test_counts_cover_every_column_the_heavy_sender_and_the_null_sender(
    small: dict[str, Any],
) -> None:
    senders = small["traditional"][1]["senders"]
    assert 300 <= len(senders) <= 10_000
    totals = Counter[str]()
    for days in senders.values():
        for row in days.values():
            totals.update(row)
    assert all(totals[c] > 0 for c in COLUMNS), totals
    heavy = senders[genlog.HEAVY]
    full_days = sorted(heavy)[:-1]  # the file starts at midnight and ends during a day
    assert len(full_days) >= 2
    assert all(heavy[d]["messages"] > 200 for d in full_days), heavy
    assert "<>" in senders
    assert any("@" not in s and s != "<>" for s in senders)  # a bare SASL login name


def test_line_mix_has_what_a_real_multi_relay_log_has(small: dict[str, Any]) -> None:
    text = small["traditional"][0].read_text(encoding="utf-8")
    lines = text.splitlines()
    hosts = {x.split()[3] for x in lines}
    assert hosts == {"relay1", "relay2", "relay3"}
    for needle in (
        "postfix/submission/smtpd[",
        "postfix/submissions/smtpd[",
        "postfix/relay/smtp[",
        "postfix/error[",
        "postfix-out/smtp[",
        "postfix/lmtp[",
        "postfix/virtual[",
        "postfix/pipe[",
        "postfix/local[",
        "postfix/postscreen[",
        "postfix/anvil[",
        "postfix/bounce[",
        "postfix/pickup[",
        ", sasl_method=",
        "sasl_username=(unavailable)",
        "status=expired, returned",
        "delivery temporarily suspended",
        "NOQUEUE: reject: RCPT from",
        "Sender address rejected: not owned by user",
        "lost connection after",
        " orig_to=<",
        "conn_use=",
        "from=<>, size=",
    ):
        assert needle in text, needle
    removed = Counter[tuple[str, str]]()
    for x in lines:
        if x.endswith(": removed"):
            f = x.split()
            removed[f[3], f[5].rstrip(":")] += 1
    qids = {q for _, q in removed}
    assert any(SHORT_QID.match(q) for q in qids)
    assert any(LONG_QID.match(q) for q in qids)
    assert all(SHORT_QID.match(q) or LONG_QID.match(q) for q in qids)
    assert max(removed.values()) >= 2  # a queue id used again after "removed"
    per_qid = Counter(q for _, q in removed)
    assert max(per_qid.values()) >= 2  # the same queue id on two relays
    assert re.search(r"from=<[^>]*[A-Z][^>]*>, size=", text)  # a sender in mixed case


def test_gzip_output_holds_the_same_log(tmp_path: Path, small: dict[str, Any]) -> None:
    make(tmp_path / "x.log.gz", 20_000)
    with gzip.open(tmp_path / "x.log.gz") as f:
        assert f.read() == small["traditional"][0].read_bytes()


# -- end to end: mailtally ingest + report against the truth --------------------------------

E2E_LINES = 50_000
CLI_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "daemon"), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
}


def mailtally(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailtally", *args],
        capture_output=True,
        text=True,
        env=CLI_ENV,
        timeout=900,
        check=False,
    )


def pick_senders(truth: dict[str, Any], log: Path, n: int = 30) -> list[str]:
    """The heavy sender, <>, the busiest, the most blocked, some expired, bounced, odd ones."""
    senders = truth["senders"]

    def top(col: str, k: int) -> list[str]:
        ranked = sorted(senders, key=lambda s: (-sum(r[col] for r in senders[s].values()), s))
        return ranked[:k]

    mixed = re.findall(r"from=<([^>]*[A-Z][^>]*)>, size=", log.read_text(encoding="utf-8"))
    picks = [
        genlog.HEAVY,
        "<>",
        *top("messages", 8),
        *top("auth_blk", 4),
        *top("expired", 3),
        *top("bounced", 3),
        *top("deferred", 2),
        *sorted({m.lower() for m in mixed})[:2],
        *[s for s in sorted(senders) if "+" in s][:1],
        *[s for s in sorted(senders) if s.startswith(("noreply@", "root@"))][:2],
    ]
    rest = sorted(senders)
    picks += rest[:: max(1, len(rest) // n)]
    out: list[str] = []
    for s in picks:
        if s not in out:
            out.append(s)
    return out[:n]


def expected_report(
    truth: dict[str, Any], sender: str, since: date, until: date
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    days = []
    total = Counter[str]()
    d = since
    while d <= until:
        row = dict.fromkeys(COLUMNS, 0) | truth["senders"].get(sender, {}).get(d.isoformat(), {})
        row["sum"] = sum(row[c] for c in SUM_OF)
        days.append({"date": d.isoformat(), **row})
        total.update({k: v for k, v in row.items()})
        d += timedelta(days=1)
    return days, dict(total)


@pytest.fixture(scope="module", params=["traditional", "rfc3339", "postlogd", "new-year"])
def ingested(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, dict[str, Any]]:
    """A 50k-line log ingested into a fresh database: (db, log, truth)."""
    base = tmp_path_factory.mktemp(f"e2e-{request.param}")
    fmt = "traditional" if request.param == "new-year" else request.param
    start = NEW_YEAR_START if request.param == "new-year" else None
    log, db = base / "mail.log", base / "tally.db"
    truth = make(log, E2E_LINES, fmt, start=start)
    if fmt != "rfc3339":  # the year of a year-less stamp comes from the file's mtime
        last = datetime.fromisoformat(truth["last_line"]).timestamp()
        os.utime(log, (last + 1, last + 1))
    cfg = base / "mailtally.yaml"
    cfg.write_text(f"timezone: UTC\ndatabase: {db}\n", encoding="utf-8")
    done = mailtally("ingest", "--config", str(cfg), "--db", str(db), str(log))
    assert done.returncode == 0, done.stderr
    return db, log, truth


def test_report_matches_the_truth_exactly(ingested: tuple[Path, Path, dict[str, Any]]) -> None:
    db, log, truth = ingested
    all_days = sorted({d for days in truth["senders"].values() for d in days})
    since, until = date.fromisoformat(all_days[0]), date.fromisoformat(all_days[-1])
    senders = pick_senders(truth, log)
    assert genlog.HEAVY in senders
    assert "<>" in senders

    def report(sender: str) -> subprocess.CompletedProcess[str]:
        return mailtally(
            "report",
            "--db",
            str(db),
            "--format",
            "json",
            "--sender",
            sender,
            "--since",
            since.isoformat(),
            "--until",
            until.isoformat(),
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(report, senders))
    wrong = []
    for sender, done in zip(senders, results, strict=True):
        assert done.returncode == 0, (sender, done.stderr)
        got = json.loads(done.stdout)
        days, total = expected_report(truth, sender, since, until)
        got_days = [{k: row[k] for k in ("date", "sum", *COLUMNS)} for row in got["days"]]
        got_total = {k: got["total"][k] for k in ("sum", *COLUMNS)}
        if got_days != days or got_total != total:
            wrong.append((sender, got_days, days))
    assert wrong == [], f"{len(wrong)} of {len(senders)} senders differ; first: {wrong[0]}"
