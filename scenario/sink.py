"""Loopback SMTP sink that answers by recipient local part and records every answer.

The sink is the next hop for every domain of the Postfix under test, so each
`status=` delivery line Postfix writes corresponds to one answer recorded here:

    local part        RCPT answer
    ok-*, anything    250 (then 250 after DATA: one `status=sent` per such recipient)
    reject-*          550 5.1.1 (one `status=bounced`)
    tempfail<N>-*     451 4.3.0 for the first N RCPTs of that address, then 250
    dead-*            450 4.2.1 always (one `status=deferred` per attempt, until expiry)

Addresses that answer 4xx are unique per message in the scenario, so "attempt n of
this address" is "attempt n of this recipient of this message".
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger(__name__)

TEMPFAIL = re.compile(r"tempfail(\d+)-")


@dataclass(frozen=True, slots=True)
class Answer:
    """One reply the sink gave: to a RCPT (per recipient) or after DATA (per message)."""

    at: datetime  # UTC
    mail_from: str  # as Postfix sent it; "" for the null sender
    recipient: str  # for DATA answers, each accepted recipient gets its own Answer
    phase: str  # "rcpt" | "data"
    code: int
    attempt: int  # how many RCPTs this address has seen, this one included
    message_id: str  # Message-ID header of the DATA, "" for RCPT answers


@dataclass(frozen=True, slots=True)
class Received:
    """A message the sink accepted, kept whole for bounce and expiry analysis."""

    at: datetime
    mail_from: str
    recipients: tuple[str, ...]
    message: EmailMessage


class SinkHandler:
    """aiosmtpd handler: decide each RCPT by local part and log it in `answers`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: list[Answer] = []
        self.received: list[Received] = []
        self.attempts: dict[str, int] = {}

    def decide(self, recipient: str) -> tuple[int, str]:
        """Return the SMTP reply for one more RCPT of `recipient`."""
        local = recipient.partition("@")[0].lower()
        attempt = self.attempts.get(recipient.lower(), 0)
        if local.startswith("reject-"):
            return 550, f"550 5.1.1 <{recipient}>: Recipient address rejected: User unknown"
        if local.startswith("dead-"):
            return 450, f"450 4.2.1 <{recipient}>: Mailbox temporarily unavailable"
        match = TEMPFAIL.match(local)
        if match and attempt <= int(match.group(1)):
            return 451, f"451 4.3.0 <{recipient}>: Temporary lookup failure, try again"
        return 250, "250 2.1.5 Ok"

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Answer one RCPT TO and record the answer."""
        with self.lock:
            key = address.lower()
            self.attempts[key] = self.attempts.get(key, 0) + 1
            code, reply = self.decide(address)
            self.answers.append(
                Answer(
                    at=datetime.now(UTC),
                    mail_from=envelope.mail_from or "",
                    recipient=address,
                    phase="rcpt",
                    code=code,
                    attempt=self.attempts[key],
                    message_id="",
                )
            )
        if code == 250:
            envelope.rcpt_tos.append(address)
        log.debug("rcpt answered from=%s to=%s code=%d", envelope.mail_from, address, code)
        return reply

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        """Accept the message for every recipient that got 250 and record each."""
        raw = envelope.original_content or b""
        message = message_from_bytes(raw, policy=policy.default)
        assert isinstance(message, EmailMessage)
        message_id = str(message.get("Message-ID", ""))
        now = datetime.now(UTC)
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.answers.append(
                    Answer(
                        at=now,
                        mail_from=envelope.mail_from or "",
                        recipient=rcpt,
                        phase="data",
                        code=250,
                        attempt=self.attempts[rcpt.lower()],
                        message_id=message_id,
                    )
                )
            self.received.append(
                Received(now, envelope.mail_from or "", tuple(envelope.rcpt_tos), message)
            )
        return "250 2.0.0 Ok: queued by sink"

    def snapshot(self) -> tuple[list[Answer], list[Received]]:
        """Return copies of what was recorded so far (thread-safe)."""
        with self.lock:
            return list(self.answers), list(self.received)


class Sink:
    """The threaded aiosmtpd controller around a `SinkHandler` on 127.0.0.1."""

    def __init__(self, port: int, server_hostname: str = "sink.dest.example") -> None:
        self.handler = SinkHandler()
        self.controller = Controller(
            self.handler,
            hostname="127.0.0.1",
            port=port,
            ready_timeout=10.0,
            server_hostname=server_hostname,
        )

    def start(self) -> None:
        """Start listening; returns once the server accepts connections."""
        self.controller.start()
        log.info("sink started port=%d", self.controller.port)

    def stop(self) -> None:
        """Stop listening (also fine after a failed or missing start)."""
        self.controller.stop(no_assert=True)
