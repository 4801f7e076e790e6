"""The live daemon (``mailtally run``): follow the sources, commit batches, talk to systemd.

One loop does everything in order: read what the sources have, feed the correlator,
and hand a batch to the writer process when it holds `ingest.batch_lines` lines or its
oldest line is `ingest.batch_interval` old. Positions travel with their batch, so
whatever stops the process (SIGTERM, kill -9, a full disk) replays lines at the next
start instead of losing or doubling them. Signals only set flags; the loop acts on them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from mailtally.config import Config, JournalSourceConfig, load_config
from mailtally.correlate import Batch, Correlator
from mailtally.errors import ConfigError, MailtallyError
from mailtally.metrics import Activity, PolicyMetrics
from mailtally.notify.outbox import Outbox, check_templates
from mailtally.service import Notifier
from mailtally.sources import LiveSource
from mailtally.sources.follow import FileFollower
from mailtally.store import Position, Store, open_store
from mailtally.thresholds import CrossingJudge
from mailtally.writer import BatchWriter

if TYPE_CHECKING:
    from mailtally.metrics import Exporter
    from mailtally.policy import PolicyServer

log = logging.getLogger(__name__)

CONFIG_SETTLE = 0.3  # seconds after the config file's last change before reloading
MAX_IN_FLIGHT = 3  # batches handed to the writer and not yet committed
STATUS_EVERY = 5.0
PRUNE_EVERY = 3600.0


@dataclass(slots=True)
class _Rate:
    """Lines per second over the last status interval."""

    at: float
    lines: int


class Daemon:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the configuration file."""

    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = Notifier()
        self._stop = False
        self._reload = False
        self._positions: dict[str, Position] = {}  # handed to the writer, maybe not yet in
        self._sent_ts: deque[tuple[int, float | None]] = deque()  # (batch number, last ts)
        self._pending = 0  # records fed since the last batch
        self._pending_since = 0.0
        self._caught_up = False
        self._config_watch: ConfigWatch | None = None
        self._reload_at: float | None = None  # the config file changed: reload then
        self._wake_w = -1
        self._notices_seen = 0
        self._unparsed_seen: dict[str, int] = {}
        self.activity = Activity()
        self.exporter: Exporter | None = None
        self.policy_metrics: PolicyMetrics | None = None
        self.policy: PolicyServer | None = None

    # -- set-up --------------------------------------------------------------------

    def run(self) -> int:
        config = self.config
        self.store: Store = open_store(config.database)
        try:
            # Waits for a killed predecessor's writer to finish its last batch, so the
            # positions and open messages read below are the ones it left.
            self.writer = BatchWriter(config.database, time.time, retry=True)
        except MailtallyError:
            self.store.close()
            raise
        self.outbox: Outbox | None = None
        try:
            self.writer.set_judge(crossing_judge(config))
            self.correlator = Correlator(config.tz(), config.correlator_settings())
            self.correlator.restore(self.store.open_messages())
            self.activity.last_commit_ts = self.store.last_commit_time()
            self.sources = self._open_sources(config)
            # Threads only now: the writer process was forked before any.
            self.outbox = Outbox(config)
            self.outbox.start()
            self._start_exporter(config)
            self._start_policy(config)
            self._watch_config()
            return self._serve()
        finally:
            if self.policy is not None:
                self.policy.stop()
            if self.exporter is not None:
                self.exporter.stop()
            if self.outbox is not None:
                self.outbox.stop()
            if self._config_watch is not None:
                self._config_watch.stop()
            self.writer.close()
            for source in getattr(self, "sources", []):
                source.close()
            self.store.close()
            self.notifier.close()

    def _start_exporter(self, config: Config) -> None:
        if not config.metrics.enabled:
            return
        from mailtally.metrics import Exporter, build_registry  # prometheus_client

        registry, self.policy_metrics = build_registry(
            config.database, self.activity, lambda: self.config
        )
        try:
            self.exporter = Exporter(config.metrics, registry)
        except ConfigError:
            raise
        except MailtallyError as exc:
            # Counting matters more than being scraped: go on, loudly (`up` shows it).
            log.error("metrics not served, counting goes on: %s", exc)
            return
        self.exporter.start()

    def _start_policy(self, config: Config) -> None:
        """Listen for Postfix; returns after the server answered its self-test."""
        if not config.policy.listen:
            return
        from mailtally.policy import PolicyServer, raise_fd_limit

        raise_fd_limit()
        self.policy = PolicyServer(config, self.policy_metrics)
        self.policy.start()

    def _watch_config(self) -> None:
        """Reload when the configuration file changes, as on SIGHUP."""
        if self.config_path is None or not self.config.ingest.inotify:
            return
        try:
            self._config_watch = ConfigWatch(self.config_path, self._on_config_change)
        except OSError as exc:
            log.warning("configuration file not watched, reload with SIGHUP error=%s", exc)

    def _on_config_change(self) -> None:  # a watchdog thread
        self._reload_at = time.monotonic() + CONFIG_SETTLE
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"c")

    def _lookup(self, key: str) -> Position | None:
        return self._positions.get(key) or self.store.position(key)

    def _open_sources(self, config: Config) -> list[LiveSource]:
        sources: list[LiveSource] = []
        tz = config.tz()
        names = tuple(config.ingest.syslog_names)
        files = [s.file for s in config.sources if not isinstance(s, JournalSourceConfig)]
        if files:
            sources.append(
                FileFollower(files, self._lookup, tz, names, inotify=config.ingest.inotify)
            )
        for s in config.sources:
            if isinstance(s, JournalSourceConfig):
                from mailtally.sources.journal import JournalSource  # needs systemd-python

                sources.append(JournalSource(s.journal, self._lookup, tz, names))
        return sources

    # -- the loop --------------------------------------------------------------------

    def _serve(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_w = wake_w
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handlers = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, self.on_stop),
            signal.SIGINT: signal.signal(signal.SIGINT, self.on_stop),
            signal.SIGHUP: signal.signal(signal.SIGHUP, self._on_reload),
        }
        selector = selectors.DefaultSelector()
        try:
            selector.register(wake_r, selectors.EVENT_READ)
            selector.register(self.writer.fileno(), selectors.EVENT_READ)
            self._register(selector)
            self._prune()
            log.info(
                "mailtally running sources=%d database=%s open_messages=%d",
                len(self.sources),
                self.config.database,
                len(self.correlator.open),
            )
            self.notifier.send(READY=1, STATUS="following " + self._names())
            self._loop(selector, wake_r)
        finally:
            selector.close()
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            os.close(wake_r)
            os.close(wake_w)
        return 0

    def _register(self, selector: selectors.BaseSelector) -> None:
        for source in self.sources:
            self.activity.lines_read.setdefault(source.name, source.lines)
            fd = source.fileno()
            if fd is not None:
                selector.register(fd, selectors.EVENT_READ, source)

    def _loop(self, selector: selectors.BaseSelector, wake_r: int) -> None:
        ingest = self.config.ingest
        ping_every = self.notifier.watchdog_interval
        now = time.monotonic()
        next_ping = now
        next_status = now + STATUS_EVERY
        next_prune = now + PRUNE_EVERY
        rate = _Rate(now, 0)
        while not self._stop:
            now = time.monotonic()
            if ping_every is not None and now >= next_ping:
                self.notifier.send(WATCHDOG=1)
                next_ping = now + ping_every
            if self._reload_at is not None and now >= self._reload_at:
                self._reload_at = None
                self._reload = True
            if self._reload:
                self._reload = False
                self._do_reload(selector)
                ingest = self.config.ingest
            self.writer.drain()
            self._note_commits()
            if self.writer.notices_made != self._notices_seen and self.outbox is not None:
                self._notices_seen = self.writer.notices_made
                self.outbox.wake()
            more = False
            if self.writer.in_flight < MAX_IN_FLIGHT:
                more = self._read(ingest.batch_lines)
            now = time.monotonic()
            # Size or age, whichever comes first; and at once when the sources are read
            # to their end and the writer is idle: latency when quiet, batches when busy.
            if self._pending >= ingest.batch_lines or (
                self._pending
                and (
                    now - self._pending_since >= ingest.batch_interval
                    or (not more and self.writer.in_flight == 0)
                )
            ):
                self._commit()
            elif not self._pending and now - self._pending_since >= ingest.batch_interval:
                self._commit()  # positions that moved without records (filtered entries)
                self._pending_since = now
            if now >= next_status:
                self._status(rate, now)
                next_status = now + STATUS_EVERY
            if now >= next_prune:
                self._prune()
                next_prune = now + PRUNE_EVERY
            if more and self.writer.in_flight < MAX_IN_FLIGHT:
                continue  # a full budget was read: there is probably more
            timeout = ingest.poll_interval if self._watching() else min(ingest.poll_interval, 0.25)
            if self._pending:
                timeout = min(timeout, self._pending_since + ingest.batch_interval - now)
            if ping_every is not None:
                timeout = min(timeout, next_ping - now)
            if self._reload_at is not None:
                timeout = min(timeout, self._reload_at - now)
            for key, _ in selector.select(max(timeout, 0.0)):
                if key.fd == wake_r:
                    _drain_pipe(wake_r)
        self.notifier.send(STOPPING=1, STATUS="stopping: committing the last batch")
        log.info("stopping, committing the last batch")
        self._commit()
        self.writer.flush()
        self.writer.drain()
        self._note_commits()

    def _read(self, limit: int) -> bool:
        """Read from every source up to `limit` records in all; True if the budget ran out."""
        budget = limit - self._pending
        if budget <= 0:
            return True
        got = 0
        unparsed = self.correlator.stats.unparsed
        activity = self.activity
        for source in self.sources:
            records = source.read(budget - got)
            if records:
                if not self._pending:
                    self._pending_since = time.monotonic()
                before = sum(unparsed.values())
                self.correlator.feed_all(records)
                if sum(unparsed.values()) != before:
                    self._note_unparsed(source.name)
                self._pending += len(records)
                got += len(records)
                activity.lines_read[source.name] = source.lines
                activity.open_messages = len(self.correlator.open)
            if got >= budget:
                return True
        self._caught_up = got == 0 and not any(getattr(s, "behind", False) for s in self.sources)
        return False

    def _note_unparsed(self, source: str) -> None:
        """Give `source` the unparsed lines the correlator counted since last asked."""
        seen = self._unparsed_seen
        for reason, n in self.correlator.stats.unparsed.items():
            new = n - seen.get(reason, 0)
            if new:
                key = (source, reason)
                self.activity.unparsed[key] = self.activity.unparsed.get(key, 0) + new
                seen[reason] = n

    def _commit(self) -> None:
        batch = self.correlator.take()
        positions = [p for source in self.sources for p in source.positions()]
        self._pending = 0
        if not positions and _empty(batch):
            return
        for p in positions:
            self._positions[p.source] = p
        self.writer.submit(batch, positions)
        self._sent_ts.append((self.writer.sent, batch.last_ts))

    def _note_commits(self) -> None:
        done = self.writer.done
        while self._sent_ts and self._sent_ts[0][0] <= done:
            _, ts = self._sent_ts.popleft()
            if ts is not None:
                committed_at = self.writer.committed_at
                self.activity.last_log_ts = ts
                self.activity.last_commit_ts = committed_at
                self.activity.lag = max(0.0, committed_at - ts)
        if not self._sent_ts:
            self._positions.clear()  # all in the store now

    def _watching(self) -> bool:
        return all(s.fileno() is not None for s in self.sources)

    # -- status, retention, reload ------------------------------------------------------

    def _status(self, rate: _Rate, now: float) -> None:
        lines = sum(s.lines for s in self.sources)
        per_second = (lines - rate.lines) / max(now - rate.at, 1e-6)
        rate.at, rate.lines = now, lines
        if self._caught_up and not self._sent_ts:
            lag = "lag 0s"
        elif self.activity.last_log_ts is not None:
            lag = f"lag {max(0.0, time.time() - self.activity.last_log_ts):.1f}s"
        else:
            lag = "lag unknown"
        status = f"{per_second:,.0f} lines/s, {lag}, {len(self.correlator.open):,} open messages"
        if self.writer.in_flight >= MAX_IN_FLIGHT:
            status += ", waiting for the database"
        elif not self._caught_up:
            status += ", catching up"
        self.notifier.send(STATUS=status)
        log.debug("status %s", status)

    def _prune(self) -> None:
        before = time.time() - self.config.details_days * 86400
        self.writer.prune(before)

    def _do_reload(self, selector: selectors.BaseSelector) -> None:
        self.notifier.send(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )
        try:
            new = load_config(self.config_path)
            check_templates(new)
        except ConfigError as exc:
            log.error("configuration not reloaded, the running one stays: %s", exc)
            self.activity.reloads["failure"] += 1
            self.activity.last_reload_ok = False
            self.notifier.send(READY=1)
            return
        old = self.config
        if new.database != old.database:
            log.warning(
                "database change ignored until restart running=%s configured=%s",
                old.database,
                new.database,
            )
            new = new.model_copy(update={"database": old.database})
        self.correlator.settings = new.correlator_settings()
        self.writer.set_judge(crossing_judge(new))
        if self.outbox is not None:
            self.outbox.reload(new)
        if self.policy is not None:
            self.policy.reload(new)
        if new.sources != old.sources or new.ingest != old.ingest or new.timezone != old.timezone:
            # Close the sources only at a batch boundary, with their positions in.
            self._commit()
            self.writer.flush()
            self.writer.drain()
            self._note_commits()
            for source in self.sources:
                fd = source.fileno()
                if fd is not None:
                    selector.unregister(fd)
                source.close()
            self.sources = []
            try:
                self.sources = self._open_sources(new)
            except MailtallyError as exc:
                log.error("sources not reopened, keeping the old ones: %s", exc)
                self.sources = self._open_sources(old)
                new = old
            self._register(selector)
            if new.tz() != old.tz():
                log.warning("timezone change applies to new lines only")
        if new.metrics != old.metrics:
            log.warning("metrics settings change ignored until restart")
        self.config = new
        self.activity.reloads["success"] += 1
        self.activity.last_reload_ok = True
        log.info("configuration reloaded path=%s", self.config_path)
        self.notifier.send(READY=1, STATUS="configuration reloaded")

    def _names(self) -> str:
        return "; ".join(s.name for s in self.sources)

    def on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True


def _empty(batch: Batch) -> bool:
    return not (batch.counts or batch.details or batch.upserts or batch.deletes)


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def crossing_judge(config: Config) -> CrossingJudge | None:
    """What judges each batch for crossing notices, if the config asks for them."""
    n = config.notify
    if not n.enabled or n.when not in {"crossing", "both"}:
        return None
    return CrossingJudge(config.thresholds_rules(), config.tz())


class ConfigWatch:
    """Call `changed` (from watchdog's thread) when the file at `path` is written or replaced."""

    def __init__(self, path: Path, changed: Callable[[], None]) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver

        target = path.absolute()

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in {"opened", "closed_no_write"}:
                    return
                paths = (event.src_path, getattr(event, "dest_path", ""))
                if any(Path(os.fsdecode(p)) == target for p in paths if p):
                    changed()

        self._observer = InotifyObserver()
        self._observer.daemon = True
        self._observer.schedule(Handler(), str(target.parent), recursive=False)
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=2)
