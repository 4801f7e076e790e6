"""The scripted mail mix: SMTP clients on loopback addresses and what each one did.

Everything a client does is written to a `Ledger` as it happens; `truth.py` derives
the expected counters from the ledger and the sink's answers, never from logs.
"""

from __future__ import annotations

import itertools
import logging
import smtplib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime

log = logging.getLogger(__name__)

WEBMAIL_IP = "127.0.0.2"  # in mynetworks: relays without AUTH, like a webmail host
OUTSIDE_IP = "127.0.0.3"  # not in mynetworks: must AUTH on submission, denied on port 25
LAB_IP = "127.0.0.4"  # in mynetworks: a second trusted host


class ScenarioError(RuntimeError):
    """The run did not go as planned, so no truth can be written from it."""


def expect(ok: bool, what: str) -> None:
    """Raise ScenarioError saying `what` was expected, unless `ok`."""
    if not ok:
        raise ScenarioError(f"expected {what}")


@dataclass(frozen=True, slots=True)
class Submitted:
    """A message Postfix accepted after DATA (so it has a queue id and a qmgr from=)."""

    at: datetime
    sender: str  # envelope sender exactly as sent
    message_id: str
    recipients: tuple[str, ...]
    client_ip: str  # "" for local submission through sendmail(1)
    service: str  # "smtp" | "submission" | "pickup"
    sasl_username: str | None


@dataclass(frozen=True, slots=True)
class Blocked:
    """A submission Postfix blocked: a SASL failure or a NOQUEUE reject on submission."""

    at: datetime
    key: str  # the SASL username tried, or the envelope sender of the refused RCPT
    kind: str  # "sasl" | "noqueue"
    client_ip: str


@dataclass(frozen=True, slots=True)
class Refused:
    """A NOQUEUE reject on port 25 (relay denied): no message, no counter."""

    at: datetime
    sender: str
    recipient: str
    client_ip: str


@dataclass
class Ledger:
    """Everything the clients did, in order."""

    submitted: list[Submitted] = field(default_factory=list)
    blocked: list[Blocked] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def next_message_id(self) -> str:
        """Return a fresh Message-ID; the sink and bounce parsing key on it."""
        return f"<scenario-{next(self._ids):04d}@campus.example>"


def build_message(sender: str, recipients: tuple[str, ...], message_id: str) -> EmailMessage:
    """Return a small text message with the given Message-ID."""
    msg = EmailMessage()
    msg["From"] = sender or "MAILER-DAEMON"
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = f"scenario {message_id.strip('<>').split('@')[0]}"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id
    msg.set_content("A message sent by mailtally's scenario/run.py.\n")
    return msg


class Client:
    """One SMTP session to the Postfix under test, from a chosen loopback address."""

    def __init__(self, ledger: Ledger, smtp: smtplib.SMTP, client_ip: str, service: str) -> None:
        self.ledger = ledger
        self.smtp = smtp
        self.client_ip = client_ip
        self.service = service
        self.sasl_username: str | None = None

    def authenticate(self, mechanism: str, username: str, password: str, *, ok: bool) -> None:
        """Make one AUTH exchange and record it; raise ScenarioError unless it ends `ok`.

        One exchange, one Postfix warning: smtplib's login() would try each offered
        mechanism in turn after a failure.
        """
        self.smtp.user, self.smtp.password = username, password
        method: Callable[..., str] = {
            "PLAIN": self.smtp.auth_plain,
            "LOGIN": self.smtp.auth_login,
        }[mechanism]
        try:
            code, _ = self.smtp.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")
        except smtplib.SMTPAuthenticationError as exc:
            self.ledger.blocked.append(
                Blocked(datetime.now(UTC), username, "sasl", self.client_ip)
            )
            code = exc.smtp_code
        else:
            self.sasl_username = username
        log.info("auth mechanism=%s user=%s code=%d", mechanism, username, code)
        expect(
            (code == 235) == ok, f"AUTH {mechanism} as {username} to {'pass' if ok else 'fail'}"
        )

    def send(self, sender: str, recipients: list[str], *, queued: bool = True) -> None:
        """Send one message and record what Postfix did with it.

        Raise ScenarioError unless Postfix queued it (`queued`) or refused every
        recipient (not `queued`).
        """
        message_id = self.ledger.next_message_id()
        rcpts = tuple(recipients)
        content = build_message(sender, rcpts, message_id).as_bytes()
        try:
            refused = self.smtp.sendmail(sender, rcpts, content)
        except smtplib.SMTPRecipientsRefused as exc:
            refused, was_queued = exc.recipients, False
        else:
            was_queued = True
        now = datetime.now(UTC)
        for rcpt in refused:
            # One NOQUEUE line per refused RCPT.
            if self.service == "submission":
                self.ledger.blocked.append(Blocked(now, sender, "noqueue", self.client_ip))
            else:
                self.ledger.refused.append(Refused(now, sender, rcpt, self.client_ip))
        if refused:
            log.info("recipients refused sender=%s refused=%s", sender, refused)
        if was_queued:
            accepted = tuple(r for r in rcpts if r not in refused)
            self.ledger.submitted.append(
                Submitted(
                    now,
                    sender,
                    message_id,
                    accepted,
                    self.client_ip,
                    self.service,
                    self.sasl_username,
                )
            )
        expect(
            was_queued == queued,
            f"{message_id} from {sender} to be {'' if queued else 'not '}queued",
        )


@contextmanager
def session(
    ledger: Ledger, port: int, client_ip: str, service: str, helo: str
) -> Iterator[Client]:
    """Open an SMTP session from `client_ip` to 127.0.0.1:`port` and QUIT it afterwards."""
    smtp = smtplib.SMTP(
        "127.0.0.1", port, local_hostname=helo, source_address=(client_ip, 0), timeout=30
    )
    try:
        smtp.ehlo()
        yield Client(ledger, smtp, client_ip, service)
    finally:
        try:
            smtp.quit()
        except smtplib.SMTPServerDisconnected:
            log.debug("server had already closed the session")
