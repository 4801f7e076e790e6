"""The ``mailtally`` command: ingest, report, top, check-config, run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import ClassVar

from mailtally import __version__
from mailtally.config import DEFAULT_PATH, Config, JournalSourceConfig, load_config
from mailtally.correlate import COLUMNS, normalise
from mailtally.errors import MailtallyError, UsageError
from mailtally.ingest import Ingester, order_files, tune_gc
from mailtally.report import (
    as_csv,
    as_json,
    as_table,
    build_report,
    top_as_csv,
    top_as_table,
    top_rows,
)
from mailtally.store import open_reader, open_store
from mailtally.thresholds import CrossingJudge
from mailtally.writer import BatchWriter

log = logging.getLogger(__name__)

EPILOG = """\
exit status:
  0  success
  1  runtime failure (unreadable log, database error)
  2  usage or configuration error

Each error is one line on stderr; --debug adds the traceback.
See etc/mailtally.yaml for every configuration key and its default."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep our paragraphs as written and show each option's real default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _date(text: str) -> str:
    if text in {"today", "yesterday"} or _is_iso_date(text):
        return text
    raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, today or yesterday, got {text!r}")


def _is_iso_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return len(text) == len("2026-12-03")


def _positive(text: str) -> int:
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailtally",
        description="Count what each sender sends through a Postfix relay, per day, from "
        "the mail log,\nand report it.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"mailtally {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress (INFO) on stderr"
    )
    parser.add_argument(
        "--debug", action="store_true", help="log everything and show tracebacks on errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_ingest(sub)
    _add_report(sub)
    _add_top(sub)
    _add_check_config(sub)
    _add_run(sub)
    _add_frontend(sub)
    return parser


def _common(p: argparse.ArgumentParser, db: bool = True) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help=f"configuration file (default: {DEFAULT_PATH} if it exists)",
    )
    if db:
        p.add_argument(
            "--db",
            type=Path,
            metavar="DB",
            help="SQLite database, overriding the configuration's 'database'",
        )


def _add_ingest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ingest",
        formatter_class=_Formatter,
        epilog=EPILOG,
        help="count log files into the database (backfill; idempotent)",
        description="""\
Read Postfix log files and add what they record to the database: per-sender daily
counters, delivery details and the state of messages still in the queue.

Files may be plain or gzip-compressed (mail.log.2.gz) and are read oldest first by
modification time, whatever order they are named in. Each file is recognised by its
first line, so ingesting a file again counts nothing twice, a file that has grown since
is read from where the last run stopped, and a rotated copy (mail.log -> mail.log.1 ->
mail.log.2.gz) resumes where the original left off. A last line without its newline is
left for the next run, except in a compressed file.

Traditional syslog stamps (Dec  3 09:41:40) have no year: it is taken from the file's
modification time, and stamps later than that belong to the year before.

examples:
  mailtally ingest /var/log/mail.log.1 /var/log/mail.log
  mailtally ingest --db /tmp/t.db --host relay2 relay2/mail.log.*.gz""",
    )
    _common(p)
    p.add_argument(
        "--host",
        metavar="NAME",
        help="record NAME as the relay of every line instead of the syslog host",
    )
    p.add_argument(
        "--notify",
        action="store_true",
        help="make crossing notices for the days read, whatever their age (the daemon "
        "sends them); without it a backfill mails nobody",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="log files to read")


def _add_report(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        formatter_class=_Formatter,
        epilog=EPILOG,
        help="one sender's per-day summary (and delivery details)",
        description="""\
Print one sender's counters for every day from --since to --until (local dates in the
configured timezone, both included; days without mail show zeros), then a Total row.

columns:
  sum       auth_blk + auth_rcv + bounced + deferred + expired + sent
  auth_blk  submissions blocked: SASL login failures, rejects on submission services
  auth_rcv  messages received with SMTP AUTH
  bounced   recipients bounced (status=bounced)
  deferred  delivery attempts deferred (each retry counts)
  expired   messages returned to the sender after the queue lifetime
  sent      recipients delivered (status=sent)
  messages  messages queued from the sender

--details adds one row per delivery attempt and reject: time, sender IP, relay, queue
id, recipient, status and the remote server's response.

--mail sends the same report, details included, as the query frontend does: a text
and an HTML part, through notify.smtp, from notify.from (at most 2000 detail rows).

examples:
  mailtally report --sender alice@example.edu
  mailtally report --sender alice@example.edu --since 2026-11-01 --details --format json
  mailtally report --sender alice@example.edu --mail alice@example.edu --language zh-TW""",
    )
    _common(p)
    p.add_argument(
        "--sender",
        required=True,
        metavar="ADDR",
        help="envelope sender (or SASL username); case does not matter; <> for the null sender",
    )
    p.add_argument(
        "--since",
        type=_date,
        metavar="DATE",
        help="first day, YYYY-MM-DD (default: 30 days before --until)",
    )
    p.add_argument(
        "--until", type=_date, metavar="DATE", default="today", help="last day, YYYY-MM-DD"
    )
    p.add_argument("--details", action="store_true", help="add per-delivery rows")
    p.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output format"
    )
    p.add_argument(
        "--mail",
        metavar="ADDR",
        help="mail the report (with details) to ADDR through notify.smtp, from notify.from,"
        " instead of printing it",
    )
    p.add_argument(
        "--language",
        choices=("en", "zh-TW"),
        help="language of the --mail report (default: notify's language for ADDR)",
    )


def _add_top(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "top",
        formatter_class=_Formatter,
        epilog=EPILOG,
        help="the busiest senders of a day",
        description="""\
List the senders with the highest counts on one day (a local date in the configured
timezone), busiest first.

examples:
  mailtally top
  mailtally top --day yesterday --by bounced --limit 50 --format csv""",
    )
    _common(p)
    p.add_argument(
        "--day",
        type=_date,
        default="today",
        metavar="DATE",
        help="the day, YYYY-MM-DD, today or yesterday",
    )
    p.add_argument("--limit", type=_positive, default=20, metavar="N", help="how many senders")
    p.add_argument(
        "--by", choices=("sum", *COLUMNS), default="messages", help="the column to rank by"
    )
    p.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output format"
    )


def _add_check_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check-config",
        formatter_class=_Formatter,
        epilog=EPILOG,
        help="validate a configuration file",
        description="""\
Validate FILE as mailtally would at start and on reload (every key, and every
notification template rendered with sample data), and print 'FILE: ok'. An error
names the file, the line and the key.

examples:
  mailtally check-config /etc/mailtally/mailtally.yaml
  mailtally check-config /etc/mailtally/mailtally.yaml --sender alice@example.edu""",
    )
    p.add_argument("file", type=Path, metavar="FILE", help="configuration file")
    p.add_argument(
        "--sender",
        metavar="ADDR",
        help="also show the limits that apply to ADDR (an address or SASL username)",
    )


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        formatter_class=_Formatter,
        epilog=EPILOG,
        help="follow the mail log as a daemon (systemd Type=notify)",
        description="""\
Follow the configured sources (syslog files and/or the systemd journal) and keep the
database current, committing a batch when it holds ingest.batch_lines lines or its
oldest line is ingest.batch_interval old (default 200 ms). It counts exactly what
'mailtally ingest' counts for the same lines, and shares its positions: a file or
journal cursor is resumed where either left off.

Files are followed across logrotate's rename+create, copytruncate, delaycompress and
compress; after a stop, rotated files (mail.log.1, mail.log.2.gz, mail.log-DATE) are
read on from the last position before the live file. Nothing is lost or counted twice
by SIGTERM, kill -9 or a restart; a locked or full database is retried.

signals:
  SIGTERM, SIGINT  commit the last batch and exit
  SIGHUP           reload the configuration; an invalid one is logged and ignored

Under systemd (Type=notify) it sends READY=1 once positions are restored, WATCHDOG=1
from its main loop when WatchdogSec= is set, STATUS= with lines/s, lag and open
messages, and STOPPING=1 on SIGTERM. It logs to stderr with syslog priority prefixes
for the journal (no timestamps of its own there).

examples:
  mailtally run --config /etc/mailtally/mailtally.yaml
  systemctl enable --now mailtally""",
    )
    _common(p, db=False)


def _add_frontend(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "frontend",
        formatter_class=_Formatter,
        epilog=EPILOG,
        help="serve the query form that mails senders their reports (waitress)",
        description="""\
Serve the "SMTP log query" form on frontend.listen: a sender of the configured domains
asks for their report over a date range and gets it by mail, at that address only.
The page shows no data. It reads the database read-only and keeps its own state
(used verification codes, rate limits) in frontend.state. Run it behind a reverse
proxy for HTTPS (see frontend.proxies in etc/mailtally.yaml).

examples:
  mailtally frontend --config /etc/mailtally/mailtally.yaml
  mailtally frontend --listen 127.0.0.1:8081""",
    )
    _common(p, db=False)
    p.add_argument("--listen", metavar="HOST:PORT", help="instead of frontend.listen")


def _config_path(args: argparse.Namespace) -> Path | None:
    """--config, else the default file if it exists, else None (the defaults)."""
    path: Path | None = args.config
    if path is None and DEFAULT_PATH.exists():
        path = DEFAULT_PATH
    return path


def _config(args: argparse.Namespace) -> Config:
    path = _config_path(args)
    config = load_config(path)
    db = getattr(args, "db", None)
    if db is not None:
        config = config.model_copy(update={"database": db})
    return config


def _day(text: str, tz: tzinfo) -> date:
    today = datetime.now(tz).date()
    if text == "today":
        return today
    if text == "yesterday":
        return today - timedelta(days=1)
    return date.fromisoformat(text)


def cmd_ingest(args: argparse.Namespace) -> int:
    config = _config(args)
    files = order_files(args.files)
    store = open_store(config.database)
    tune_gc()
    writer = BatchWriter(config.database, time.time)
    if args.notify:
        writer.set_judge(CrossingJudge(config.thresholds_rules(), config.tz(), days_back=None))
    try:
        ingester = Ingester(store, config, host=args.host, writer=writer)
        for path in files:
            result = ingester.ingest(path)
            log.info(
                "file ingested path=%s lines=%d resumed_at=%d",
                path,
                result.lines,
                result.skipped_bytes,
            )
        writer.close()
        pruned = store.prune_details(time.time() - config.details_days * 86400)
        if pruned:
            log.info("details pruned rows=%d older_than_days=%d", pruned, config.details_days)
        stats = ingester.correlator.stats
        if stats.unparsed:
            log.warning(
                "lines unparsed %s",
                " ".join(f"{k}={v}" for k, v in sorted(stats.unparsed.items())),
            )
        log.info(
            "ingest done records=%d messages=%d deliveries=%d rejects=%d open=%d "
            "evicted=%d orphan_deliveries=%d",
            stats.records,
            stats.messages,
            stats.deliveries,
            stats.rejects,
            len(ingester.correlator.open),
            stats.evicted,
            stats.orphan_deliveries,
        )
    finally:
        writer.close()
        store.close()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    # Imported here: only --mail needs Jinja2 and SMTP.
    import socket

    from mailtally.notify.message import safe_address
    from mailtally.notify.outbox import PermanentError, TemporaryError
    from mailtally.reportmail import ReportRequest, mail_report

    config = _config(args)
    tz = config.tz()
    until = _day(args.until, tz)
    since = _day(args.since, tz) if args.since else until - timedelta(days=30)
    if since > until:
        raise UsageError(f"--since {since} is after --until {until}")
    mail = None if args.mail is None else args.mail.strip()
    if mail is not None and safe_address(mail) is None:
        raise UsageError(f"--mail {args.mail!r}: expected a plain address such as a@example.edu")
    # The same key the counters were kept under (case, +extension per the config).
    sender = normalise(args.sender.strip().strip("<>"), config.correlator_settings())
    store = open_reader(config.database)
    try:
        report = build_report(
            store, sender, since, until, tz, details=args.details or mail is not None
        )
    finally:
        store.close()
    if mail is None:
        render = {"json": as_json, "csv": as_csv, "table": as_table}[args.format]
        sys.stdout.write(render(report) + ("\n" if args.format == "json" else ""))
        return 0
    language = args.language or config.notify.language_for(mail)
    request = ReportRequest(mail, since, until, "command line", language, datetime.now(tz))
    try:
        mail_report(config, report, request, socket.getfqdn())
    except (TemporaryError, PermanentError) as exc:
        reason = " ".join(str(exc).split())  # a multi-line SMTP reply stays one line
        raise MailtallyError(f"report for {sender} not mailed to {mail}: {reason}") from exc
    print(f"report for {sender} mailed to {mail}")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    config = _config(args)
    day = _day(args.day, config.tz())
    store = open_reader(config.database)
    try:
        rows = top_rows(store, day, args.by, args.limit)
    finally:
        store.close()
    if args.format == "json":
        sys.stdout.write(
            json.dumps(
                {"day": day.isoformat(), "by": args.by, "senders": rows},
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        )
    elif args.format == "csv":
        sys.stdout.write(top_as_csv(rows))
    else:
        sys.stdout.write(top_as_table(day, args.by, rows))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from mailtally.notify.message import Templates

    config = load_config(args.file)
    Templates(config.notify.templates).check()
    if config.frontend:
        from mailtally.frontend.settings import frontend_settings

        frontend_settings(config, args.file)
    if any(isinstance(s, JournalSourceConfig) for s in config.sources):
        from mailtally.sources.journal import journal_missing

        missing = journal_missing()
        if missing is not None:
            raise MailtallyError(f"{args.file}: sources: {missing}")
    print(f"{args.file}: ok")
    if args.sender:
        sender = normalise(args.sender.strip().strip("<>"), config.correlator_settings())
        effective = config.thresholds_rules().effective(sender)
        print(f"sender {sender}: rules applied: {' < '.join(effective.applied)}")
        if effective.exempt:
            print("  exempt: no limits")
        actions = config.policy.actions if config.policy.listen else {}
        for level in effective.levels:
            action = actions.get(level.level)
            suffix = f" -> policy: {action}" if action and not effective.exempt else ""
            print(f"  {level.level}: more than {level.limit} {level.metric} a day{suffix}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mailtally.daemon import Daemon  # keeps the other commands' start-up light

    path = _config_path(args)
    config = load_config(path)
    tune_gc()
    daemon = Daemon(config, path)
    # From here on a SIGTERM (systemd stopping a slow start) ends the run cleanly: the
    # daemon checks the flag before it reads anything.
    signal.signal(signal.SIGTERM, daemon.on_stop)
    signal.signal(signal.SIGINT, daemon.on_stop)
    return daemon.run()


def cmd_frontend(args: argparse.Namespace) -> int:
    from mailtally.frontend.__main__ import serve  # Flask and waitress only here

    path = _config_path(args)
    if path is None:
        raise UsageError("the frontend needs a configuration file (--config FILE)")
    serve(path, args.listen)
    return 0


COMMANDS = {
    "ingest": cmd_ingest,
    "report": cmd_report,
    "top": cmd_top,
    "check-config": cmd_check_config,
    "run": cmd_run,
    "frontend": cmd_frontend,
}


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority (``<3>``), which journald reads."""

    PRIORITIES: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2,
        logging.ERROR: 3,
        logging.WARNING: 4,
        logging.INFO: 6,
        logging.DEBUG: 7,
    }

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        priority = self.PRIORITIES.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def setup_logging(verbose: bool, debug: bool, daemon: bool = False) -> None:
    """Log to stderr; under systemd without timestamps, whose journal adds its own."""
    level = logging.DEBUG if debug else logging.INFO if verbose or daemon else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if daemon and not debug:
        logging.getLogger("watchdog").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.debug, daemon=args.command in {"run", "frontend"})
    try:
        return COMMANDS[args.command](args)
    except MailtallyError as exc:
        if args.debug:
            log.exception("failed")
        print(f"mailtally {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (| head); not an error of ours.
        sys.stderr.close()
        return 0
