"""The scenario's mail mix: who sends what, from where, through which service.

Recipient local parts steer the sink (see sink.py): ok-* accepted, reject-* 550,
tempfail<N>-* 451 N times then accepted, dead-* 450 until Postfix gives up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from postfix import PostfixInstance
from traffic import (
    LAB_IP,
    OUTSIDE_IP,
    WEBMAIL_IP,
    Ledger,
    Submitted,
    build_message,
    session,
)

log = logging.getLogger(__name__)

HEAVY_BATCH = 50  # messages per SMTP session for the heavy sender, as a webmail host does

# Accounts in the sasldb: (user, realm, password). Logins use "user@realm".
ACCOUNTS = (
    ("carol", "campus.example", "carol-secret"),
    ("dave", "campus.example", "dave-secret"),
)


@dataclass(frozen=True, slots=True)
class MixOptions:
    """What to include: the heavy sender's volume and whether to wait out expiry."""

    heavy_messages: int
    expiry: bool


def send_expiring(pf: PostfixInstance, ledger: Ledger) -> None:
    """Queue the messages that stay deferred until maximal_queue_lifetime (sent first)."""
    with session(ledger, pf.settings.smtp_port, WEBMAIL_IP, "smtp", "webmail.campus.example") as c:
        c.send("erin@campus.example", ["dead-e1@dest.example"])
        c.send("erin@campus.example", ["ok-e2@dest.example", "dead-e3@dest.example"])
        c.send("erin@campus.example", ["dead-e4@dest.example", "dead-e5@dest.example"])


def send_webmail(pf: PostfixInstance, ledger: Ledger, heavy: int) -> None:
    """Port 25 from trusted hosts: the heavy sender, normal senders, case variants."""
    port = pf.settings.smtp_port
    for start in range(0, heavy, HEAVY_BATCH):
        with session(ledger, port, WEBMAIL_IP, "smtp", "webmail.campus.example") as c:
            for i in range(start, min(start + HEAVY_BATCH, heavy)):
                c.send("heavy@campus.example", [f"ok-h{i:03d}@dest.example"])
    with session(ledger, port, WEBMAIL_IP, "smtp", "webmail.campus.example") as c:
        for i in range(3):
            c.send("alice@campus.example", [f"ok-a{i}@dest.example"])
        c.send(
            "alice@campus.example",
            [
                "ok-a10@dest.example",
                "reject-a11@dest.example",
                "tempfail2-a12@dest.example",
                "ok-a13@dest.example",
            ],
        )
        for i in range(2):
            c.send("Alice@Campus.Example", [f"OK-A2{i}@Dest.Example"])
        c.send("Alice@Campus.Example", ["reject-a30@dest.example"])
    with session(ledger, port, LAB_IP, "smtp", "lab.campus.example") as c:
        c.send("bob@campus.example", ["ok-b1@dest.example"])
        c.send("bob@campus.example", ["ok-b2@dest.example"])
        c.send("bob@campus.example", ["tempfail1-b3@dest.example"])
        c.send("bob+news@campus.example", [f"ok-n{i}@dest.example" for i in range(3)])


def send_submission(pf: PostfixInstance, ledger: Ledger) -> None:
    """Port 587 from outside mynetworks: good and bad AUTH, and an unauthenticated try."""
    port = pf.settings.submission_port
    with session(ledger, port, OUTSIDE_IP, "submission", "laptop.home.example") as c:
        c.authenticate("PLAIN", "carol@campus.example", "carol-secret", ok=True)
        c.send("carol@campus.example", ["ok-c1@dest.example"])
        c.send("carol@campus.example", ["ok-c2@dest.example"])
        c.send("carol@campus.example", ["ok-c3@dest.example", "tempfail1-c4@dest.example"])
    with session(ledger, port, OUTSIDE_IP, "submission", "laptop.home.example") as c:
        c.authenticate("PLAIN", "carol@campus.example", "wrong-1", ok=False)
        c.authenticate("PLAIN", "carol@campus.example", "wrong-2", ok=False)
    with session(ledger, port, OUTSIDE_IP, "submission", "phone.home.example") as c:
        c.authenticate("LOGIN", "mallory@campus.example", "guess", ok=False)
    with session(ledger, port, OUTSIDE_IP, "submission", "phone.home.example") as c:
        c.authenticate("LOGIN", "dave@campus.example", "dave-secret", ok=True)
        c.send("dave@campus.example", ["ok-d1@dest.example"])
    with session(ledger, port, OUTSIDE_IP, "submission", "phone.home.example") as c:
        c.send("dave@campus.example", ["ok-d2@dest.example"], queued=False)  # no AUTH


def send_relay_denied(pf: PostfixInstance, ledger: Ledger) -> None:
    """Port 25 from outside mynetworks to a remote domain: NOQUEUE Relay access denied."""
    port = pf.settings.smtp_port
    with session(ledger, port, OUTSIDE_IP, "smtp", "mx.elsewhere.example") as c:
        c.send("outsider@elsewhere.example", ["ok-x1@dest.example"], queued=False)
        c.send("alice@campus.example", ["ok-x2@dest.example"], queued=False)


def send_local(pf: PostfixInstance, ledger: Ledger) -> None:
    """Submit one message through sendmail(1) -> postdrop -> pickup."""
    sender, rcpts = "operator@campus.example", ("ok-p1@dest.example",)
    message_id = ledger.next_message_id()
    pf.sendmail(sender, list(rcpts), build_message(sender, rcpts, message_id).as_bytes())
    ledger.submitted.append(
        Submitted(datetime.now(UTC), sender, message_id, rcpts, "", "pickup", None)
    )


def play(pf: PostfixInstance, ledger: Ledger, options: MixOptions) -> None:
    """Run the whole mix against a started Postfix."""
    if options.expiry:
        send_expiring(pf, ledger)
    send_webmail(pf, ledger, options.heavy_messages)
    send_submission(pf, ledger)
    send_relay_denied(pf, ledger)
    send_local(pf, ledger)
    log.info(
        "mix sent submitted=%d blocked=%d refused=%d",
        len(ledger.submitted),
        len(ledger.blocked),
        len(ledger.refused),
    )
