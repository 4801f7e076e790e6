"""A real SMTP server on loopback (aiosmtpd) that keeps what it receives.

Each recipient can be answered as a test needs: accept, a 4xx to try again, a 5xx to
refuse; `down()` and `up()` stop and start the listener on the same port.
"""

from __future__ import annotations

import email
import email.policy
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float  # time.monotonic() on arrival

    @property
    def message(self) -> EmailMessage:
        parsed: EmailMessage = email.message_from_bytes(  # type: ignore[assignment]
            self.data, policy=email.policy.default
        )
        return parsed


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        reply = self.sink.replies.get(address.lower())
        if reply is not None:
            self.sink.refused.append((address, reply))
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        data = envelope.original_content or b""
        with self.sink.lock:
            self.sink.received.append(
                Received(str(envelope.mail_from), list(envelope.rcpt_tos), data, time.monotonic())
            )
        return "250 Message accepted for delivery"


class Sink:
    """An SMTP server on 127.0.0.1 at a free port."""

    def __init__(
        self, tls: ssl.SSLContext | None = None, login: tuple[str, str] | None = None
    ) -> None:
        self.tls = tls
        self.login = login
        self.logins: list[str] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.received: list[Received] = []
        self.refused: list[tuple[str, str]] = []
        self.replies: dict[str, str] = {}  # recipient -> reply, e.g. "550 5.1.1 no such user"
        self.lock = threading.Lock()
        self._controller: Controller | None = None

    def up(self) -> Sink:
        extra: dict[str, Any] = {}
        if self.tls is not None:
            extra.update(tls_context=self.tls, require_starttls=True)
        if self.login is not None:
            extra.update(auth_required=True, authenticator=self._authenticate)
        self._controller = Controller(
            _Handler(self), hostname="127.0.0.1", port=self.port, **extra
        )
        self._controller.start()
        return self

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and (
                data.login.decode(),
                data.password.decode(),
            )
            == self.login
        )
        if ok:
            self.logins.append(f"{mechanism} {data.login.decode()}")
        return AuthResult(success=ok)

    def down(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def to(self, address: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if address in r.rcpt_tos]

    def wait(self, count: int, timeout: float = 20.0) -> list[Received]:
        """Wait until `count` messages arrived (in all); return them."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                got = list(self.received)
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} messages arrived, {count} expected: {got}")
            time.sleep(0.05)
