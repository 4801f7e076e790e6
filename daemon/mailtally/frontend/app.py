"""The query frontend as a Flask WSGI app: the form, its checks, and the mailed report.

A request goes through, in order: the client network (before anything else), the
form's CSRF token, the per-client limit, the verification code (used up by any
answer), the fields, the per-address limit; only then is the store read (read-only)
and the report mailed to the address asked for. The page never shows report data.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, g, render_template, request, session
from werkzeug.exceptions import HTTPException

from mailtally.config import Config
from mailtally.correlate import normalise
from mailtally.errors import ConfigError, MailtallyError
from mailtally.frontend.captcha import Codes, Verdict
from mailtally.frontend.i18n import LANGUAGES, NAMES, words
from mailtally.frontend.limits import State
from mailtally.frontend.query import Query, Window, client_of, read_query
from mailtally.frontend.settings import FrontendSettings, frontend_settings, settings_error
from mailtally.notify.outbox import PermanentError, TemporaryError, send_mail
from mailtally.report import REPORT_COLUMNS, build_report
from mailtally.reportmail import ReportRequest, compose_report_mail
from mailtally.store import open_reader

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024  # the form is a few hundred bytes
SECRET_BYTES = 32
MAX_SHOWN = 254  # characters of a refused value shown back in the form
_CODE_WORDS = {
    Verdict.WRONG: "err_code",
    Verdict.EXPIRED: "err_code_expired",
    Verdict.USED: "err_code_used",
    Verdict.INVALID: "err_form",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def load_secret(path: Path) -> bytes:
    """Read the signing key from `path`, making it (0600) on first start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create frontend.secret_file: {exc.strerror}") from exc
    else:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(SECRET_BYTES) + "\n")
        log.info("frontend secret made path=%s", path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read frontend.secret_file: {exc}") from exc
    if len(text) < SECRET_BYTES:
        raise ConfigError(f"{path}: frontend.secret_file: expected at least 32 characters")
    if path.stat().st_mode & 0o077:
        log.warning("frontend secret readable by others path=%s", path)
    return text.encode()


def create_app(
    config: Config,
    settings: FrontendSettings | None = None,
    *,
    config_path: Path | None = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    """Build the WSGI app; `clock` (seconds since the epoch) is replaceable for tests."""
    settings = settings or frontend_settings(config, config_path)
    if not settings.domains:
        raise settings_error("empty; no address could ask for a report", config_path, "domains")
    secret = load_secret(settings.secret_file)
    state = State(settings.state)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret,
        SESSION_COOKIE_NAME="mailtally_form",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.cookie_secure,
        MAX_CONTENT_LENGTH=MAX_BODY,
        MAX_FORM_MEMORY_SIZE=MAX_BODY,
    )
    Frontend(config, settings, Codes(secret, settings.code_ttl, state, clock), state, clock).bind(
        app
    )
    return app


class Frontend:
    """The views; one instance per app."""

    def __init__(
        self,
        config: Config,
        settings: FrontendSettings,
        codes: Codes,
        state: State,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.settings = settings
        self.codes = codes
        self.state = state
        self.clock = clock
        self.tz = config.tz()
        self.hostname = settings.hostname or socket.getfqdn()

    def bind(self, app: Flask) -> None:
        app.before_request(self.admit)
        app.after_request(self.harden)
        app.add_url_rule("/", "form", self.form, methods=["GET"])
        app.add_url_rule("/", "submit", self.submit, methods=["POST"])
        app.add_url_rule("/code.png", "code_image", self.code_image, methods=["GET"])
        app.register_error_handler(HTTPException, self.http_error)
        app.register_error_handler(Exception, self.crash)
        app.extensions["mailtally.frontend"] = self

    # -- every request ------------------------------------------------------------

    def admit(self) -> None:
        """Refuse clients outside the configured networks; pick the page's language."""
        g.lang = self._language()
        client = client_of(
            request.remote_addr, request.headers.getlist("X-Forwarded-For"), self.settings
        )
        if client is None or not self.settings.allows_client(client):
            log.warning("client refused peer=%s client=%s", request.remote_addr, client)
            abort(403)
        g.client = client

    def _language(self) -> str:
        asked = request.values.get("lang")
        if asked in LANGUAGES:
            session["lang"] = asked
            return asked
        kept = session.get("lang")
        return kept if kept in LANGUAGES else self.settings.language

    def harden(self, response: Response) -> Response:
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    # -- views --------------------------------------------------------------------

    def form(self) -> Response:
        window = self.window()
        since = max(window.earliest, window.today - timedelta(days=window.max_days - 1))
        values = {"since": since.isoformat(), "until": window.today.isoformat()}
        return self._form(values, [], 200)

    def submit(self) -> Response:
        form = request.form
        csrf = session.get("csrf")
        if not isinstance(csrf, str) or not hmac.compare_digest(form.get("csrf", ""), csrf):
            return self._form(form, [("err_form", {})], 400)
        rate = self.settings.per_client
        if not self.state.hit("client", str(g.client), rate.count, rate.window, self.clock()):
            return self._message("e429_client", 429)
        verdict = self.codes.check(form.get("token", ""), csrf, form.get("code", ""))
        if verdict is not Verdict.OK:
            log.info("code refused client=%s verdict=%s", g.client, verdict.value)
            return self._form(form, [(_CODE_WORDS[verdict], {})], 400)
        query, problems = read_query(form, self.settings, self.window())
        if query is None:
            return self._form(form, problems, 400)
        rate = self.settings.per_address
        if not self.state.hit("address", query.address, rate.count, rate.window, self.clock()):
            return self._message("e429_address", 429)
        try:
            self.send(query)
        except (TemporaryError, PermanentError, MailtallyError) as exc:
            log.error("report not sent address=%s error=%s", query.address, exc)
            return self._message("e503", 503)
        w = words(g.lang)
        text = w["sent_text"].format(
            since=query.since.isoformat(), until=query.until.isoformat(), address=query.address
        )
        return self._page("message.html", 200, heading=w["sent_title"], text=text, kind="done")

    def code_image(self) -> Response:
        png = self.codes.image(request.args.get("t", ""))
        if png is None:
            abort(404)
        return Response(png, mimetype="image/png")

    # -- the report ---------------------------------------------------------------

    def send(self, query: Query) -> None:
        """Read the report from the store (read-only) and mail it to the address only."""
        # The key the counters are kept under (strip_extension, as `report` does).
        sender = normalise(query.address, self.config.correlator_settings())
        store = open_reader(self.config.database)
        try:
            report = build_report(
                store, sender, query.since, query.until, self.tz, self.settings.details
            )
        finally:
            store.close()
        asked = ReportRequest(
            address=query.address,
            since=query.since,
            until=query.until,
            client_ip=str(g.client),
            language=g.lang,
            asked_at=datetime.fromtimestamp(self.clock(), self.tz),
        )
        notify = self.config.notify
        message = compose_report_mail(
            report, asked, notify.from_addr, notify.reply_to, self.hostname
        )
        send_mail(self.config, message, [query.address])
        log.info(
            "report sent address=%s client=%s since=%s until=%s",
            query.address,
            g.client,
            query.since,
            query.until,
        )

    def window(self) -> Window:
        today = datetime.fromtimestamp(self.clock(), self.tz).date()
        earliest = today - timedelta(days=self.config.details_days - 1)
        return Window(earliest, today, self.settings.max_days)

    # -- pages --------------------------------------------------------------------

    def _form(
        self, values: Any, problems: list[tuple[str, dict[str, object]]], status: int
    ) -> Response:
        w = words(g.lang)
        csrf = session.get("csrf")
        if not isinstance(csrf, str):
            csrf = session["csrf"] = secrets.token_urlsafe(32)
        window = self.window()
        return self._page(
            "form.html",
            status,
            errors=[w[key].format(**args) for key, args in problems],
            csrf=csrf,
            token=self.codes.issue(csrf),
            address=_shown(values.get("address", "")),
            since=_shown(values.get("since", "")),
            until=_shown(values.get("until", "")),
            earliest=window.earliest.isoformat(),
            today=window.today.isoformat(),
            max_days=window.max_days,
            domain=self.settings.domains[0],
            columns=REPORT_COLUMNS,
        )

    def _message(self, key: str, status: int) -> Response:
        w = words(getattr(g, "lang", self.settings.language))
        return self._page(
            "message.html", status, heading=w["error_title"], text=w[key], kind="errors"
        )

    def _page(self, template: str, status: int, **context: Any) -> Response:
        lang = getattr(g, "lang", self.settings.language)
        context.setdefault("heading", None)
        context.setdefault("link", words(lang)["back"])
        html = render_template(
            template, lang=lang, w=words(lang), languages=list(NAMES.items()), **context
        )
        return Response(html, status=status, mimetype="text/html")

    # -- errors -------------------------------------------------------------------

    def http_error(self, exc: HTTPException) -> Response:
        code = exc.code or 500
        key = f"e{code}"
        if key not in words("en"):
            key = "e400" if code < 500 else "e500"  # noqa: PLR2004
        return self._message(key, code)

    def crash(self, exc: Exception) -> Response:
        log.error("request failed path=%s", request.path, exc_info=exc)
        return self._message("e500", 500)


def _shown(value: str) -> str:
    """A field's value as the form shows it again: control characters dropped, cut short."""
    return "".join(c for c in value if c.isprintable())[:MAX_SHOWN]
