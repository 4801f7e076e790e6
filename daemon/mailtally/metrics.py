"""Serve mailtally's metrics to Prometheus on ``metrics.listen`` (``/metrics`` only).

Nothing is counted twice for metrics: at scrape time the collector reads what the
daemon already keeps. Counters of the log's history (deliveries, messages, rejects,
SASL failures, evictions) are the store's ``totals``, which every batch advances in
the transaction that commits its counts. They survive restarts, equal what the
database holds, and a backfill with ``mailtally ingest`` shows up in them too; a
``rate()`` sees a reset only if the database itself is replaced. Counters of reading
(lines read per source) start at zero with the process, as a process's own counters
do; Prometheus's reset handling covers them.

The port, 9154, is the one allocated to postfix_exporter: mailtally exports what
postfix_exporter does and is meant to take its place on a relay. Set
``metrics.listen`` to run both.
"""

from __future__ import annotations

import base64
import hmac
import logging
import platform
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailtally import __version__
from mailtally.config import parse_listen
from mailtally.correlate import (
    DELIVERIES,
    EVICTED,
    MESSAGES_AUTH,
    MESSAGES_TOTAL,
    REJECT_CLASSES,
    REJECTS,
    SASL_FAILURES,
)
from mailtally.errors import ConfigError, MailtallyError, StoreError
from mailtally.store import Store, open_reader
from mailtally.thresholds import Thresholds

if TYPE_CHECKING:
    from mailtally.config import Config, MetricsSection

log = logging.getLogger(__name__)

DELIVERY_STATUSES = ("sent", "bounced", "deferred", "expired")
OVER_CACHE = 10.0  # seconds a senders-over-threshold count is reused between scrapes
POLICY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class Activity:
    """What the daemon's loop reports; read by the scrape thread (copies, no locks)."""

    lines_read: dict[str, int] = field(default_factory=dict)  # source -> lines
    unparsed: dict[tuple[str, str], int] = field(default_factory=dict)  # (source, reason)
    lag: float | None = None
    last_log_ts: float | None = None
    last_commit_ts: float | None = None
    open_messages: int = 0
    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    last_reload_ok: bool = True


class PolicyMetrics:
    """The policy server's instruments (it increments them as it answers)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "mailtally_policy_requests",
            "Policy delegation requests answered, by the action answered.",
            ["action"],
            registry=registry,
        )
        self.seconds = Histogram(
            "mailtally_policy_decision_seconds",
            "Time from a complete policy request to its answer.",
            buckets=POLICY_BUCKETS,
            registry=registry,
        )
        self.failopen = Counter(
            "mailtally_policy_failopen",
            "Policy requests answered with the fail-open action, by cause.",
            ["reason"],
            registry=registry,
        )


class MailtallyCollector(Collector):
    """Build every mailtally_* family at scrape time from the daemon and the store."""

    def __init__(
        self,
        database: Path,
        activity: Activity,
        config: Callable[[], Config],
    ) -> None:
        self.database = database
        self.activity = activity
        self.config = config
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._over: tuple[float, str, dict[str, int]] | None = None
        self._rules: tuple[Config, Thresholds] | None = None

    def collect(self) -> Iterator[Metric]:
        yield from self._activity()
        with self._lock:
            try:
                store = self._open()
                yield from self._history(store)
                yield from self._today(store)
            except (StoreError, MailtallyError) as exc:
                log.warning("metrics from the database unavailable error=%s", exc)
                self._close()

    def _open(self) -> Store:
        if self._store is None:
            self._store = open_reader(self.database)
        return self._store

    def _close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _activity(self) -> Iterator[Metric]:
        a = self.activity
        info = GaugeMetricFamily(
            "mailtally_build_info",
            "mailtally's version and Python's; the value is always 1.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        read = CounterMetricFamily(
            "mailtally_lines_read", "Log lines read since start, by source.", labels=["source"]
        )
        parsed = CounterMetricFamily(
            "mailtally_lines_parsed",
            "Log lines read and parsed since start (foreign programs included), by source.",
            labels=["source"],
        )
        unparsed = CounterMetricFamily(
            "mailtally_lines_unparsed",
            "Log lines that could not be parsed since start, by source and reason.",
            labels=["source", "reason"],
        )
        bad = dict(a.unparsed)
        for source, lines in sorted(dict(a.lines_read).items()):
            read.add_metric([source], lines)
            failed = sum(n for (s, _), n in bad.items() if s == source)
            parsed.add_metric([source], lines - failed)
        for (source, reason), n in sorted(bad.items()):
            unparsed.add_metric([source, reason], n)
        yield read
        yield parsed
        yield unparsed
        for name, text, value in (
            (
                "mailtally_ingest_lag_seconds",
                "At the last commit: its time minus the log time of its newest line.",
                a.lag,
            ),
            (
                "mailtally_last_log_timestamp_seconds",
                "Log time of the newest line committed, seconds since the epoch.",
                a.last_log_ts,
            ),
            (
                "mailtally_last_commit_timestamp_seconds",
                "Wall time of the last commit to the database, seconds since the epoch.",
                a.last_commit_ts,
            ),
        ):
            if value is not None:
                yield GaugeMetricFamily(name, text, value=value)
        yield GaugeMetricFamily(
            "mailtally_open_messages",
            "Messages the correlator follows (queued, not yet seen removed).",
            value=a.open_messages,
        )
        reloads = CounterMetricFamily(
            "mailtally_config_reloads",
            "Configuration reloads (SIGHUP or a change of the file), by result.",
            labels=["result"],
        )
        for result, n in sorted(dict(a.reloads).items()):
            reloads.add_metric([result], n)
        yield reloads
        yield GaugeMetricFamily(
            "mailtally_config_last_reload_successful",
            "1 if the last configuration reload succeeded (or none was tried), else 0.",
            value=1 if a.last_reload_ok else 0,
        )

    def _history(self, store: Store) -> Iterator[Metric]:
        totals = store.totals()
        deliveries = CounterMetricFamily(
            "mailtally_deliveries",
            "Delivery attempts logged, by status and Postfix transport (service).",
            labels=["status", "transport"],
        )
        by_delivery = {(a, b): n for (name, a, b), n in totals.items() if name == DELIVERIES}
        for (status, transport), n in sorted(by_delivery.items()):
            deliveries.add_metric([status, transport or "none"], n)
        yield deliveries
        rejects = CounterMetricFamily(
            "mailtally_rejects",
            "SMTP rejects logged (NOQUEUE or with a queue id), by class of reply.",
            labels=["reason"],
        )
        for reason in REJECT_CLASSES:
            rejects.add_metric([reason], totals.get((REJECTS, reason, ""), 0))
        yield rejects
        for name, key, text in (
            ("mailtally_messages", MESSAGES_TOTAL, "Messages queued (qmgr from=), once each."),
            (
                "mailtally_messages_auth",
                MESSAGES_AUTH,
                "Messages queued that arrived with SMTP AUTH.",
            ),
            ("mailtally_sasl_failures", SASL_FAILURES, "SASL authentication failures logged."),
            (
                "mailtally_evicted_messages",
                EVICTED,
                "Open messages given up on (never seen to finish within the bounds).",
            ),
        ):
            yield CounterMetricFamily(name, text, value=totals.get((key, "", ""), 0))
        states = store.notice_states()
        notifications = CounterMetricFamily(
            "mailtally_notifications",
            "Notices to senders and admins by outcome.",
            labels=["state"],
        )
        for state in ("sent", "failed", "skipped"):
            notifications.add_metric([state], states.get(state, 0))
        yield notifications
        yield GaugeMetricFamily(
            "mailtally_notifications_queued",
            "Notices waiting to be sent (new or being retried).",
            value=states.get("pending", 0),
        )

    def _today(self, store: Store) -> Iterator[Metric]:
        config = self.config()
        today = datetime.now(config.tz()).date().isoformat()
        over = self._senders_over(store, config, today)
        gauge = GaugeMetricFamily(
            "mailtally_senders_over_threshold",
            "Senders whose count today is over a threshold level, by level.",
            labels=["level"],
        )
        for level, n in sorted(over.items()):
            gauge.add_metric([level], n)
        yield gauge
        top = config.metrics.top_senders
        if top:
            busiest = GaugeMetricFamily(
                "mailtally_top_sender_messages",
                f"Messages today of the {top} busiest senders (metrics.top_senders).",
                labels=["sender"],
            )
            for sender, row in store.top(today, "messages", top):
                busiest.add_metric([sender], row.messages)
            yield busiest

    def _senders_over(self, store: Store, config: Config, today: str) -> dict[str, int]:
        now = time.monotonic()
        if self._over is not None and self._over[1] == today and now - self._over[0] < OVER_CACHE:
            return self._over[2]
        if self._rules is None or self._rules[0] is not config:
            self._rules = (config, config.thresholds_rules())
        rules = self._rules[1]
        counts = dict.fromkeys(rules.section.default.levels(), 0)
        for sender, row in store.rows_of_day(today):
            for level in {lv.level for lv, _ in rules.effective(sender).passed(row)}:
                counts[level] = counts.get(level, 0) + 1
        self._over = (now, today, counts)
        return counts


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class Exporter:
    """The HTTP(S) server of ``/metrics``, in its own thread."""

    def __init__(self, settings: MetricsSection, registry: CollectorRegistry) -> None:
        host, port = parse_listen(settings.listen)
        metrics_app = make_wsgi_app(registry)
        expected = _expected_auth(settings)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"mailtally serves /metrics only\n"]
            if expected is not None:
                given = environ.get("HTTP_AUTHORIZATION", "").encode()
                if not hmac.compare_digest(given, expected):
                    start_response(
                        "401 Unauthorized",
                        [("WWW-Authenticate", 'Basic realm="mailtally"')],
                    )
                    return [b"authentication required\n"]
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result

        _Server.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._server = make_server(
                host or "0.0.0.0",
                port,
                app,
                server_class=_Server,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise MailtallyError(f"metrics.listen {settings.listen}: {exc.strerror}") from exc
        if settings.tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(settings.tls_cert, settings.tls_key)
            except (OSError, ssl.SSLError) as exc:
                self._server.server_close()
                raise ConfigError(f"metrics.tls_cert: {exc}") from exc
            # The handshake happens in the request's thread, not in accept().
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.address = self._server.server_address
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="mailtally-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("metrics served address=%s", self.address[:2])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _expected_auth(settings: MetricsSection) -> bytes | None:
    if settings.basic_auth_username is None:
        return None
    assert settings.basic_auth_password_file is not None
    try:
        password = settings.basic_auth_password_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"metrics.basic_auth_password_file: {exc.strerror}") from exc
    token = base64.b64encode(f"{settings.basic_auth_username}:{password}".encode())
    return b"Basic " + token


def build_registry(
    database: Path, activity: Activity, config: Callable[[], Config]
) -> tuple[CollectorRegistry, PolicyMetrics]:
    """A registry with mailtally's families, the policy instruments and process metrics."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MailtallyCollector(database, activity, config))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry, PolicyMetrics(registry)
