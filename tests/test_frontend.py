"""The query frontend: every rule of the form over HTTP, the mail at a real SMTP sink.

The app runs through Flask's test client against a real store (made by `mailtally
ingest` from log lines), a real state file and an aiosmtpd sink on loopback; one test
serves it with waitress on 127.0.0.1 and talks to it over a socket.
"""

from __future__ import annotations

import hashlib
import http.cookiejar
import io
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, free_port, run_cli, stamp
from flask import Flask
from flask.testing import FlaskClient
from mailtally.config import load_config
from mailtally.errors import ConfigError
from mailtally.frontend import create_app, frontend_settings
from mailtally.frontend.captcha import Codes
from mailtally.frontend.i18n import LANGUAGES, words
from mailtally.frontend.limits import State
from mailtally.frontend.query import Window, check_address, check_dates, client_of
from mailtally.frontend.settings import FrontendSettings, parse_rate
from PIL import Image
from smtpsink import Sink

SENDER = "alice@cs.nthu.edu.tw"
TODAY = datetime.now(UTC).date()


def traffic(sender: str, n: int, at: datetime) -> list[str]:
    t = stamp(at, "rfc3339")
    out = []
    for i in range(n):
        qid = f"{0xA0000 + i + int(at.timestamp()) % 1000 * 100:X}"
        out += [
            f"{t} relay1 postfix/smtpd[10]: {qid}: client=web.campus.example[10.0.0.5]",
            f"{t} relay1 postfix/qmgr[11]: {qid}: from=<{sender}>, size=900, nrcpt=1"
            " (queue active)",
            f"{t} relay1 postfix/smtp[12]: {qid}: to=<bob@dest.example>, relay=mx[192.0.2.1]"
            ":25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)",
            f"{t} relay1 postfix/qmgr[11]: {qid}: removed",
        ]
    return out


@dataclass
class Setup:
    tmp: Path
    cfg: Path
    db: Path
    sink: Sink
    now: list[float] = field(default_factory=lambda: [time.time()])

    def write(self, frontend: str = "", extra: str = "") -> Path:
        self.cfg.write_text(
            f"timezone: UTC\ndatabase: {self.db}\nsources: [{{file: {self.tmp / 'mail.log'}}}]\n"
            f"notify:\n  smtp: {{host: 127.0.0.1, port: {self.sink.port}, timeout: 5s}}\n"
            "  from: noc@nthu.edu.tw\n  reply_to: help@nthu.edu.tw\n"
            "metrics: {enabled: false}\n"
            f"{extra}"
            "frontend:\n  domains: [nthu.edu.tw]\n"
            f"  secret_file: {self.tmp / 'frontend.key'}\n  state: {self.tmp / 'frontend.db'}\n"
            "  networks: [127.0.0.0/8, '::1/128', 2001:db8::/32]\n"
            "  proxies: [10.9.0.0/16]\n"
            f"{frontend}",
            encoding="utf-8",
        )
        return self.cfg

    def app(self, frontend: str = "", extra: str = "") -> Flask:
        self.write(frontend, extra)
        return create_app(load_config(self.cfg), config_path=self.cfg, clock=lambda: self.now[0])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("store")
    log = tmp / "mail.log"
    noon = datetime.combine(TODAY, datetime.min.time(), UTC).replace(hour=0, minute=30)
    lines = traffic(SENDER, 3, noon) + traffic(SENDER, 2, noon - timedelta(days=2))
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = tmp / "ingest.yaml"
    cfg.write_text("timezone: UTC\nmetrics: {enabled: false}\n", encoding="utf-8")
    run_cli("ingest", "--config", cfg, "--db", tmp / "tally.db", log)
    return tmp / "tally.db"


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().up()
    yield s
    s.down()


@pytest.fixture
def setup(tmp_path: Path, store: Path, sink: Sink) -> Setup:
    return Setup(tmp_path, tmp_path / "mailtally.yaml", store, sink)


@pytest.fixture
def app(setup: Setup) -> Iterator[Flask]:
    made = setup.app()
    yield made
    made.extensions["mailtally.frontend"].state.close()


def fields(html: str) -> dict[str, str]:
    found = dict(re.findall(r'name="(csrf|token|lang)" value="([^"]*)"', html))
    assert set(found) == {"csrf", "token", "lang"}, html
    return found


def answer(app: Flask, token: str) -> str:
    codes: Codes = app.extensions["mailtally.frontend"].codes
    issued = codes.read(token)
    assert issued is not None
    return codes.code(issued.nonce)


def submit(app: Flask, client: FlaskClient, lang: str = "en", **values: str) -> tuple[int, str]:
    page = client.get(f"/?lang={lang}")
    form = fields(page.get_data(as_text=True))
    data = {
        **form,
        "address": SENDER,
        "since": (TODAY - timedelta(days=6)).isoformat(),
        "until": TODAY.isoformat(),
        "code": answer(app, form["token"]),
    }
    data.update(values)
    resp = client.post("/", data=data)
    return resp.status_code, resp.get_data(as_text=True)


def test_form_has_every_field_defaults_to_the_past_month_and_needs_no_javascript(
    app: Flask,
) -> None:
    resp = app.test_client().get("/")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200
    for name in ("address", "since", "until", "code", "csrf", "token", "lang"):
        assert f'name="{name}"' in html
    assert 'type="reset"' in html
    assert 'type="submit"' in html
    assert "<script" not in html
    assert f'name="since" value="{(TODAY - timedelta(days=30)).isoformat()}"' in html
    assert f'name="until" value="{TODAY.isoformat()}"' in html
    assert f'max="{TODAY.isoformat()}"' in html
    assert "Auth_blk" in html
    assert "Deferred" in html
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert "HttpOnly" in resp.headers["Set-Cookie"]
    assert "SameSite=Strict" in resp.headers["Set-Cookie"]


def test_language_switch_changes_the_whole_page_and_is_kept(app: Flask) -> None:
    client = app.test_client()
    zh = client.get("/?lang=zh-TW").get_data(as_text=True)
    assert '<html lang="zh-TW">' in zh
    for key in ("title", "address", "since", "until", "code", "reset", "submit", "help_title"):
        assert words("zh-TW")[key] in zh
    assert words("en")["submit"] not in zh
    again = client.get("/").get_data(as_text=True)
    assert words("zh-TW")["submit"] in again
    assert words("en")["submit"] in client.get("/?lang=en").get_data(as_text=True)
    assert '<html lang="en">' in client.get("/?lang=xx%0d%0a").get_data(as_text=True)


def test_translations_have_the_same_keys() -> None:
    assert set(words("en")) == set(words("zh-TW"))
    assert LANGUAGES == ("en", "zh-TW")


def test_report_is_mailed_to_the_address_only_and_the_page_shows_no_data(
    app: Flask, setup: Setup
) -> None:
    status, html = submit(app, app.test_client(), address="Alice@CS.NTHU.edu.tw")
    assert status == 200, html
    assert f"sent to {SENDER}" in html
    assert "bob@dest.example" not in html
    (got,) = setup.sink.wait(1)
    assert got.rcpt_tos == [SENDER]
    msg = got.message
    assert msg["To"] == SENDER
    assert msg["Cc"] is None
    assert msg["Bcc"] is None
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html_part = msg.get_body(("html",))
    assert text is not None
    assert html_part is not None
    assert "bob@dest.example" in text.get_content()
    assert "bob@dest.example" in html_part.get_content()
    assert "127.0.0.1" in text.get_content()


def test_report_in_traditional_chinese(app: Flask, setup: Setup) -> None:
    status, html = submit(app, app.test_client(), lang="zh-TW")
    assert status == 200
    assert words("zh-TW")["sent_title"] in html
    (got,) = setup.sink.wait(1)
    assert got.message["Content-Language"] == "zh-TW"


def test_store_is_only_read(app: Flask, setup: Setup) -> None:
    before = hashlib.sha256(setup.db.read_bytes()).hexdigest()
    assert submit(app, app.test_client())[0] == 200
    assert hashlib.sha256(setup.db.read_bytes()).hexdigest() == before
    assert setup.tmp / "frontend.db" != setup.db


BAD_ADDRESSES = [
    "user@nthu.edu.tw.evil.example",
    "user@evil.example?@nthu.edu.tw",
    "user@evil.example@nthu.edu.tw",
    '"user@nthu.edu.tw"@evil.example',
    "user@evilnthu.edu.tw",
    "user@nthu.edu.tw\r\nBcc: mallory@evil.example",
    "user@nthu.edu.tw\n",
    "user@nthu.edu.tw\x00",
    "<user@nthu.edu.tw>",
    "user@nthu.edu.tw>",
    "Alice <user@nthu.edu.tw>",
    "user@nthu.edu.tw, mallory@evil.example",
    "user@[127.0.0.1]",
    "user(comment)@nthu.edu.tw",
    "user @nthu.edu.tw",
    "user@nthu.edu.tw.",
    "@nthu.edu.tw",
    "user@",
    "",
    "a" * 65 + "@nthu.edu.tw",
    "user@nthu.edu.tw%0d%0a",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_address_spoofing_is_refused(address: str) -> None:
    settings = FrontendSettings(domains=["nthu.edu.tw"])
    assert check_address(address, settings)[0] is None


@pytest.mark.parametrize(
    "address",
    ["user@nthu.edu.tw", "User@NTHU.EDU.TW", "x.y+tag@cs.nthu.edu.tw", " u@nthu.edu.tw "],
)
def test_addresses_of_the_domain_and_its_subdomains_are_accepted(address: str) -> None:
    settings = FrontendSettings(domains=["NTHU.edu.tw"])
    assert check_address(address, settings)[0] == address.strip().lower()


@pytest.mark.parametrize(
    "address",
    [
        "user@nthu.edu.tw.evil.example",
        "user@evil.example?@nthu.edu.tw",
        "user@nthu.edu.tw\r\nBcc: mallory@evil.example",
    ],
)
def test_spoofed_address_over_http_sends_nothing(app: Flask, setup: Setup, address: str) -> None:
    status, html = submit(app, app.test_client(), address=address)
    assert status == 400
    assert "Only addresses of nthu.edu.tw" in html or "Enter one mail address" in html
    shown = re.search(r'name="address" value="([^"]*)"', html)
    assert shown is not None
    assert "\r" not in shown.group(1)
    assert "\n" not in shown.group(1)
    time.sleep(0.2)
    assert setup.sink.received == []


def test_crlf_in_other_fields_is_refused(app: Flask, setup: Setup) -> None:
    client = app.test_client()
    assert submit(app, client, since=f"{TODAY}\r\nX-Injected: 1")[0] == 400
    status, html = submit(app, client, code="ABC\r\nDEF")
    assert status == 400
    assert words("en")["err_code"] in html
    status, _ = submit(app, client, lang="en\r\nSet-Cookie: x=1")
    assert status == 200
    assert setup.sink.wait(1)[0].message["Content-Language"] == "en"


WINDOW = Window(earliest=date(2024, 5, 1), today=date(2024, 6, 4), max_days=31)


@pytest.mark.parametrize(
    ("since", "until", "problem"),
    [
        ("2024-06-01", "2024-06-05", "err_future"),
        ("2024-04-30", "2024-05-10", "err_early"),
        ("2024-06-03", "2024-06-01", "err_reversed"),
        ("2024-05-01", "2024-06-01", "err_long"),
        ("2024-6-1", "2024-06-02", "err_date"),
        ("2024-02-30", "2024-06-02", "err_date"),
        ("2024-06-01T00:00", "2024-06-02", "err_date"),
        ("", "2024-06-02", "err_date"),
        ("\uff12\uff10\uff12\uff14-06-01", "2024-06-02", "err_date"),  # fullwidth digits,
    ],
)
def test_dates_out_of_range_are_refused(since: str, until: str, problem: str) -> None:
    dates, found = check_dates(since, until, WINDOW)
    assert dates is None
    assert found is not None
    assert found[0] == problem


def test_dates_at_the_edges_are_accepted() -> None:
    assert check_dates("2024-05-05", "2024-06-04", WINDOW)[0] == (
        date(2024, 5, 5),
        date(2024, 6, 4),
    )
    assert check_dates("2024-06-04", "2024-06-04", WINDOW)[0] is not None
    assert check_dates("2024-05-01", "2024-05-31", WINDOW)[0] is not None


def test_dates_over_http(app: Flask, setup: Setup) -> None:
    client = app.test_client()
    tomorrow = (TODAY + timedelta(days=1)).isoformat()
    status, html = submit(app, client, until=tomorrow)
    assert status == 400
    assert words("en")["err_future"].format(today=TODAY) in html
    status, html = submit(
        app, client, since=TODAY.isoformat(), until=(TODAY - timedelta(1)).isoformat()
    )
    assert status == 400
    assert words("en")["err_reversed"] in html
    early = (TODAY - timedelta(days=35)).isoformat()
    status, html = submit(app, client, since=early)
    assert status == 400
    assert "cannot be before" in html
    status, html = submit(app, client, since=(TODAY - timedelta(days=31)).isoformat())
    assert status == 400
    assert "At most 31 days" in html
    assert setup.sink.received == []


def test_code_cannot_be_replayed(app: Flask, setup: Setup) -> None:
    client = app.test_client()
    form = fields(client.get("/").get_data(as_text=True))
    data = {**form, "address": SENDER, "since": str(TODAY), "until": str(TODAY)}
    data["code"] = answer(app, form["token"]).lower()  # not case-sensitive
    assert client.post("/", data=data).status_code == 200
    again = client.post("/", data=data)
    assert again.status_code == 400
    assert words("en")["err_code_used"] in again.get_data(as_text=True)
    time.sleep(0.2)
    assert len(setup.sink.wait(1)) == 1


def test_replay_is_refused_after_a_restart(setup: Setup) -> None:
    first = setup.app()
    client = first.test_client()
    form = fields(client.get("/").get_data(as_text=True))
    data = {**form, "address": SENDER, "since": str(TODAY), "until": str(TODAY)}
    data["code"] = answer(first, form["token"])
    assert client.post("/", data=data).status_code == 200
    first.extensions["mailtally.frontend"].state.close()
    second = setup.app()
    with second.test_client() as other:
        other.set_cookie("mailtally_form", client.get_cookie("mailtally_form").value)  # type: ignore[union-attr]
        resp = other.post("/", data=data)
    assert resp.status_code == 400
    assert words("en")["err_code_used"] in resp.get_data(as_text=True)
    second.extensions["mailtally.frontend"].state.close()


def test_expired_code_is_refused(app: Flask, setup: Setup) -> None:
    client = app.test_client()
    form = fields(client.get("/").get_data(as_text=True))
    data = {**form, "address": SENDER, "since": str(TODAY), "until": str(TODAY)}
    data["code"] = answer(app, form["token"])
    setup.now[0] += 601
    resp = client.post("/", data=data)
    assert resp.status_code == 400
    assert words("en")["err_code_expired"] in resp.get_data(as_text=True)
    assert app.test_client().get(f"/code.png?t={form['token']}").status_code == 404


def test_wrong_code_uses_the_code_up(app: Flask) -> None:
    client = app.test_client()
    form = fields(client.get("/").get_data(as_text=True))
    data = {**form, "address": SENDER, "since": str(TODAY), "until": str(TODAY), "code": "0000"}
    resp = client.post("/", data=data)
    assert resp.status_code == 400
    assert words("en")["err_code"] in resp.get_data(as_text=True)
    data["code"] = answer(app, form["token"])
    assert words("en")["err_code_used"] in client.post("/", data=data).get_data(as_text=True)


def test_code_of_another_session_and_missing_csrf_are_refused(app: Flask, setup: Setup) -> None:
    mine, theirs = app.test_client(), app.test_client()
    form = fields(theirs.get("/").get_data(as_text=True))
    own = fields(mine.get("/").get_data(as_text=True))
    data = {**own, "token": form["token"], "address": SENDER, "since": str(TODAY)}
    data.update(until=str(TODAY), code=answer(app, form["token"]))
    resp = mine.post("/", data=data)
    assert resp.status_code == 400
    assert words("en")["err_form"] in resp.get_data(as_text=True)
    data = {**own, "csrf": "forged", "address": SENDER, "since": str(TODAY), "until": str(TODAY)}
    data["code"] = answer(app, own["token"])
    assert mine.post("/", data=data).status_code == 400
    assert app.test_client().post("/", data=data).status_code == 400  # no session at all
    assert setup.sink.received == []


def test_code_image_is_a_png_of_the_code(app: Flask) -> None:
    client = app.test_client()
    html = client.get("/").get_data(as_text=True)
    form = fields(html)
    src = re.search(r'<img src="([^"]+)"', html)
    assert src is not None
    assert src.group(1).replace("&amp;", "&") == f"/code.png?t={form['token']}"
    resp = client.get(src.group(1))
    assert resp.status_code == 200
    assert resp.mimetype == "image/png"
    assert resp.headers["Cache-Control"] == "no-store"
    image = Image.open(io.BytesIO(resp.data))
    assert image.size == (240, 80)
    assert client.get("/code.png?t=forged.token").status_code == 404
    assert client.get("/code.png").status_code == 404


@pytest.mark.parametrize(
    ("peer", "forwarded", "status"),
    [
        ("127.0.0.1", None, 200),
        ("::1", None, 200),
        ("2001:db8::5", None, 200),
        ("::ffff:127.0.0.1", None, 200),
        ("192.0.2.7", None, 403),
        ("2001:db9::5", None, 403),
        ("192.0.2.7", "127.0.0.1", 403),  # not from a proxy: the header is ignored
        ("10.9.0.1", "192.0.2.9", 403),
        ("10.9.0.1", "127.0.0.5", 200),
        ("10.9.0.1", "127.0.0.5, 10.9.3.3", 200),
        ("10.9.0.1", "127.0.0.1, 192.0.2.9", 403),  # a client-written hop is not believed
        ("10.9.0.1", "bogus", 403),
        ("10.9.0.1", None, 403),  # the proxy itself is no client
    ],
)
def test_only_configured_networks_may_use_the_form(
    app: Flask, peer: str, forwarded: str | None, status: int
) -> None:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    resp = app.test_client().get("/", headers=headers, environ_base={"REMOTE_ADDR": peer})
    assert resp.status_code == status
    if status == 403:
        assert words("en")["e403"] in resp.get_data(as_text=True)


def test_client_of_reads_forwarded_for_right_to_left() -> None:
    settings = FrontendSettings(domains=["x.example"], proxies=["10.0.0.0/8"])
    assert str(client_of("10.0.0.1", ["198.51.100.1, 10.0.0.2"], settings)) == "198.51.100.1"
    assert str(client_of("10.0.0.1", ["203.0.113.1", "198.51.100.1"], settings)) == "198.51.100.1"
    assert str(client_of("192.0.2.1", ["198.51.100.1"], settings)) == "192.0.2.1"
    assert client_of("garbage", [], settings) is None


def test_rate_limit_per_client_survives_a_restart(setup: Setup) -> None:
    app = setup.app("  per_client: 2/h\n")
    client = app.test_client()
    assert submit(app, client, code="wrong")[0] == 400
    assert submit(app, client)[0] == 200
    status, html = submit(app, client)
    assert status == 429
    assert words("en")["e429_client"] in html
    app.extensions["mailtally.frontend"].state.close()
    app = setup.app("  per_client: 2/h\n")
    assert submit(app, app.test_client())[0] == 429
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "127.0.0.2"
    assert submit(app, other)[0] == 200
    setup.now[0] += 3601
    assert submit(app, app.test_client())[0] == 200
    app.extensions["mailtally.frontend"].state.close()


def test_rate_limit_per_address(setup: Setup) -> None:
    app = setup.app("  per_address: 2/h\n")
    assert submit(app, app.test_client())[0] == 200
    assert submit(app, app.test_client())[0] == 200
    status, html = submit(app, app.test_client(), lang="zh-TW")
    assert status == 429
    assert words("zh-TW")["e429_address"] in html
    assert submit(app, app.test_client(), address="carol@nthu.edu.tw")[0] == 200
    assert len(setup.sink.wait(3)) == 3
    app.extensions["mailtally.frontend"].state.close()


def test_errors_are_friendly_pages_in_the_chosen_language(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = app.test_client()
    resp = client.get("/nothing?lang=zh-TW")
    assert resp.status_code == 404
    assert words("zh-TW")["e404"] in resp.get_data(as_text=True)
    assert client.put("/").status_code == 405

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr("mailtally.frontend.app.build_report", broken)
    status, html = submit(app, client, lang="zh-TW")
    assert status == 500
    assert words("zh-TW")["e500"] in html
    assert "Traceback" not in html
    assert "secret internals" not in html


def test_smtp_down_or_store_missing_is_a_503_page(setup: Setup) -> None:
    app = setup.app()
    setup.sink.down()
    status, html = submit(app, app.test_client())
    assert status == 503
    assert words("en")["e503"] in html
    app.extensions["mailtally.frontend"].state.close()
    setup.sink.up()
    setup.db = setup.tmp / "missing.db"
    app = setup.app()
    status, html = submit(app, app.test_client())
    assert status == 503
    assert "missing.db" not in html
    app.extensions["mailtally.frontend"].state.close()


def test_oversized_request_is_refused(app: Flask) -> None:
    resp = app.test_client().post("/", data={"address": "x" * 20000})
    assert resp.status_code == 413
    assert words("en")["e413"] in resp.get_data(as_text=True)


def test_secret_file_is_made_private_once(app: Flask, setup: Setup) -> None:
    key = setup.tmp / "frontend.key"
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_text()
    setup.app().extensions["mailtally.frontend"].state.close()
    assert key.read_text() == before


@pytest.mark.parametrize(
    ("frontend", "expected"),
    [
        ("  networks: [10.0.0.1/8]\n", "frontend.networks[0]"),
        ("  per_client: ten\n", "frontend.per_client: expected COUNT/PERIOD"),
        ("  colour: blue\n", "frontend.colour: unknown key"),
        ("  listen: nowhere\n", "frontend.listen"),
        ("  language: fr\n", "frontend.language"),
        ("  max_days: 0\n", "frontend.max_days"),
    ],
)
def test_settings_errors_name_the_key_and_line(setup: Setup, frontend: str, expected: str) -> None:
    cfg = setup.write(frontend)
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        frontend_settings(load_config(cfg), cfg)
    line = cfg.read_text().splitlines().index(frontend.rstrip("\n")) + 1
    assert str(info.value).startswith(f"{cfg}:{line}: ")


def test_no_domains_is_refused_at_start(setup: Setup) -> None:
    setup.cfg.write_text("frontend: {networks: [127.0.0.0/8]}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape("frontend.domains: empty")):
        create_app(load_config(setup.cfg), config_path=setup.cfg)


def test_rates_and_defaults() -> None:
    assert parse_rate("10/h").count == 10
    assert parse_rate("10/h").window == 3600
    assert parse_rate("3 / 30m").window == 1800
    with pytest.raises(ValueError, match="COUNT/PERIOD"):
        parse_rate("0/h")
    settings = FrontendSettings()
    assert settings.listen == "127.0.0.1:8080"
    assert settings.max_days == 31
    assert settings.code_ttl == 600
    assert [str(n) for n in settings.networks] == ["127.0.0.0/8", "::1/128"]
    assert settings.state == Path("/var/lib/mailtally/frontend.db")


def test_state_limits_and_used_codes(tmp_path: Path) -> None:
    state = State(tmp_path / "s.db")
    assert state.use_code("n1", expires=100.0, now=50.0)
    assert not state.use_code("n1", expires=100.0, now=60.0)
    assert [state.hit("client", "a", 2, 60.0, t) for t in (0, 1, 2)] == [True, True, False]
    assert state.hit("client", "a", 2, 60.0, 61.0)
    assert state.hit("client", "b", 2, 60.0, 2.0)
    state.close()


# -- the real server -------------------------------------------------------------------


def test_waitress_serves_the_form_and_mails_the_report(setup: Setup) -> None:
    cfg = setup.write()
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailtally.frontend",
            "--config",
            str(cfg),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT / "daemon",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        page = _get(opener, base + "/", proc)
        assert page.headers["Server"] == "mailtally"
        html = page.read().decode()
        form = fields(html)
        img = opener.open(f"{base}/code.png?t={urllib.parse.quote(form['token'])}", timeout=5)
        assert img.headers["Content-Type"] == "image/png"
        secret = (setup.tmp / "frontend.key").read_text().strip().encode()
        codes = Codes(secret, 600, State(setup.tmp / "other.db"), time.time)
        issued = codes.read(form["token"])
        assert issued is not None
        data = {**form, "address": SENDER, "since": str(TODAY - timedelta(days=3))}
        data.update(until=str(TODAY), code=codes.code(issued.nonce))
        resp = opener.open(base + "/", urllib.parse.urlencode(data).encode(), timeout=30)
        assert resp.status == 200
        assert f"sent to {SENDER}" in resp.read().decode()
        (got,) = setup.sink.wait(1)
        assert got.rcpt_tos == [SENDER]
        assert got.message.get_body(("html",)) is not None
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open(base + "/missing", timeout=5)
        assert info.value.code == 404
        assert "Traceback" not in info.value.read().decode()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "Serving on" in out or "listening" in out, out
    assert "Traceback" not in out, out


def _get(opener: urllib.request.OpenerDirector, url: str, proc: subprocess.Popen[str]) -> Any:
    deadline = time.monotonic() + 20
    while True:
        try:
            return opener.open(url, timeout=5)
        except urllib.error.URLError:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"frontend did not start: {out}") from None
            time.sleep(0.1)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    mailtally = Path(sys.executable).with_name("mailtally")
    unit = (ROOT / "contrib" / "systemd" / "mailtally-frontend.service").read_text()
    assert "ExecStart=/usr/local/bin/mailtally frontend --config" in unit
    (tmp_path / "mailtally-frontend.service").write_text(
        unit.replace("/usr/local/bin/mailtally", str(mailtally)), encoding="utf-8"
    )
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "mailtally-frontend.service")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "mailtally" in line] == []


def test_cli_serves_the_frontend_and_check_config_checks_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("frontend:\n  domains: ['not a domain']\n", encoding="utf-8")
    proc = run_cli("check-config", bad, check=False)
    assert proc.returncode == 2
    assert "frontend.domains" in proc.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "f.yaml"
    cfg.write_text(
        f"database: {tmp_path / 'db.sqlite'}\nfrontend:\n  domains: [campus.example]\n"
        f"  secret_file: {tmp_path / 'key'}\n  state: {tmp_path / 'state.db'}\n",
        encoding="utf-8",
    )
    run_cli("ingest", "--config", cfg, ROOT / "tests" / "data" / "scenario" / "mail.log")
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailtally",
            "frontend",
            "--config",
            str(cfg),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
                    break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or child.poll() is not None:
                    raise
                time.sleep(0.1)
        assert "SMTP log query" in page
    finally:
        child.terminate()
        child.wait(timeout=20)
        assert child.stderr is not None
        child.stderr.close()
