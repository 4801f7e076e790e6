"""A real headless browser (Debian's chromium) uses the query form served by waitress.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages ending in NUL on file descriptors 3 and 4), so no websocket library is
needed. The test opens the form, types the address and the code, sets the dates,
presses Submit, and takes screenshots of the filled form, of the answer page and of
the HTML part of the mail that arrived at the SMTP sink; their paths are printed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from mailtally.frontend.captcha import Codes
from mailtally.frontend.limits import State
from smtpsink import Sink
from test_frontend import SENDER, TODAY, Setup, free_port, store  # noqa: F401 - fixture

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium missing (apt install chromium)")


class Browser:
    """Chromium headless with one page, spoken to over the DevTools pipe."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            str(CHROMIUM),
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # tests run as root in a container
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1000,1200",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        # chromium reads commands on fd 3 and writes answers on fd 4 (dash allows fds < 10 only)
        self._log = (profile.parent / "chromium.log").open("wb")
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', "bash", *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
            self.session = attached["sessionId"]
            self.page("Page.enable")
            self.page("Runtime.enable")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError, AssertionError):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self._log.close()

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            got = self._read()
            if got.get("id") == self._next:
                if "error" in got:
                    raise AssertionError(f"{method}: {got['error']}")
                result: dict[str, Any] = got.get("result", {})
                return result
            self.events.append(got)

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, self.session, **params)

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise AssertionError("chromium closed the DevTools pipe")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(line)
        return message

    def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, event in enumerate(self.events):
                if event.get("method") == name:
                    return self.events.pop(i)
            self.events.append(self._read())
        raise AssertionError(f"no {name} within {timeout}s")

    def open(self, url: str) -> None:
        self.events.clear()
        self.page("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.page("Input.insertText", text=text)

    def screenshot(self, path: Path) -> Path:
        data = self.page("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


@pytest.fixture
def server(tmp_path: Path, store: Path) -> Iterator[tuple[str, Setup]]:  # noqa: F811
    sink = Sink().up()
    setup = Setup(tmp_path, tmp_path / "mailtally.yaml", store, sink)
    cfg = setup.write()
    listen = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailtally.frontend", "--config", str(cfg), "--listen", listen],
        cwd=ROOT / "daemon",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://{listen}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(base + "/", timeout=5).close()
            break
        except urllib.error.URLError:
            assert proc.poll() is None, "the frontend exited"
            assert time.monotonic() < deadline, "the frontend did not start"
            time.sleep(0.1)
    yield base, setup
    proc.terminate()
    proc.wait(timeout=10)
    sink.down()


def code_for(setup: Setup, token: str) -> str:
    secret = (setup.tmp / "frontend.key").read_text().strip().encode()
    state = State(setup.tmp / "reader.db")
    try:
        codes = Codes(secret, 600, state, time.time)
        issued = codes.read(token)
        assert issued is not None
        return codes.code(issued.nonce)
    finally:
        state.close()


@pytest.mark.parametrize("lang", ["en", "zh-TW"])
def test_browser_fills_the_form_submits_and_the_mail_renders(
    browser: Browser, server: tuple[str, Setup], tmp_path: Path, lang: str
) -> None:
    base, setup = server
    browser.open(f"{base}/?lang={lang}")
    assert browser.js("document.documentElement.lang") == lang
    loaded = browser.js("document.querySelector('.captcha img').naturalWidth")
    src = browser.js("document.querySelector('.captcha img').src")
    assert loaded == 240, f"the code image did not load: {src}"

    token = browser.js("document.querySelector('input[name=token]').value")
    browser.type_into("#address", SENDER)
    browser.js(f"document.querySelector('#since').value = '{TODAY - timedelta(days=6)}'")
    browser.js(f"document.querySelector('#until').value = '{TODAY}'")
    browser.type_into("#code", code_for(setup, token).lower())
    form_png = browser.screenshot(tmp_path / f"form-{lang}.png")

    browser.events.clear()
    browser.js("document.querySelector('button[type=submit]').click()")
    browser.wait_event("Page.loadEventFired")
    text = browser.js("document.body.innerText")
    assert SENDER in text
    assert browser.js("document.querySelector('.done') !== null"), text
    sent_png = browser.screenshot(tmp_path / f"sent-{lang}.png")

    (got,) = setup.sink.wait(1)
    assert got.rcpt_tos == [SENDER]
    html_part = got.message.get_body(("html",))
    assert html_part is not None
    mail_html = tmp_path / f"mail-{lang}.html"
    mail_html.write_text(html_part.get_content(), encoding="utf-8")
    browser.open(mail_html.as_uri())
    assert "bob@dest.example" in browser.js("document.body.innerText")
    mail_png = browser.screenshot(tmp_path / f"mail-{lang}.png")

    for png in (form_png, sent_png, mail_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000
        print(f"artifact: {png}")  # noqa: T201 - where to look at the screenshots
