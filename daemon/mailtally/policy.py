"""Answer Postfix's policy delegation requests (``check_policy_service``) from the counts.

Postfix sends ``name=value`` lines ending with an empty line and waits for
``action=...`` and an empty line, over connections it keeps open (one per smtpd
process). A malformed request is logged and its connection closed without an answer,
as Postfix expects; Postfix then applies its ``default_action``.

The count a decision uses is the larger of what the log says (the store's counters)
and what this server has itself accepted today (``policy_counts``), so a burst is
stopped before the log catches up with it. A message is counted once, at
``policy.count_at`` (END-OF-MESSAGE), de-duplicated by Postfix's ``instance``. Counts
and blocks are committed before the answer goes out, in one transaction for all the
requests answered in one turn of the event loop: every message counted is on disk
(WAL) when Postfix hears the answer, and survives a kill -9.

Fail-open: an internal error, a locked database or a decision slower than
``policy.budget`` is answered ``policy.fail_action`` (DUNNO), and counted in metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from mailtally.config import parse_listen
from mailtally.correlate import NULL_SENDER, normalise
from mailtally.errors import MailtallyError
from mailtally.store import DayRow, open_store
from mailtally.thresholds import Thresholds

if TYPE_CHECKING:
    from mailtally.config import Config
    from mailtally.metrics import PolicyMetrics

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024  # bytes of one attribute line (certificates are the longest)
MAX_REQUEST = 64 * 1024  # bytes of one whole request
MAX_ATTRIBUTES = 256  # Postfix 3.7 sends about 40
MAX_INSTANCES = 200_000  # message instances remembered for de-duplication
BLOCKING = ("DEFER", "DEFER_IF_PERMIT", "REJECT")
SELF_TEST_SENDER = "mailtally-self-test@invalid"


class Malformed(Exception):  # noqa: N818 - a condition of the input, not a bug
    """A request Postfix would never send: close the connection without an answer."""


class _Durable:
    """Counts and blocks waiting for their commit, and the answers waiting on it."""

    def __init__(self) -> None:
        self.counts: set[tuple[str, str]] = set()
        self.blocks: list[tuple[object, ...]] = []
        # In arrival order: (connection, action, started, needs the commit).
        self.answers: list[tuple[_Connection, str, float, bool]] = []


class _Connection(asyncio.Protocol):
    """One smtpd process's connection: requests in, answers out in the same order."""

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.queued = 0  # answers of this connection waiting for a commit
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        server._connections += 1
        if server._connections > server.config.policy.max_connections:
            log.warning("policy connection refused: %d open", server._connections - 1)
            transport.abort()
            return
        self._arm(server.config.policy.idle_timeout)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.closed:
            end = self.buffer.find(b"\n\n")
            if end < 0:
                break
            if end == 0 or self.buffer[0:1] == b"\n":
                raw = b"\n"  # an empty request: malformed below
                del self.buffer[:1]
            else:
                raw = bytes(self.buffer[: end + 2])
                del self.buffer[: end + 2]
            try:
                attrs = parse_request(raw)
            except Malformed as exc:
                self._malformed(str(exc))
                return
            self.server._request(self, attrs)
        if len(self.buffer) > MAX_REQUEST:
            self._malformed(f"request over {MAX_REQUEST} bytes")
            return
        policy = self.server.config.policy
        self._arm(policy.request_timeout if self.buffer else policy.idle_timeout)

    def _malformed(self, reason: str) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.warning(
            "policy request malformed, connection closed peer=%s error=%s", peer or "unix", reason
        )
        self.close()

    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self.close)

    def send(self, action: str) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(b"action=" + action.encode("utf-8", "replace") + b"\n\n")

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()  # what was written goes out first

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections -= 1
        if self.timer is not None:
            self.timer.cancel()


class PolicyServer:
    """The policy listeners of `mailtally run`, in a thread with its own event loop."""

    def __init__(
        self,
        config: Config,
        metrics: PolicyMetrics | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.now = now
        self._apply(config)
        self._counts: dict[tuple[str, str], list[int]] = {}  # (identity, day) -> [m, r]
        self._instances: OrderedDict[str, None] = OrderedDict()
        self._warned: set[tuple[str, str]] = set()  # (identity, day) blocks logged
        self._day = ""
        self._durable = _Durable()
        self._flush_scheduled = False
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self._run, name="mailtally-policy", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stopped: asyncio.Event | None = None
        self.answered = 0

    # -- control, from the daemon's thread ------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Listen, answer one self-test request, then return; raise if that failed."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise MailtallyError("policy server did not start in time")
        if self._start_error is not None:
            raise MailtallyError(f"policy server: {self._start_error}") from self._start_error

    def reload(self, config: Config) -> None:
        if config.policy.listen != self.config.policy.listen:
            log.warning("policy.listen change ignored until restart")
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._apply, config)

    def stop(self, timeout: float = 10.0) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopped.set)
        self._thread.join(timeout)

    def _apply(self, config: Config) -> None:
        self.config = config
        self.rules: Thresholds = config.thresholds_rules()
        self.tz = config.tz()
        self.settings = config.correlator_settings()
        self.identity = config.policy_identity()
        self.actions = dict(config.policy.actions)

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                log.exception("policy server stopped")
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        policy = self.config.policy
        budget_ms = max(1, int(policy.budget * 500))  # half the budget for a lock
        self.store = open_store(self.config.database, busy_timeout_ms=budget_ms)
        try:
            self._load_counts()
            for address in policy.listen:
                self._servers.append(await self._listen(address))
            await self._self_test(policy.listen[0])
            log.info("policy server listening on %s", ", ".join(policy.listen))
            self._started.set()
            await self._stopped.wait()
        finally:
            for server in self._servers:
                server.close()
            for server in self._servers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 2)
            self._flush()
            self.store.close()

    async def _listen(self, address: str) -> asyncio.base_events.Server:
        policy = self.config.policy
        loop = asyncio.get_running_loop()
        if address.startswith("unix:"):
            path = Path(address[5:])
            if path.is_socket():
                path.unlink()  # left by a killed run
            server = await loop.create_unix_server(
                lambda: _Connection(self), path=str(path), backlog=policy.backlog
            )
            path.chmod(0o666)  # smtpd runs as postfix; keep the socket's directory private
            return server
        host, port = parse_listen(address)
        return await loop.create_server(
            lambda: _Connection(self),
            host or None,
            port,
            backlog=policy.backlog,
            reuse_address=True,
        )

    async def _self_test(self, address: str) -> None:
        if address.startswith("unix:"):
            reader, writer = await asyncio.open_unix_connection(address[5:])
        else:
            host, port = parse_listen(address)
            reader, writer = await asyncio.open_connection(host or "127.0.0.1", port)
        try:
            writer.write(
                b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
                b"sender=" + SELF_TEST_SENDER.encode() + b"\nrecipient=postmaster@invalid\n"
                b"client_address=127.0.0.1\ninstance=mailtally-self-test\n\n"
            )
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
        finally:
            writer.close()
        if not answer.startswith(b"action="):
            raise MailtallyError(f"self-test answered {answer!r}")

    # -- decisions ----------------------------------------------------------------------

    def _request(self, connection: _Connection, attrs: dict[str, str]) -> None:
        """Decide; answer now, or after the commit if it changed counts (or must wait
        behind an earlier answer of the same connection that does)."""
        started = time.perf_counter()
        policy = self.config.policy
        try:
            action, durable = self._decide(attrs)
        except sqlite3.OperationalError as exc:
            log.warning("policy answered %s: database error=%s", policy.fail_action, exc)
            self._done(connection, policy.fail_action, started, "database")
            return
        except Exception:  # fail open: Postfix must get an answer
            log.exception("policy answered %s after an internal error", policy.fail_action)
            self._done(connection, policy.fail_action, started, "error")
            return
        if durable or connection.queued:
            connection.queued += 1
            self._durable.answers.append((connection, action, started, durable))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
            return
        self._done(connection, action, started, None)

    def _done(
        self, connection: _Connection, action: str, started: float, reason: str | None
    ) -> None:
        policy = self.config.policy
        elapsed = time.perf_counter() - started
        if reason is None and elapsed > policy.budget:
            log.warning(
                "policy decision took %.3f s (budget %g s), answered %s",
                elapsed,
                policy.budget,
                policy.fail_action,
            )
            action, reason = policy.fail_action, "slow"
        connection.send(action)
        self.answered += 1
        if self.metrics is not None:
            self.metrics.requests.labels(action.split(" ", 1)[0]).inc()
            self.metrics.seconds.observe(elapsed)
            if reason is not None:
                self.metrics.failopen.labels(reason).inc()

    def _who(self, attrs: dict[str, str]) -> str | None:
        if self.identity == "client":
            return attrs.get("client_address")
        if self.identity == "sasl" and attrs.get("sasl_username"):
            return normalise(attrs["sasl_username"], self.settings)
        sender = attrs.get("sender", "")
        return normalise(sender, self.settings) if sender else NULL_SENDER

    def _decide(self, attrs: dict[str, str]) -> tuple[str, bool]:
        """Return (action, whether something must be committed before answering)."""
        identity = self._who(attrs)
        if identity is None or identity in (NULL_SENDER, SELF_TEST_SENDER):
            return "DUNNO", False
        effective = self.rules.effective(identity)
        if effective.exempt:
            return "DUNNO", False
        today = datetime.fromtimestamp(self.now(), self.tz).date()
        day = today.isoformat()
        if day != self._day:
            self._day = day
            self._forget_before(today)
            self._warned.clear()
        stage = attrs.get("protocol_state", "")
        counting = stage == self.config.policy.count_at
        recipients = _int(attrs.get("recipient_count")) if counting else 0
        mine = self._counts.setdefault((identity, day), [0, 0])
        logged = self._logged(identity, day)
        # The message being decided on is the next one.
        projected = _with(
            logged,
            messages=max(logged.messages, mine[0]) + 1,
            recipients=max(logged.recipients, mine[1]) + max(recipients, 1),
        )
        passed = effective.passed(projected)
        acting = [(level.limit, level.level) for level, _ in passed if level.level in self.actions]
        if acting:
            _, level = max(acting)
            action = self.actions[level]
            if action.startswith(BLOCKING):
                self._block(attrs, identity, day, stage, level, action, projected.messages - 1)
                return action, True
        else:
            action = "DUNNO"
        instance = attrs.get("instance")
        if not counting or (instance is not None and instance in self._instances):
            return action, False
        if instance is not None:
            self._instances[instance] = None
            if len(self._instances) > MAX_INSTANCES:
                self._instances.popitem(last=False)
        mine[0] += 1
        mine[1] += recipients or 1
        self._durable.counts.add((identity, day))
        return action, True

    def _logged(self, identity: str, day: str) -> DayRow:
        """The store's counters (from the log) for the identity's day."""
        if self.identity == "client":
            return DayRow(day)
        return self.store.day_row(identity, day)

    def _block(
        self,
        attrs: dict[str, str],
        identity: str,
        day: str,
        stage: str,
        level: str,
        action: str,
        count: int,
    ) -> None:
        self._durable.blocks.append(
            (
                self.now(),
                identity,
                day,
                stage,
                level,
                action,
                count,
                attrs.get("client_address", ""),
                attrs.get("sender", ""),
                attrs.get("recipient", ""),
            )
        )
        if (identity, day) not in self._warned:
            self._warned.add((identity, day))
            log.warning(
                "policy limit reached identity=%s day=%s level=%s count=%d action=%s",
                identity,
                day,
                level,
                count,
                action,
            )

    # -- durability ----------------------------------------------------------------------

    def _flush(self) -> None:
        """Commit what the answers of this loop turn decided, then send the answers."""
        self._flush_scheduled = False
        durable, self._durable = self._durable, _Durable()
        failed: str | None = None
        if durable.counts or durable.blocks:
            failed = self._commit(durable)
        fail_action = self.config.policy.fail_action
        for connection, action, started, needed in durable.answers:
            connection.queued -= 1
            if failed is not None and needed:
                self._done(connection, fail_action, started, "database")
            else:
                self._done(connection, action, started, None)

    def _commit(self, durable: _Durable) -> str | None:
        """Write counts and blocks in one transaction; the error, or None."""
        conn = self.store.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO policy_counts (identity, day, messages, recipients)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (identity, day) DO UPDATE SET"
                " messages = excluded.messages, recipients = excluded.recipients",
                [(i, d, *self._counts[(i, d)]) for i, d in durable.counts],
            )
            conn.executemany(
                "INSERT INTO policy_blocks (ts, identity, day, stage, level, action, count,"
                " client, sender, recipient) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                durable.blocks,
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # Kept in memory: the next commit writes them (counts are absolute values).
            self._durable.counts |= durable.counts
            self._durable.blocks.extend(durable.blocks)
            log.warning("policy answered fail_action: database error=%s", exc)
            return str(exc)
        return None

    def _load_counts(self) -> None:
        today = datetime.fromtimestamp(self.now(), self.tz).date()
        since = (today - timedelta(days=1)).isoformat()
        rows = self.store.conn.execute(
            "SELECT identity, day, messages, recipients FROM policy_counts WHERE day >= ?",
            (since,),
        )
        for identity, day, messages, recipients in rows:
            self._counts[(identity, day)] = [messages, recipients]

    def _forget_before(self, today: date) -> None:
        keep = (today - timedelta(days=1)).isoformat()
        for key in [k for k in self._counts if k[1] < keep]:
            del self._counts[key]


def parse_request(data: bytes) -> dict[str, str]:
    """Parse one request (``name=value`` lines, an empty line last); raise Malformed."""
    text = data.decode("utf-8", "replace")  # once: values may be any bytes
    lines = text.split("\n")
    if len(lines) > MAX_ATTRIBUTES + 2:
        raise Malformed(f"more than {MAX_ATTRIBUTES} attributes")
    attrs: dict[str, str] = {}
    for line in lines:
        if not line or line == "\r":
            continue
        if len(line) > MAX_LINE:
            raise Malformed(f"a line of over {MAX_LINE} characters")
        name, eq, value = line.partition("=")
        if not eq or not name:
            raise Malformed(f"not name=value: {line[:80]!r}")
        if value:  # an empty value is as good as absent
            attrs[name] = value.removesuffix("\r")
    if attrs.get("request") != "smtpd_access_policy":
        raise Malformed(f"request={attrs.get('request')!r}")
    return attrs


def _int(text: str | None) -> int:
    return int(text) if text is not None and text.isdigit() else 0


def _with(row: DayRow, messages: int, recipients: int) -> DayRow:
    return DayRow(
        row.day,
        messages,
        row.auth_rcv,
        row.auth_blk,
        row.sent,
        row.bounced,
        row.deferred,
        row.expired,
        recipients,
    )


def raise_fd_limit() -> None:
    """Let the process hold the connections of many smtpd processes (soft -> hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
