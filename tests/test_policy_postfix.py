"""A real Postfix 3.7 asks `mailtally run` whether to take each message: the daily limit
is enforced at SMTP time.

The scenario's stack (scenario/run.py: a private Postfix on loopback, an rsyslogd that
owns /dev/log, the aiosmtpd sink) runs in this process, with the daemon's policy
listener in `check_policy_service` twice over: main.cf asks it at END-OF-MESSAGE only
(the scenario's port 25), a second smtpd service asks it at RCPT too. The daemon
follows the rsyslog file the stack writes. Mail goes in over SMTP from the scenario's
webmail address (in mynetworks).

What must hold: a message is counted once, at END-OF-MESSAGE, however many requests
Postfix made for it; a sender's (limit+1)th message of the day gets the configured
action (after DATA on the END-OF-MESSAGE-only service); other senders are not
affected; the counts are on disk; with the daemon killed, Postfix applies its own
default_action=DUNNO and mail still flows.

Needs what the scenario needs (root, postfix, rsyslog, sasl2-bin): marker `postfix`.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import socket
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import ROOT
from daemonproc import Running, daemon_config, wait_for, wait_read

sys.path.insert(0, str(ROOT / "scenario"))  # its modules import each other by bare name
from postfix import PostfixSettings
from run import (
    LOCK_TIMEOUT,
    Stack,
    exclusive_run,
    free_ports,
    missing_requirements,
    too_close_to_midnight,
    wait_queue_empty,
)
from traffic import WEBMAIL_IP, build_message

LIMIT = 5  # thresholds.default.warn: small, so the test stays short
BUSY = "busy@campus.example"  # passes the limit
QUIET = "quiet@campus.example"  # stays within it, and must never be stopped
DEFER = "DEFER_IF_PERMIT 4.7.1 Daily limit reached"
REJECT = "REJECT 5.7.1 Daily limit reached"


@dataclass(frozen=True)
class Outcome:
    """What Postfix answered to one message."""

    message_id: str
    sender: str
    stage: str  # "accepted" (250 after DATA), "RCPT" (every RCPT refused) or "DATA"
    code: int
    text: str

    @property
    def accepted(self) -> bool:
        return self.stage == "accepted"


class Mailer:
    """Submits numbered messages over SMTP from the webmail address; keeps every outcome."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self._serial = 0

    def session(self, port: int, sender: str, count: int, recipients: int = 1) -> list[Outcome]:
        """Send `count` messages from `sender` in one SMTP session; return their outcomes."""
        got = []
        smtp = smtplib.SMTP(
            "127.0.0.1",
            port,
            local_hostname="webmail.campus.example",
            source_address=(WEBMAIL_IP, 0),
            timeout=30,
        )
        try:
            smtp.ehlo()
            for _ in range(count):
                got.append(self._send(smtp, sender, recipients))
        finally:
            smtp.quit()
        self.outcomes += got
        return got

    def _send(self, smtp: smtplib.SMTP, sender: str, recipients: int) -> Outcome:
        self._serial += 1
        n = self._serial
        message_id = f"<policy-{n:03d}@campus.example>"
        rcpts = tuple(f"ok-p{n:03d}-{i}@dest.example" for i in range(recipients))
        content = build_message(sender, rcpts, message_id).as_bytes()
        try:
            refused = smtp.sendmail(sender, rcpts, content)
        except smtplib.SMTPRecipientsRefused as exc:
            answers = set(exc.recipients.values())
            assert len({code for code, _ in answers}) == 1, f"{message_id}: RCPT {answers}"
            code, text = next(iter(answers))
            return Outcome(message_id, sender, "RCPT", code, text.decode())
        except smtplib.SMTPDataError as exc:
            return Outcome(message_id, sender, "DATA", exc.smtp_code, exc.smtp_error.decode())
        assert not refused, f"{message_id}: only some recipients refused: {refused}"
        return Outcome(message_id, sender, "accepted", 250, "")


@pytest.fixture
def stack_base() -> Iterator[Path]:
    """A temp dir user `postfix` can traverse (pytest's tmp_path is 0700 under root)."""
    problem = missing_requirements()
    if problem:
        pytest.skip(f"the scenario's Postfix cannot run here: {problem}")
    base = Path(tempfile.mkdtemp(prefix="mailtally-policy-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def postfix_settings(ports: list[int], policy: int) -> PostfixSettings:
    """The scenario's settings plus the policy service.

    main.cf asks it at END-OF-MESSAGE (ports[0], the scenario's port 25); the service on
    ports[3] asks it at RCPT as well, so Postfix sends three requests for a message with
    two recipients.
    """
    smtp, submission, sink, both = ports
    service = (
        f"check_policy_service {{ inet:127.0.0.1:{policy}, timeout=10s, default_action=DUNNO }}"
    )
    return PostfixSettings(
        smtp_port=smtp,
        submission_port=submission,
        sink_port=sink,
        main_cf_extra=(
            ("smtpd_end_of_data_restrictions", service),
            ("smtpd_policy_service_max_idle", "300s"),
            ("smtpd_policy_service_request_limit", "1000"),
        ),
        master_cf_extra=(
            f"127.0.0.1:{both} inet n - n - - smtpd",
            f"  -o {{ smtpd_recipient_restrictions = {service} }}",
        ),
    )


def write_daemon_config(work: Path, db: Path, log: Path, port: int, action: str) -> Path:
    extra = (
        "notify: {enabled: false}\n"
        "metrics: {enabled: false}\n"
        f"thresholds: {{default: {{warn: {LIMIT}}}}}\n"
        "policy:\n"
        f'  listen: ["127.0.0.1:{port}"]\n'
        f'  actions: {{warn: "{action}"}}\n'
    )
    name = f"run-{action.split()[0].lower()}.yaml"
    return daemon_config(work, db, [f"{{file: {log}}}"], extra=extra, name=name)


def start_daemon(config: Path, work: Path, port: int) -> Running:
    """Start `mailtally run`; return once it sent READY=1 and its policy port answers."""
    daemon = Running(config, work)
    try:
        daemon.wait_ready()

        def listening() -> bool:
            assert daemon.proc.poll() is None, f"daemon exited: {daemon.log()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_for(listening, 15, f"the policy listener on 127.0.0.1:{port}")
    except BaseException:
        daemon.close()
        raise
    return daemon


def query(db: Path, sql: str, *params: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        conn.close()


def policy_counts(db: Path, day: str) -> dict[object, tuple[object, ...]]:
    """policy_counts of `day`: identity -> (messages, recipients)."""
    sql = "SELECT identity, messages, recipients FROM policy_counts WHERE day = ?"
    return {identity: tuple(rest) for identity, *rest in query(db, sql, day)}


def logged_messages(db: Path, day: str) -> dict[object, object]:
    """counters.messages by sender: what the daemon counted from the log."""
    return dict(query(db, "SELECT sender, messages FROM counters WHERE day = ?", day))


def blocked_identities(db: Path, day: str) -> set[object]:
    return {i for (i,) in query(db, "SELECT identity FROM policy_blocks WHERE day = ?", day)}


def received_ids(stack: Stack) -> list[str]:
    _, received = stack.sink.handler.snapshot()
    return sorted(str(r.message["Message-ID"]) for r in received)


def wait_delivered(stack: Stack, mailer: Mailer) -> None:
    """Wait until the sink holds exactly the accepted messages and the queue is empty."""
    accepted = sorted(o.message_id for o in mailer.outcomes if o.accepted)
    wait_for(lambda: received_ids(stack) == accepted, 30, "the sink to hold the accepted mail")
    wait_queue_empty(stack.pf, 30)
    assert received_ids(stack) == accepted  # nothing else arrived meanwhile


def wait_logged(log: Path, pattern: str, count: int, what: str, *, exact: bool = True) -> None:
    """Wait until `count` lines of the mail log match `pattern` (exactly, or at least)."""
    regex = re.compile(pattern)
    found: list[str] = []

    def enough() -> bool:
        nonlocal found
        text = log.read_text(encoding="utf-8", errors="replace")
        found = [line for line in text.splitlines() if regex.search(line)]
        return len(found) >= count

    try:
        wait_for(enough, 30, what)
    except AssertionError:
        rejects = [line for line in log.read_text().splitlines() if ": reject: " in line]
        raise AssertionError(
            f"{what}: {len(found)} of {count} lines like {pattern!r}; rejects logged:\n"
            + "\n".join(rejects)
        ) from None
    assert len(found) == count or not exact, f"{what}: {found}"


def rejects(sender: str, code: int, enhanced: str) -> str:
    """Postfix's reject line for the policy's action, at RCPT or after DATA.

    ``<id>: reject: END-OF-MESSAGE from unknown[127.0.0.2]: 450 4.7.1 <END-OF-MESSAGE>:
    End-of-data rejected: Daily limit reached; from=<...> proto=ESMTP helo=<...>``, one per
    message, and at RCPT, one per recipient, ``NOQUEUE: reject: RCPT from ...: 450 4.7.1
    <rcpt>: Recipient address rejected: Daily limit reached; from=<...> to=<rcpt> ...``
    """
    return (
        rf"postfix/smtpd\[\d+\]: \w+: reject: (RCPT|END-OF-MESSAGE) from "
        rf"unknown\[{re.escape(WEBMAIL_IP)}\]: {code} {re.escape(enhanced)} "
        r"<[^>]+>: (Recipient address|End-of-data) rejected: Daily limit reached; "
        rf"from=<{re.escape(sender)}>"
    )


def check_stopped(outcome: Outcome, stages: set[str], code: int, enhanced: str) -> None:
    assert outcome.stage in stages, outcome
    assert outcome.code == code, outcome
    assert outcome.text.startswith(enhanced), outcome
    assert outcome.text.endswith("Daily limit reached"), outcome


@pytest.mark.postfix
def test_postfix_enforces_the_daily_limit_through_mailtally(stack_base: Path) -> None:
    *ports, policy_port = free_ports(5)
    eom, both = ports[0], ports[3]  # END-OF-MESSAGE only / RCPT and END-OF-MESSAGE
    work = stack_base / "mailtally"
    work.mkdir()
    db = work / "run.db"
    mailer = Mailer()
    with ExitStack() as running:
        running.enter_context(exclusive_run(LOCK_TIMEOUT))
        problem = too_close_to_midnight(timedelta(minutes=5))  # after any wait for the lock
        if problem:
            pytest.skip(f"policy counts are per day: {problem}")
        stack = running.enter_context(
            Stack(stack_base / "stack", postfix_settings(ports, policy_port))
        )
        today = datetime.now(UTC).date().isoformat()
        # The traditional file, with mail.log.rfc3339 beside it: the restart below also
        # shows that a sibling log is not taken for a rotated copy.
        mail_log = stack.rs.traditional

        # DEFER_IF_PERMIT: the busy sender's first LIMIT messages pass, the next are deferred.
        config = write_daemon_config(work, db, mail_log, policy_port, DEFER)
        with start_daemon(config, work, policy_port) as daemon:
            first = mailer.session(both, BUSY, 3, recipients=2)  # 3 requests a message
            second = mailer.session(eom, BUSY, LIMIT - 3 + 2, recipients=2)
            (third,) = mailer.session(both, BUSY, 1, recipients=2)
            quiet = mailer.session(both, QUIET, 1) + mailer.session(eom, QUIET, 1)
            assert all(o.accepted for o in first + second[:2]), first + second
            for outcome in second[2:]:
                check_stopped(outcome, {"DATA"}, 450, "4.7.1")
            check_stopped(third, {"RCPT", "DATA"}, 450, "4.7.1")
            assert all(o.accepted for o in quiet), quiet

            wait_delivered(stack, mailer)
            # Committed before Postfix heard the answer; recipients as Postfix counted them.
            assert policy_counts(db, today) == {BUSY: (LIMIT, 2 * LIMIT), QUIET: (2, 2)}
            assert blocked_identities(db, today) == {BUSY}
            wait_logged(mail_log, rejects(BUSY, 450, "4.7.1"), 3 + (third.stage == "RCPT"), "450s")
            # The log side agrees once it caught up: the deferred messages were never queued.
            wait_for(
                lambda: logged_messages(db, today) == {BUSY: LIMIT, QUIET: 2},
                30,
                "the log's counters",
            )
            daemon.kill()  # SIGKILL: Postfix must fall back to default_action=DUNNO

        # No policy server: Postfix fails open (at RCPT and after DATA) and mail flows.
        after_kill = mailer.session(both, QUIET, 1) + mailer.session(eom, QUIET, 1)
        assert all(o.accepted for o in after_kill), after_kill
        wait_delivered(stack, mailer)
        wait_logged(
            mail_log,
            rf"postfix/smtpd\[\d+\]: warning: .*127\.0\.0\.1:{policy_port}",
            1,
            "Postfix's warnings that the policy server is gone",
            exact=False,
        )

        # REJECT, on the same database: what the day counted survived the kill.
        config = write_daemon_config(work, db, mail_log, policy_port, REJECT)
        with start_daemon(config, work, policy_port) as daemon:
            (rejected,) = mailer.session(eom, BUSY, 1)
            check_stopped(rejected, {"DATA"}, 554, "5.7.1")
            (fifth,) = mailer.session(eom, QUIET, 1)  # the limit-th message still passes
            assert fifth.accepted, (fifth, daemon.log())
            wait_delivered(stack, mailer)
            wait_logged(mail_log, rejects(BUSY, 554, "5.7.1"), 1, "Postfix's 554 reject")
            wait_read(db, mail_log)
            assert logged_messages(db, today) == {BUSY: LIMIT, QUIET: LIMIT}
            assert policy_counts(db, today)[BUSY] == (LIMIT, 2 * LIMIT)
            took = daemon.stop()  # SIGTERM, with smtpd's idle policy connections open
            assert took < 5, f"SIGTERM took {took:.1f} s"
