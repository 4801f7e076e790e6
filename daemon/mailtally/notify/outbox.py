"""Deliver notices from the store's outbox over SMTP, once each, with retries.

Notices are made in the store (a batch's transaction makes its crossing notices; the
daily job makes the previous day's), so none is lost when the daemon stops. This
thread sends what is due, at most ``notify.max_per_minute``, and records each outcome:

- 2xx: ``sent``. A 5xx reply, or an address that cannot be mailed: ``failed`` or
  ``skipped``, with the reason, never retried.
- SMTP unreachable, a timeout, a 4xx: retried after ``retry.first``, doubling up to
  ``retry.max``, until ``retry.give_up`` after the notice was made.

The window SMTP leaves open: if the process dies after the server accepted a message
and before ``sent`` is committed (a few milliseconds), that notice is sent again after
the restart. Nothing can close it from the client side; the Message-ID stays the same
between the two sends, so a duplicate can at least be recognised.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import threading
import time
from collections import deque
from datetime import date, datetime, timedelta
from datetime import time as daytime
from email.message import EmailMessage
from typing import TYPE_CHECKING

from mailtally.errors import MailtallyError
from mailtally.notify.message import (
    Crossing,
    Envelope,
    SenderDay,
    Templates,
    compose_crossing,
    compose_daily,
    compose_digest,
    safe_address,
)
from mailtally.store import DayRow, Notice, Store, open_store
from mailtally.thresholds import CrossingJudge, Thresholds

if TYPE_CHECKING:
    from mailtally.config import Config

log = logging.getLogger(__name__)

IDLE_WAIT = 5.0  # seconds between looks at the outbox when nothing wakes the thread
BATCH = 20  # notices taken from the store at a time


class TemporaryError(Exception):
    """Worth trying again later: SMTP down, a timeout, a 4xx reply."""


class PermanentError(Exception):
    """Not worth trying again: a 5xx reply."""


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def _permanent(code: int) -> bool:
    return code // 100 == 5  # noqa: PLR2004 - the reply class, RFC 5321 4.2.1


def send_mail(config: Config, message: EmailMessage, recipients: list[str]) -> None:
    """Hand `message` to the configured SMTP server; raise TemporaryError or PermanentError."""
    smtp = config.notify.smtp
    password = smtp.password.get_secret_value() if smtp.password is not None else None
    if smtp.password_file is not None:
        try:
            password = smtp.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise TemporaryError(f"cannot read notify.smtp.password_file: {exc.strerror}") from exc
    try:
        context = ssl.create_default_context(cafile=smtp.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TemporaryError(f"notify.smtp.ca_file: {exc}") from exc
    envelope_from = config.notify.envelope_from or config.notify.from_addr
    try:
        client: smtplib.SMTP
        if smtp.tls:
            client = smtplib.SMTP_SSL(
                smtp.host, smtp.port, smtp.helo, timeout=smtp.timeout, context=context
            )
        else:
            client = smtplib.SMTP(smtp.host, smtp.port, smtp.helo, timeout=smtp.timeout)
        with client:
            if smtp.starttls:
                client.starttls(context=context)
            if smtp.username is not None and password is not None:
                client.login(smtp.username, password)
            refused = client.send_message(message, envelope_from, recipients)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        text = "; ".join(f"{r}: {c} {_text(m)}" for r, (c, m) in exc.recipients.items())
        if all(_permanent(c) for c in codes):
            raise PermanentError(text) from exc
        raise TemporaryError(text) from exc
    except smtplib.SMTPResponseException as exc:
        text = f"{exc.smtp_code} {_text(exc.smtp_error)}"
        if _permanent(exc.smtp_code) and not isinstance(exc, smtplib.SMTPAuthenticationError):
            raise PermanentError(text) from exc
        raise TemporaryError(text) from exc  # 4xx, or a login problem the admin will fix
    except (smtplib.SMTPException, OSError) as exc:  # OSError covers timeouts
        raise TemporaryError(f"{smtp.host}:{smtp.port}: {exc}") from exc
    for rcpt, (code, reply) in refused.items():  # some recipients (admin copies) refused
        log.warning("notice recipient refused rcpt=%s reply=%s %s", rcpt, code, _text(reply))


class Outbox:
    """The sending thread of `mailtally run`; `wake()` after notices were made."""

    def __init__(self, config: Config, hostname: str | None = None) -> None:
        self.hostname = hostname or socket.getfqdn()
        self._config = config
        self._rules = config.thresholds_rules()
        self._templates = Templates(config.notify.templates)
        self._templates.check()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rescan = True  # at start: a threshold may have changed while stopped
        self._sent: deque[float] = deque()  # send times within the last minute
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="mailtally-outbox", daemon=True)
        self.sent = 0
        self.failed = 0

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def reload(self, config: Config) -> None:
        """Use `config` from the next notice on (templates checked by the caller)."""
        self._templates = Templates(config.notify.templates)
        self._rules = config.thresholds_rules()
        self._config = config
        self._rescan = True
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the notice being sent, then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        store: Store | None = None
        while not self._stop.is_set():
            try:
                if store is None:
                    store = open_store(self._config.database)
                self._step(store)
                wait = self._wait(store)
            except MailtallyError as exc:
                log.error("notices not sent, retrying error=%s", exc)
                wait = IDLE_WAIT
            except Exception:  # the thread must not die silently; the daemon goes on
                log.exception("notice thread failed, retrying")
                wait = IDLE_WAIT
            self._wake.wait(wait)
            self._wake.clear()
        if store is not None:
            store.close()

    def _step(self, store: Store) -> None:
        config = self._config
        if not config.notify.enabled:
            return
        rules = self._rules
        if self._rescan:
            self._rescan = False
            if config.notify.when in {"crossing", "both"}:
                self._judge_recent(store, rules)
        if config.notify.when in {"daily", "both"}:
            self._daily(store, rules)
        self._deliver(store, rules)

    def _wait(self, store: Store) -> float:
        due = store.next_notice_time()
        wait = IDLE_WAIT if due is None else max(0.0, due - time.time())
        if self._sent and len(self._sent) >= self._config.notify.max_per_minute:
            wait = max(wait, self._sent[0] + 60 - time.monotonic())
        return min(wait, IDLE_WAIT)

    def _judge_recent(self, store: Store, rules: Thresholds) -> None:
        """Judge today's and yesterday's rows anew (after a start or a reload)."""
        judge = CrossingJudge(rules, self._config.tz())
        earliest = date.fromisoformat(judge.earliest())
        today = datetime.now(self._config.tz()).date()
        made = 0
        day = earliest
        while day <= today:
            notices = [
                n
                for sender, row in store.rows_of_day(day.isoformat())
                if judge.wants(sender, row.day)
                for n in judge.notices(sender, row)
            ]
            made += store.add_notices(notices, time.time())
            day += timedelta(days=1)
        if made:
            log.info("notices made on rescan count=%d", made)

    def _daily(self, store: Store, rules: Thresholds) -> None:
        """After notify.daily_at, notice yesterday's senders over a level, and the digest."""
        tz = self._config.tz()
        now = datetime.now(tz)
        hour, minute = map(int, self._config.notify.daily_at.split(":"))
        if now.time() < daytime(hour, minute):
            return
        day = (now.date() - timedelta(days=1)).isoformat()
        if store.has_notice("digest", "", day):
            return  # done for that day
        notices = []
        over = 0
        for sender, row in store.rows_of_day(day):
            passed = rules.effective(sender).passed(row)
            if not passed:
                continue
            over += 1
            level, value = max(passed, key=lambda p: (p[0].limit, p[0].level))
            notices.append(
                Notice("daily", sender, day, level.level, level.metric, level.limit, value)
            )
        # The digest row also marks the day as done, whether or not it is mailed.
        notices.append(Notice("digest", "", day, "", "", 0, over))
        made = store.add_notices(notices, time.time())
        log.info("previous-day notices made day=%s senders=%d new=%d", day, over, made)

    def _deliver(self, store: Store, rules: Thresholds) -> None:
        limit = self._config.notify.max_per_minute
        while not self._stop.is_set():
            now = time.monotonic()
            while self._sent and self._sent[0] <= now - 60:
                self._sent.popleft()
            room = limit - len(self._sent)
            if room <= 0:
                return
            due = store.due_notices(time.time(), min(room, BATCH))
            if not due:
                return
            for notice in due:
                if self._stop.is_set():
                    return
                if not self._deliver_one(store, rules, notice):
                    return  # SMTP down: the rest waits too

    def _deliver_one(self, store: Store, rules: Thresholds, notice: Notice) -> bool:
        """Send one notice and record it; False if SMTP is down (try the rest later)."""
        config = self._config
        try:
            built = self._build(store, rules, notice)
        except ValueError as exc:
            store.notice_finished(notice.id, "skipped", time.time(), str(exc), None)
            log.warning("notice skipped id=%d sender=%s reason=%s", notice.id, notice.sender, exc)
            return True
        if built is None:
            store.notice_finished(notice.id, "skipped", time.time(), "nothing to send", None)
            return True
        message, recipients = built
        self._sent.append(time.monotonic())
        try:
            send_mail(config, message, recipients)
        except PermanentError as exc:
            self.failed += 1
            store.notice_finished(
                notice.id, "failed", time.time(), str(exc), message["Message-ID"]
            )
            log.warning(
                "notice refused, not retried id=%d kind=%s sender=%s reply=%s",
                notice.id,
                notice.kind,
                notice.sender,
                exc,
            )
            return True
        except TemporaryError as exc:
            self._retry(store, notice, str(exc))
            return False
        store.notice_finished(notice.id, "sent", time.time(), None, message["Message-ID"])
        self.sent += 1
        if self._down_since is not None:
            log.info(
                "notices flowing again after_seconds=%.0f", time.monotonic() - self._down_since
            )
            self._down_since = None
        log.info(
            "notice sent id=%d kind=%s sender=%s day=%s level=%s to=%s",
            notice.id,
            notice.kind,
            notice.sender or "-",
            notice.day,
            notice.level or "-",
            ",".join(recipients),
        )
        return True

    def _retry(self, store: Store, notice: Notice, error: str) -> None:
        retry = self._config.notify.retry
        now = time.time()
        if now - notice.created >= retry.give_up:
            self.failed += 1
            store.notice_finished(notice.id, "failed", now, f"gave up: {error}", None)
            log.warning(
                "notice given up id=%d sender=%s error=%s", notice.id, notice.sender, error
            )
            return
        delay = min(retry.first * 2**notice.attempts, retry.max)
        store.notice_retry(notice.id, now + delay, error)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("notice not sent, retrying in %.0f s error=%s", delay, error)

    # -- composing ------------------------------------------------------------------

    def _build(
        self, store: Store, rules: Thresholds, notice: Notice
    ) -> tuple[EmailMessage, list[str]] | None:
        config = self._config
        n = config.notify
        now = datetime.now(config.tz())
        if notice.kind == "digest":
            if not n.admins or not n.digest:
                return None
            over = [
                (
                    self._sender_day(store, sender, row),
                    [Crossing(lv.level, lv.metric, lv.limit, v) for lv, v in passed],
                )
                for sender, row in store.rows_of_day(notice.day)
                if (passed := rules.effective(sender).passed(row))
            ]
            if not over:
                return None
            over.sort(key=lambda item: (-item[0].row.messages, item[0].sender))
            env = Envelope(n.from_addr, n.reply_to, list(n.admins), [], n.language, self.hostname)
            return compose_digest(
                env, date.fromisoformat(notice.day), over, self._templates, now
            ), list(n.admins)
        address = self._address(notice.sender)
        row = store.day_row(notice.sender, notice.day)
        day = self._sender_day(store, notice.sender, row)
        cc = list(n.admins) if n.copy_admins else []
        env = Envelope(
            n.from_addr, n.reply_to, [address], cc, n.language_for(address), self.hostname
        )
        if notice.kind == "daily":
            passed = rules.effective(notice.sender).passed(row)
            crossings = [Crossing(lv.level, lv.metric, lv.limit, v) for lv, v in passed] or [
                Crossing(notice.level, notice.metric, notice.threshold, notice.value)
            ]
            message = compose_daily(env, day, crossings, self._templates, now)
        else:
            crossing = Crossing(notice.level, notice.metric, notice.threshold, notice.value)
            message = compose_crossing(env, day, crossing, self._templates, now)
        return message, [address, *cc]

    def _address(self, sender: str) -> str:
        """The address a sender key is mailed at; ValueError if there is none."""
        n = self._config.notify
        address = sender
        if "@" not in sender:
            if n.username_domain is None:
                raise ValueError("not a mail address (set notify.username_domain)")
            address = f"{sender}@{n.username_domain}"
        safe = safe_address(address)
        if safe is None:
            raise ValueError("not an address that can be mailed safely")
        return safe

    def _sender_day(self, store: Store, sender: str, row: DayRow) -> SenderDay:
        tz = self._config.tz()
        day = date.fromisoformat(row.day)
        start = datetime.combine(day, daytime(0), tz).timestamp()
        end = datetime.combine(day + timedelta(days=1), daytime(0), tz).timestamp()
        first = store.first_seen(sender, start, end)
        return SenderDay(
            sender,
            day,
            row,
            store.destinations(sender, start, end, self._config.notify.top),
            datetime.fromtimestamp(first, tz) if first is not None else None,
        )


def check_templates(config: Config) -> None:
    """Raise ConfigError if a template of `config` does not parse (start, reload)."""
    Templates(config.notify.templates).check()
