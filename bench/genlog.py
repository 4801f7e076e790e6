"""Write a seeded, realistic multi-relay Postfix log and the exact counters it implies.

The log is what a central rsyslog (traditional or ``RSYSLOG_FileFormat``) or Postfix's own
``maillog_file`` (postlogd) would hold for a few relay hosts. The truth JSON is counted from
the generator's model as each line is written, never by reading the log back, with
DESIGN.md's definitions (messages on a queue id's first qmgr ``from=``, deliveries per
recipient line, ``expired`` per qmgr "returned to sender" line, day = date of that line).

Line forms follow the format strings in the Postfix 3.7 binaries (Debian 12): postlogd
stamps are ``%b %d %H:%M:%S`` (``Dec 03 09:41:40``: zero-padded day, no year, no fraction);
a SASL failure ends in ``, sasl_username=NAME`` or ``, sasl_username=(unavailable)``; an
expired message is one qmgr line ``QID: from=<s>, status=expired, returned to sender``
(no per-recipient line), followed by bounce's ``sender non-delivery notification``.
Service names are Debian 12's master.cf: ``postfix/submission/smtpd`` (587),
``postfix/submissions/smtpd`` (465) and ``postfix/relay/smtp`` (its ``syslog_name`` is
``postfix/$service_name``); deferrals to a destination that qmgr has marked dead come
from ``postfix/error``. As in the real logs of scenario/README.md, libsasl's nameless
``SASL authentication failure: Password verification failed`` precedes a known user's
failure, and bounce's notification line comes before or after the new message's cleanup.

The truth also carries ``line_kinds`` (lines written per kind), ``recipients`` (recipients
queued per sender) and the generator's parameters.

Model: each relay runs a main ``postfix`` instance (relay1 and relay3 short queue ids,
relay2 long ones); relay1 also runs ``postfix-out`` (long ids), fed by application servers.
``maximal_queue_lifetime = 2d``, ``bounce_queue_lifetime = 1d``, backoff 300s to 4000s.
Mail is not chained between instances, so each message is queued exactly once.
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import io
import json
import os
import random
import sys
from bisect import bisect
from collections import deque
from collections.abc import Generator
from dataclasses import asdict, dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

GENERATOR_VERSION = 3  # bump whenever the output for given params changes
FORMATS = ("traditional", "rfc3339", "postlogd")
DEFAULT_START = "2026-12-03T00:00:00+00:00"
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
COLUMNS = ("messages", "auth_rcv", "auth_blk", "sent", "bounced", "deferred", "expired")
MESSAGES, AUTH_RCV, AUTH_BLK, SENT, BOUNCED, DEFERRED, EXPIRED, RCPTS = range(8)
STATUS_COL = {"sent": SENT, "bounced": BOUNCED, "deferred": DEFERRED}
NULL_KEY = "<>"
HEAVY = "heavy@campus.example"
US = 1_000_000  # model time is integer microseconds since the epoch
DAY_US = 86_400 * US
MAX_LIFETIME_US = 2 * DAY_US
BOUNCE_LIFETIME_US = DAY_US
MIN_BACKOFF, MAX_BACKOFF = 300, 4000  # seconds
HEAVY_PER_DAY = 260
# Lines per arrival of the main stream and lines a day of the fixed-rate streams (heavy
# sender, anvil/scache statistics), measured: they set the arrival rate so that --lines
# lines span about --days days.
LINES_PER_ARRIVAL = 8.9
HEAVY_LINES_PER_DAY = 2500
STATS_LINES_PER_DAY = 480  # per relay
NOISE_PER_ARRIVAL = 0.04  # background warnings etc., per instance and main-stream arrival
HOURLY = (
    0.25,
    0.2,
    0.15,
    0.15,
    0.15,
    0.2,
    0.35,
    0.6,
    1.1,
    1.5,
    1.6,
    1.6,
    1.4,
    1.5,
    1.6,
    1.6,
    1.5,
    1.3,
    1.1,
    0.9,
    0.8,
    0.7,
    0.5,
    0.35,
)
SESSION_MIX = (
    ("inbound", 30),
    ("relay_out", 22),
    ("submission", 16),
    ("out_instance", 5),
    ("pickup", 2),
    ("reject25", 13),
    ("reject_sub", 2),
    ("sasl_fail", 5),
    ("scanner", 5),
)
LOCAL_ROUTES = ("local", "virtual", "pipe", "lmtp")
# Debian 12's master.cf runs the relay transport with -o syslog_name=postfix/$service_name
AGENTS = {"relay": "relay/smtp"}
B52 = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"  # long queue id digits
B51 = B52[:-1]  # inode digits; "z" separates the two parts
TLS_IN = (
    "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519"
    " server-signature RSA-PSS (2048 bits) server-digest SHA256"
)
TLS_OUT = (
    "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519"
    " server-signature ECDSA (P-256) server-digest SHA256"
)
FIRST = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "niaj",
    "olivia",
    "peggy",
    "rupert",
    "sybil",
    "trent",
    "victor",
    "walter",
    "yuki",
    "zoe",
    "ming",
    "wei",
    "hui",
    "chen",
    "li",
    "mei",
    "jun",
    "yu",
    "ting",
    "hao",
    "kai",
    "lin",
    "an",
    "jia",
    "xin",
    "yan",
    "pei",
    "shu",
    "ling",
)
LAST = (
    "chen",
    "lin",
    "huang",
    "chang",
    "li",
    "wang",
    "wu",
    "liu",
    "tsai",
    "yang",
    "hsu",
    "cheng",
    "hsieh",
    "kuo",
    "hung",
    "tseng",
    "chiu",
    "liao",
    "lai",
    "chou",
    "smith",
    "jones",
    "brown",
    "miller",
    "davis",
    "garcia",
    "lopez",
    "martin",
    "lee",
    "clark",
)
WORDS = (
    "acme",
    "globex",
    "initech",
    "umbrella",
    "hooli",
    "vandelay",
    "stark",
    "wayne",
    "tyrell",
    "cyberdyne",
    "soylent",
    "wonka",
    "gringotts",
    "oceanic",
    "monarch",
    "aperture",
    "contoso",
    "fabrikam",
    "northwind",
    "tailspin",
    "litware",
    "proseware",
    "adatum",
    "fourth",
    "coho",
    "lucerne",
    "margie",
    "wingtip",
    "alpine",
    "humongous",
    "univ",
    "college",
    "institute",
    "research",
    "press",
    "journal",
    "society",
    "lab",
)
ATTACK_NAMES = (
    "admin",
    "info",
    "test",
    "sales",
    "support",
    "webmaster",
    "office",
    "user",
    "postmaster",
    "contact",
    "mail",
    "root",
    "guest",
    "service",
    "hr",
    "marketing",
)
SYSTEM_SENDERS = (
    "noreply@apps.campus.example",
    "registrar@campus.example",
    "alerts@monitor.campus.example",
    "library@lib.campus.example",
    "lms@apps.campus.example",
    "helpdesk@campus.example",
    "payroll@apps.campus.example",
    "no-reply@portal.campus.example",
)
WEBMAIL = "webmail.campus.example[10.0.0.25]"
STORE = "mx.campus.example[10.0.0.20]:25"  # the mail store's SMTP side, used by postfix-out

Effects = tuple[tuple[str, int], ...] | None
# (time, host or None for a wake-up, program, pid, text, kind, truth effects)
Item = tuple[int, str | None, str, int, str, str, Effects]
Proc = Generator[Item, None, None]


@dataclass(frozen=True)
class Params:
    """Everything that determines a generated file: the same params give the same bytes."""

    lines: int
    seed: int
    format: str
    start: str
    relays: int
    days: int
    timezone: str


def default_days(lines: int) -> int:
    """Return the span of arrivals for `lines`: 3 days for small files, up to a week."""
    return max(3, min(7, round(lines / 250_000)))


def fmt_delay(x: float) -> str:
    """Format seconds as Postfix logs delays: two significant digits below ten."""
    if x >= 10:
        return str(int(x))
    if x >= 1:
        return f"{x:.1f}".rstrip("0").rstrip(".")
    if x < 0.01:
        return "0"
    return f"{x:.2f}".rstrip("0").rstrip(".")


def smtpd_stats(counts: list[tuple[str, int, int]]) -> str:
    """Return smtpd's disconnect summary, e.g. ``ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4``."""
    parts = []
    ok_sum = tot_sum = 0
    for name, ok, tot in counts:
        if tot:
            parts.append(f"{name}={ok}" if ok == tot else f"{name}={ok}/{tot}")
            ok_sum += ok
            tot_sum += tot
    parts.append(f"commands={ok_sum}" if ok_sum == tot_sum else f"commands={ok_sum}/{tot_sum}")
    return " ".join(parts)


class Stamper:
    """Format line stamps and local dates, cached on the whole second."""

    def __init__(self, fmt: str, tz: tzinfo) -> None:
        self.fmt = fmt
        self.tz = tz
        self._sec = -1
        self._head = self._day = self._off = ""

    def _load(self, sec: int) -> None:
        dt = datetime.fromtimestamp(sec, self.tz)
        self._sec = sec
        self._day = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
        clock = f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
        if self.fmt == "traditional":
            self._head = f"{MONTHS[dt.month - 1]} {dt.day:2d} {clock}"
        elif self.fmt == "postlogd":
            self._head = f"{MONTHS[dt.month - 1]} {dt.day:02d} {clock}"
        else:
            off = dt.strftime("%z")
            self._head = f"{self._day}T{clock}"
            self._off = f"{off[:3]}:{off[3:]}"

    def stamp(self, t: int) -> str:
        if t // US != self._sec:
            self._load(t // US)
        if self.fmt == "rfc3339":
            return f"{self._head}.{t % US:06d}{self._off}"
        return self._head

    def day(self, t: int) -> str:
        if t // US != self._sec:
            self._load(t // US)
        return self._day


class Zipf:
    """Draw items with weight 1/rank**s."""

    def __init__(self, items: list[Any], s: float, rng: random.Random) -> None:
        self.items = items
        self.cum: list[float] = []
        total = 0.0
        for rank in range(1, len(items) + 1):
            total += 1.0 / rank**s
            self.cum.append(total)
        self.total = total
        self.rng = rng

    def draw(self) -> Any:
        return self.items[bisect(self.cum, self.rng.random() * self.total)]


class Host:
    """One relay: its name, process ids and live queue ids (shared by its instances)."""

    def __init__(self, name: str, index: int, rng: random.Random) -> None:
        self.name = name
        self.fqdn = f"{name}.campus.example"
        self.ip = f"10.0.0.{10 + index}"
        self.rng = rng
        self.pid = rng.randrange(800, 30_000)
        self.live: dict[str, bool] = {}  # in allocation order

    def new_pid(self) -> int:
        self.pid += self.rng.randint(1, 60)
        if self.pid > 4_194_000:  # pid_max
            self.pid = 300
        return self.pid


class PidPool:
    """The processes of one master.cf service on one host, each retired after 100 uses."""

    def __init__(self, host: Host, size: int) -> None:
        self.host = host
        self.cur = [host.new_pid() for _ in range(size)]
        self.free: list[int] = []
        self.uses: dict[int, int] = {}

    def get(self) -> int:
        """Return the pid of a shared agent (cleanup, smtp, ...)."""
        i = self.host.rng.randrange(len(self.cur))
        if self.host.rng.random() < 0.01:
            self.cur[i] = self.host.new_pid()
        return self.cur[i]

    def acquire(self) -> int:
        """Return a pid that serves one SMTP session at a time."""
        pid = self.free.pop() if self.free else self.host.new_pid()
        self.uses[pid] = self.uses.get(pid, 0) + 1
        return pid

    def release(self, pid: int) -> None:
        if self.uses[pid] >= 100:  # max_use
            del self.uses[pid]
        else:
            self.free.append(pid)


class Instance:
    """One Postfix instance (syslog_name) on a host."""

    def __init__(self, host: Host, name: str, long_ids: bool) -> None:
        self.host = host
        self.name = name
        self.long_ids = long_ids
        self.removed: deque[str] = deque(maxlen=64)
        self.pools: dict[str, PidPool] = {}
        self.progs: dict[str, str] = {}
        self.master_pid = host.new_pid()
        self.qmgr_pid = host.new_pid()
        self.pickup_pid = host.new_pid()

    def prog(self, service: str) -> str:
        prog = self.progs.get(service)
        if prog is None:
            prog = self.progs[service] = f"{self.name}/{service}"
        return prog

    def pool(self, service: str) -> PidPool:
        pool = self.pools.get(service)
        if pool is None:
            pool = self.pools[service] = PidPool(self.host, 6)
        return pool


@dataclass(slots=True)
class Rcpt:
    """One recipient and its fate: ``plan`` is the attempt that ends it, 0 for never."""

    addr: str
    orig_to: str | None
    route: str  # smtp | relay | lmtp | local | virtual | pipe | error
    dest: str  # relay= value: "mx.x.example[192.0.2.7]:25", "none", "local", ...
    plan: int
    final: str  # "sent" | "bounced"
    defer_text: str
    final_text: str
    dsn: str  # of the final status
    defer_dsn: str = "4.2.0"


@dataclass(slots=True)
class Msg:
    """One queued message as the model knows it."""

    inst: Instance
    qid: str
    sender: str  # as written in from=<...>
    key: str  # counting key: lower case, "<>" for the null sender
    sasl: bool
    size: int
    rcpts: list[Rcpt]
    arrival: int
    lifetime: int
    message_id: str


class Truth:
    """Counters per sender and day, bumped as each line is written."""

    def __init__(self) -> None:
        self.senders: dict[str, dict[str, list[int]]] = {}

    def bump(self, key: str, day: str, col: int) -> None:
        days = self.senders.get(key)
        if days is None:
            days = self.senders[key] = {}
        row = days.get(day)
        if row is None:
            row = days[day] = [0] * 8
        row[col] += 1

    def days(self, key: str) -> dict[str, dict[str, int]]:
        """Return one sender's non-empty days: date -> the seven counters."""
        rows = self.senders[key]
        return {
            d: dict(zip(COLUMNS, rows[d][:RCPTS], strict=True))
            for d in sorted(rows)
            if any(rows[d][:RCPTS])
        }

    def recipients(self) -> dict[str, int]:
        """Return recipients queued (first qmgr line) per sender."""
        out = {
            k: sum(row[RCPTS] for row in self.senders[k].values()) for k in sorted(self.senders)
        }
        return {k: n for k, n in out.items() if n}

    def write(self, fp: IO[str], head: dict[str, Any]) -> None:
        """Write `head` and the counters as JSON, one sender a line, without building it all."""
        fp.write("{\n")
        for name, value in head.items():
            fp.write(f" {json.dumps(name)}: {json.dumps(value, sort_keys=True)},\n")
        fp.write(' "senders": {')
        sep = "\n"
        for key in sorted(self.senders):
            days = self.days(key)
            if days:
                fp.write(f"{sep}  {json.dumps(key)}: {json.dumps(days, sort_keys=True)}")
                sep = ",\n"
        fp.write("\n }\n}\n")


class World:
    """The simulated relays: arrival streams spawn sessions, sessions spawn messages."""

    def __init__(self, params: Params, out: IO[str]) -> None:
        self.p = params
        self.rng = rng = random.Random(params.seed)
        self.tz = ZoneInfo(params.timezone)
        self.stamper = Stamper(params.format, self.tz)
        self.out = out
        self.truth = Truth()
        self.kinds: dict[str, int] = {}
        self.heap: list[tuple[int, int, Proc, Item]] = []
        self.seq = 0
        self.written = 0
        self.start = int(datetime.fromisoformat(params.start).timestamp()) * US
        self.now = self.first_t = self.last_t = self.start
        self.hosts = [Host(f"relay{i + 1}", i, rng) for i in range(params.relays)]
        self.main = [Instance(h, "postfix", i % 2 == 1) for i, h in enumerate(self.hosts)]
        self.out_inst = Instance(self.hosts[0], "postfix-out", long_ids=True)
        self.mix = Zipf([name for name, _ in SESSION_MIX], 0, rng)
        self.mix.cum, acc = [], 0.0
        for _, weight in SESSION_MIX:
            acc += weight
            self.mix.cum.append(acc)
        self.mix.total = acc
        per_day = params.lines / params.days
        fixed = HEAVY_LINES_PER_DAY + STATS_LINES_PER_DAY * params.relays
        main_lines = max(per_day - fixed, per_day / 10)
        self.arrival_rate = main_lines / (86_400 * LINES_PER_ARRIVAL)  # per second
        self._people()
        self._places()

    # -- population --------------------------------------------------------------------

    def _people(self) -> None:
        rng = self.rng
        domains = ["campus.example"] * 7 + [
            "cs.campus.example",
            "ee.campus.example",
            "lib.campus.example",
        ]
        seen: dict[str, bool] = {HEAVY: True}
        campus: list[str] = []
        while len(campus) < 3000:
            r = rng.random()
            if r < 0.55:
                local = f"{rng.choice(FIRST)}.{rng.choice(LAST)}"
                local += str(rng.randrange(2, 99)) if rng.random() < 0.3 else ""
            elif r < 0.9:
                local = f"s{rng.randrange(1_000_000, 9_999_999)}"
            else:
                local = f"{rng.choice(FIRST)}{rng.choice(LAST)[0]}"
            addr = f"{local}@{rng.choice(domains)}"
            if addr not in seen:
                seen[addr] = True
                campus.append(addr)
        campus.insert(rng.randrange(20, 200), "alice+lists@campus.example")
        self.campus = Zipf(campus, 0.8, rng)
        self.locals = Zipf(campus, 0.6, rng)
        # Some users write their address in changing case; the counting key is lower case.
        self.case_users = {a: True for a in campus[:400] if rng.random() < 0.15}
        self.attack = [f"{n}@campus.example" for n in ATTACK_NAMES] + list(ATTACK_NAMES)
        self.attack += [f"{rng.choice(FIRST)}{rng.randrange(1000)}" for _ in range(300)]
        self.systems = Zipf(list(SYSTEM_SENDERS), 1.0, rng)

    def _places(self) -> None:
        rng = self.rng
        tlds = ("example", "example.com", "example.net", "example.org")
        self.ext_domains = [
            f"{WORDS[i % len(WORDS)]}{'' if i < len(WORDS) else i}.{tlds[i % 4]}"
            for i in range(400)
        ]
        # Per domain: MX name, address, and how it behaves (the top 25 always work).
        self.domain_info: dict[str, tuple[str, str, str]] = {}
        for i, d in enumerate(self.ext_domains):
            state = (
                "ok"
                if i < 25
                else rng.choices(
                    ("ok", "greylist", "flaky", "dead", "nxdomain"), (88, 5, 3, 2, 2)
                )[0]
            )
            net = ("192.0.2", "198.51.100", "203.0.113")[i % 3]
            self.domain_info[d] = (f"mx{1 + i % 3}.{d}", f"{net}.{1 + i % 250}", state)
        self.ext_domain_zipf = Zipf(self.ext_domains, 1.0, rng)
        ext: list[str] = []
        seen: dict[str, bool] = {}
        while len(ext) < 6000:
            d = self.ext_domain_zipf.draw()
            r = rng.random()
            if r < 0.6:
                local = f"{rng.choice(FIRST)}{rng.randrange(100)}"
            elif r < 0.8:
                local = rng.choice(("noreply", "newsletter", "info", "billing", "alerts"))
            else:
                local = f"bounces+{rng.randrange(200)}"
            addr = f"{local}@{d}"
            if rng.random() < 0.05:
                addr = f"{local.capitalize()}@{d.upper()}"
            if addr.lower() not in seen:
                seen[addr.lower()] = True
                ext.append(addr)
        self.external = Zipf(ext, 0.9, rng)
        # Spam forges its sender (any domain, dead ones too): the source of backscatter.
        self.forged = [
            f"{rng.choice(FIRST)}{rng.randrange(100)}@{rng.choice(self.ext_domains)}"
            for _ in range(2000)
        ]
        self.mtas = []
        for i in range(400):
            net = ("192.0.2", "198.51.100", "203.0.113")[i % 3]
            ip = f"{net}.{rng.randrange(1, 255)}" if i % 9 else f"2001:db8:{i:x}::25"
            name = (
                "unknown" if rng.random() < 0.15 else f"mail{i % 7}.{self.ext_domain_zipf.draw()}"
            )
            self.mtas.append((name, ip))
        self.apps = [(f"app{i}.campus.example", f"10.1.0.{i}") for i in range(1, 21)]

    def vary(self, addr: str) -> str:
        """Return `addr` as its owner happens to type it this time."""
        if addr in self.case_users and self.rng.random() < 0.5:
            local, _, dom = addr.partition("@")
            if self.rng.random() < 0.5:
                return f"{local.title()}@{dom.title()}"
            return f"{local.capitalize()}@{dom.upper()}"
        return addr

    def campus_sender(self) -> tuple[str, str]:
        """Return a campus sender (as written, counting key)."""
        addr = self.campus.draw()
        return self.vary(addr), addr

    def ext_rcpt(self) -> tuple[str, str]:
        d = self.ext_domain_zipf.draw()
        return f"{self.rng.choice(FIRST)}{self.rng.randrange(1000)}@{d}", d

    # -- scheduling --------------------------------------------------------------------

    def spawn(self, proc: Proc) -> None:
        """Start a process now; its first line may be later, never earlier."""
        try:
            item = next(proc)
        except StopIteration:
            return
        self.seq += 1
        heapq.heappush(self.heap, (item[0], self.seq, proc, item))

    def run(self) -> None:
        """Write lines in time order until --lines have been written."""
        heap, stamper, kinds, bump = self.heap, self.stamper, self.kinds, self.truth.bump
        write = self.out.write
        limit = self.p.lines
        self.spawn(self.arrivals())
        self.spawn(self.heavy_arrivals())
        for inst in [*self.main, self.out_inst]:
            self.spawn(self.noise(inst))
        while heap and self.written < limit:
            t, _, proc, item = heapq.heappop(heap)
            self.now = t
            if item[1] is not None:
                write(f"{stamper.stamp(t)} {item[1]} {item[2]}[{item[3]}]: {item[4]}\n")
                if not self.written:
                    self.first_t = t
                self.written += 1
                self.last_t = t
                kinds[item[5]] = kinds.get(item[5], 0) + 1
                if item[6] is not None:
                    day = stamper.day(t)
                    for key, col in item[6]:
                        bump(key, day, col)
            try:
                nxt = next(proc)
            except StopIteration:
                continue
            if nxt[0] < t:
                raise RuntimeError(f"process went back in time: {nxt!r}")
            self.seq += 1
            heapq.heappush(heap, (nxt[0], self.seq, proc, nxt))

    @staticmethod
    def line(
        t: int,
        inst: Instance,
        service: str,
        pid: int,
        text: str,
        kind: str,
        effects: Effects = None,
    ) -> Item:
        return (t, inst.host.name, inst.prog(service), pid, text, kind, effects)

    @staticmethod
    def wake(t: int) -> Item:
        return (t, None, "", 0, "", "", None)

    @staticmethod
    def us(seconds: float) -> int:
        return int(seconds * US)

    def later(self, t: int, lo: float, hi: float) -> int:
        return t + int(self.rng.uniform(lo, hi) * US)

    def arrivals(self) -> Proc:
        """The main stream: sessions of every kind, busier by day."""
        rng = self.rng
        t = self.start
        rate = self.arrival_rate * len(HOURLY) / sum(HOURLY)  # HOURLY's mean is not 1
        while True:
            hour = datetime.fromtimestamp(t // US, self.tz).hour
            t += max(1, self.us(rng.expovariate(rate * HOURLY[hour])))
            yield self.wake(t)
            kind = self.mix.draw()
            if kind == "out_instance":
                self.spawn(self.session_out_instance(t))
            else:
                self.spawn(getattr(self, f"session_{kind}")(t, rng.choice(self.main)))

    def heavy_arrivals(self) -> Proc:
        """heavy@campus.example: about 260 messages a day, 08:00-20:00, through webmail."""
        t = self.start
        while True:
            t += max(1, self.us(self.rng.expovariate(HEAVY_PER_DAY / (12 * 3600))))
            yield self.wake(t)
            if 8 <= datetime.fromtimestamp(t // US, self.tz).hour < 20:
                self.spawn(self.session_submission(t, self.rng.choice(self.main), heavy=True))

    # -- queue ids ---------------------------------------------------------------------

    def new_qid(self, inst: Instance, t: int) -> str:
        """Return a queue id unique on the host now; sometimes one removed before, or one
        live on another relay at the same time (ids are unique per host only)."""
        host, rng = inst.host, self.rng
        r = rng.random()
        qid = ""
        if r < 0.02 and inst.removed:
            cand = inst.removed[rng.randrange(len(inst.removed))]
            if cand not in host.live:
                inst.removed.remove(cand)
                qid = cand
        elif r < 0.025:
            for other in self.hosts:
                cand = next(iter(other.live), "")  # its oldest message still queued
                is_long = "z" in cand  # short ids are upper-case hex
                if (
                    other is not host
                    and cand in other.live
                    and cand not in host.live
                    and is_long == inst.long_ids
                ):
                    qid = cand
                    break
        while not qid or qid in host.live:
            qid = self._mint(inst.long_ids, t)
            t += 1
        host.live[qid] = True
        return qid

    def _mint(self, long_ids: bool, t: int) -> str:
        sec, usec = divmod(t, US)
        inode = self.rng.randrange(0x100, 0x8000000)
        if not long_ids:  # 5 hex digits of microseconds, then the inode number in hex
            return f"{usec:05X}{inode:X}"
        # enable_long_queue_ids: seconds (6) and microseconds (4) in base 52, "z", inode
        out = []
        for value, pad in ((sec, 6), (usec, 4)):
            digits = []
            for _ in range(pad):
                value, d = divmod(value, 52)  # noqa: PLW2901
                digits.append(B52[d])
            out.append("".join(reversed(digits)))
        ino = []
        while inode:
            inode, d = divmod(inode, 51)
            ino.append(B51[d])
        return f"{out[0]}{out[1]}z{''.join(reversed(ino))}"

    # -- recipients --------------------------------------------------------------------

    def rcpt_external(self, addr: str, domain: str, error_ok: bool = True) -> Rcpt:
        """A remote recipient; its domain decides greylisting, timeouts, bounces."""
        rng = self.rng
        mx, ip, state = self.domain_info[domain]
        dest = f"{mx}[{ip}]:25"
        ok_text = rng.choice(
            (
                "250 2.0.0 Ok: queued as ",
                "250 2.0.0 OK id=",
                "250 Requested mail action okay, completed: id=",
            )
        )
        ok_text += f"{rng.getrandbits(40):010X}"
        if state == "nxdomain":
            text = (
                f"Host or domain name not found. Name service error for name={domain}"
                " type=MX: Host not found"
            )
            return Rcpt(addr, None, "smtp", "none", 1, "bounced", "", text, "5.4.4")
        if state == "dead":
            text = f"connect to {mx}[{ip}]:25: Connection timed out"
            return Rcpt(addr, None, "smtp", "none", 0, "sent", text, ok_text, "2.0.0", "4.4.1")
        if state == "flaky":
            text = f"lost connection with {mx}[{ip}] while receiving the initial server greeting"
            return Rcpt(
                addr,
                None,
                "smtp",
                dest,
                rng.randint(3, 30),
                "sent",
                text,
                ok_text,
                "2.0.0",
                "4.4.2",
            )
        if error_ok and domain.endswith(".example.org") and rng.random() < 0.05:
            text = "mail for this domain is no longer accepted"  # transport_maps error:
            return Rcpt(addr, None, "error", "none", 1, "bounced", "", text, "5.0.0")
        plan, defer, r = 1, "", rng.random()
        if state == "greylist" or r < 0.01:
            plan = 2
            defer = (
                f"host {mx}[{ip}] said: 450 4.2.0 <{addr}>: Recipient address rejected:"
                " Greylisted, try again in 300 seconds (in reply to RCPT TO command)"
            )
        if r > 0.97:
            text = (
                f"host {mx}[{ip}] said: 550 5.1.1 <{addr}>: Recipient address rejected:"
                " User unknown (in reply to RCPT TO command)"
            )
            return Rcpt(addr, None, "smtp", dest, plan, "bounced", defer, text, "5.1.1")
        return Rcpt(addr, None, "smtp", dest, plan, "sent", defer, ok_text, "2.0.0")

    def rcpt_local(self, addr: str, quota_ok: bool = True) -> Rcpt:
        """A campus recipient: LMTP to the mail store mostly, some virtual, lists, relay."""
        rng = self.rng
        r = rng.random()
        if r < 0.75:
            route, dest = "lmtp", "imap.campus.example[private/dovecot-lmtp]"
            text = f"250 2.0.0 <{addr}> {rng.getrandbits(96):024x} Saved"
        elif r < 0.85:
            route, dest, text = "virtual", "virtual", "delivered to maildir"
        elif r < 0.9:
            route, dest, text = "pipe", "mailman", "delivered via mailman service"
        else:
            route = "relay"
            dest = f"mx.{addr.partition('@')[2]}[10.3.0.{rng.randrange(2, 9)}]:25"
            text = f"250 2.0.0 Ok: queued as {rng.getrandbits(36):09X}"
        if route != "lmtp" or not quota_ok or rng.random() >= 0.01:
            return Rcpt(addr, None, route, dest, 1, "sent", "", text, "2.0.0")
        full = (
            f"host {dest} said: {{}} <{addr}> Quota exceeded (mailbox for user is full)"
            " (in reply to end of DATA command)"
        )
        if rng.random() < 0.5:  # freed up later
            return Rcpt(
                addr,
                None,
                route,
                dest,
                rng.randint(2, 6),
                "sent",
                full.format("452 4.2.2"),
                text,
                "2.0.0",
                "4.2.2",
            )
        return Rcpt(addr, None, route, dest, 1, "bounced", "", full.format("552 5.2.2"), "5.2.2")

    def rcpt_spam(self) -> Rcpt:
        """A guessed address in a department whose server knows its users only itself."""
        rng = self.rng
        dept = rng.choice(("cs", "ee", "lib"))
        addr = f"{rng.choice(FIRST)}{rng.randrange(100)}@{dept}.campus.example"
        dest = f"mx.{dept}.campus.example[10.3.0.{rng.randrange(2, 9)}]:25"
        if rng.random() < 0.5:
            text = f"250 2.0.0 Ok: queued as {rng.getrandbits(36):09X}"
            return Rcpt(addr, None, "relay", dest, 1, "sent", "", text, "2.0.0")
        text = (
            f"host {dest} said: 550 5.1.1 <{addr}>: Recipient address rejected: User"
            " unknown in local recipient table (in reply to RCPT TO command)"
        )
        return Rcpt(addr, None, "relay", dest, 1, "bounced", "", text, "5.1.1")

    def rcpt_any(self, p_external: float) -> Rcpt:
        if self.rng.random() < p_external:
            return self.rcpt_external(*self.ext_rcpt())
        return self.rcpt_local(self.locals.draw())

    # -- sessions ----------------------------------------------------------------------

    def session_inbound(self, t: int, inst: Instance) -> Proc:
        """An outside MTA brings mail for campus users on port 25, mostly via postscreen."""
        rng, line = self.rng, self.line
        name, ip = rng.choice(self.mtas)
        client = f"{name}[{ip}]"
        if rng.random() < 0.7:
            ps, port = inst.pool("postscreen").cur[0], rng.randrange(20_000, 65_000)
            yield line(
                t,
                inst,
                "postscreen",
                ps,
                f"CONNECT from [{ip}]:{port} to [{inst.host.ip}]:25",
                "postscreen",
            )
            word = "PASS OLD" if rng.random() < 0.8 else "PASS NEW"
            t = self.later(t, 0.01, 0.2)
            yield line(t, inst, "postscreen", ps, f"{word} [{ip}]:{port}", "postscreen")
        pool = inst.pool("smtpd")
        pid = pool.acquire()
        t = self.later(t, 0.001, 0.05)
        if name != "unknown" and rng.random() < 0.04:
            yield line(
                t,
                inst,
                "smtpd",
                pid,
                f"warning: hostname {name} does not resolve to"
                f" address {ip}: Name or service not known",
                "warning",
            )
            client = f"unknown[{ip}]"
        yield line(t, inst, "smtpd", pid, f"connect from {client}", "connect")
        tls = int(rng.random() < 0.6)
        if tls:
            t = self.later(t, 0.02, 0.2)
            yield line(
                t,
                inst,
                "smtpd",
                pid,
                f"Anonymous TLS connection established from {client}: {TLS_IN}",
                "tls",
            )
        rcpt_ok = rcpt_all = mail = data = 0
        for _ in range(1 if rng.random() < 0.9 else rng.randint(2, 3)):
            r = rng.random()
            forged = r < 0.08
            sender = (
                rng.choice(self.forged) if forged else "" if r < 0.16 else self.external.draw()
            )
            mail += 1
            rcpts = []
            for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 4)):
                rcpt_all += 1
                if not rcpts and rng.random() < 0.05:
                    bad = f"{rng.choice(FIRST)}{rng.randrange(10_000)}@campus.example"
                    t = self.later(t, 0.05, 0.3)
                    yield line(
                        t,
                        inst,
                        "smtpd",
                        pid,
                        f"NOQUEUE: reject: RCPT from {client}: 550 5.1.1 <{bad}>:"
                        " Recipient address rejected: User unknown in virtual mailbox"
                        f" table; from=<{sender}> to=<{bad}> proto=ESMTP helo=<{name}>",
                        "reject_noqueue",
                    )
                    continue
                rcpt_ok += 1
                rcpts.append(self.rcpt_spam() if forged else self.rcpt_local(self.locals.draw()))
            if not rcpts:
                continue
            data += 1
            t = self.later(t, 0.05, 0.5)
            msg = self.new_msg(inst, t, sender, sender.lower() or NULL_KEY, False, rcpts)
            yield line(t, inst, "smtpd", pid, f"{msg.qid}: client={client}", "client")
            self.spawn(self.message_life(self.later(t, 0.01, 0.1), msg))
            t = self.later(t, 0.3, 3.0)
        stats = smtpd_stats(
            [
                ("ehlo", 1, 1),
                ("starttls", tls, tls),
                ("mail", mail, mail),
                ("rcpt", rcpt_ok, rcpt_all),
                ("data", data, data),
                ("quit", 1, 1),
            ]
        )
        t = self.later(t, 0.01, 0.3)
        yield line(t, inst, "smtpd", pid, f"disconnect from {client} {stats}", "disconnect")
        pool.release(pid)

    def session_relay_out(self, t: int, inst: Instance) -> Proc:
        """A campus server in mynetworks relays user mail on port 25 without AUTH."""
        rng = self.rng
        client = WEBMAIL if rng.random() < 0.6 else "{}[{}]".format(*rng.choice(self.apps))
        sender, key = self.campus_sender()
        rcpts = [self.rcpt_any(0.8) for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 6))]
        yield from self.smtp_session(t, inst, "smtpd", client, sender, key, None, rcpts, False)

    def session_submission(self, t: int, inst: Instance, heavy: bool = False) -> Proc:
        """An authenticated user submits on port 587 (or 465: Debian 12 calls it submissions)."""
        rng = self.rng
        service = "submission/smtpd" if heavy or rng.random() < 0.8 else "submissions/smtpd"
        if heavy:
            client, key = WEBMAIL, HEAVY
            sender = "Heavy@Campus.Example" if rng.random() < 0.05 else HEAVY
            rcpts = [self.rcpt_any(0.9) for _ in range(rng.randint(1, 2))]
        else:
            if rng.random() < 0.5:
                client = f"unknown[198.51.100.{rng.randrange(1, 255)}]"
            else:
                a, b = rng.randrange(256), rng.randrange(1, 255)
                client = f"dhcp-10-2-{a}-{b}.campus.example[10.2.{a}.{b}]"
            sender, key = self.campus_sender()
            nr = 1 if rng.random() < 0.6 else rng.randint(2, 8)
            rcpts = [self.rcpt_any(0.6) for _ in range(nr)]
        user = self.vary(key) if rng.random() < 0.3 else key
        yield from self.smtp_session(t, inst, service, client, sender, key, user, rcpts, True)

    def session_out_instance(self, t: int) -> Proc:
        """An application server hands mail to relay1's second instance, postfix-out."""
        rng = self.rng
        client = "{}[{}]".format(*rng.choice(self.apps))
        sender = self.systems.draw()
        rcpts = []
        for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 3)):
            if rng.random() < 0.5:
                rcpts.append(self.rcpt_external(*self.ext_rcpt(), error_ok=False))
            else:  # postfix-out sends campus mail to the mail store over SMTP too
                text = f"250 2.0.0 Ok: queued as {rng.getrandbits(36):09X}"
                rcpts.append(
                    Rcpt(
                        self.locals.draw(),
                        None,
                        "smtp",
                        STORE,
                        1,
                        "sent",
                        "",
                        text,
                        "2.0.0",
                    )
                )
        yield from self.smtp_session(
            t, self.out_inst, "smtpd", client, sender, sender, None, rcpts, False
        )

    def smtp_session(
        self,
        t: int,
        inst: Instance,
        service: str,
        client: str,
        sender: str,
        key: str,
        user: str | None,
        rcpts: list[Rcpt],
        tls: bool,
    ) -> Proc:
        """Connect, (TLS, AUTH), one message, disconnect."""
        rng, line = self.rng, self.line
        pool = inst.pool(service)
        pid = pool.acquire()
        yield line(t, inst, service, pid, f"connect from {client}", "connect")
        if tls:
            t = self.later(t, 0.02, 0.2)
            yield line(
                t,
                inst,
                service,
                pid,
                f"Anonymous TLS connection established from {client}: {TLS_IN}",
                "tls",
            )
        t = self.later(t, 0.05, 0.6)
        msg = self.new_msg(inst, t, sender, key, user is not None, rcpts)
        auth = ""
        if user is not None:
            auth = f", sasl_method={rng.choice(('PLAIN', 'LOGIN'))}, sasl_username={user}"
        yield line(t, inst, service, pid, f"{msg.qid}: client={client}{auth}", "client")
        self.spawn(self.message_life(self.later(t, 0.01, 0.1), msg))
        starttls = int(tls and not service.startswith("submissions"))
        authed = int(user is not None)
        n = len(rcpts)
        stats = smtpd_stats(
            [
                ("ehlo", 1 + starttls, 1 + starttls),
                ("starttls", starttls, starttls),
                ("auth", authed, authed),
                ("mail", 1, 1),
                ("rcpt", n, n),
                ("data", 1, 1),
                ("quit", 1, 1),
            ]
        )
        t = self.later(t, 0.3, 2.5)
        yield line(t, inst, service, pid, f"disconnect from {client} {stats}", "disconnect")
        pool.release(pid)

    def session_pickup(self, t: int, inst: Instance) -> Proc:
        """A local program (cron, a web application) submits with sendmail(1)."""
        login, uid = self.rng.choice((("root", 0), ("www-data", 33), ("nagios", 112)))
        sender = f"{login}@{inst.host.fqdn}"
        if login == "root":
            rcpts = [
                Rcpt(
                    f"root@{inst.host.fqdn}",
                    "root",
                    "local",
                    "local",
                    1,
                    "sent",
                    "",
                    "delivered to mailbox",
                    "2.0.0",
                )
            ]
        else:
            rcpts = [self.rcpt_any(0.7)]
        msg = self.new_msg(inst, t, sender, sender, False, rcpts)
        yield self.line(
            t, inst, "pickup", inst.pickup_pid, f"{msg.qid}: uid={uid} from=<{login}>", "pickup"
        )
        yield from self.message_life(self.later(t, 0.005, 0.05), msg)

    def session_reject25(self, t: int, inst: Instance) -> Proc:
        """A bot on port 25: postscreen turns it away, or smtpd refuses to relay for it."""
        rng, line = self.rng, self.line
        ip = f"203.0.113.{rng.randrange(1, 255)}"
        if rng.random() < 0.1:
            ip = f"2001:db8:bad:{rng.randrange(65536):x}::{rng.randrange(65536):x}"
        spam = f"{rng.choice(WORDS)}{rng.randrange(99999)}@{rng.choice(WORDS)}.example"
        victim = f"{rng.choice(FIRST)}@{rng.choice(self.ext_domains)}"
        helo = rng.choice(("localhost", f"[{ip}]", "WIN-7G2K8Q", "ylmf-pc"))
        if rng.random() < 0.5:
            ps, port = inst.pool("postscreen").cur[0], rng.randrange(20_000, 65_000)
            yield line(
                t,
                inst,
                "postscreen",
                ps,
                f"CONNECT from [{ip}]:{port} to [{inst.host.ip}]:25",
                "postscreen",
            )
            t = self.later(t, 0.05, 0.5)
            yield line(
                t,
                inst,
                "postscreen",
                ps,
                f"DNSBL rank {rng.randint(2, 6)} for [{ip}]:{port}",
                "postscreen",
            )
            t = self.later(t, 1, 6)
            yield line(
                t,
                inst,
                "postscreen",
                ps,
                f"NOQUEUE: reject: RCPT from [{ip}]:{port}: 550 5.7.1 Service"
                f" unavailable; client [{ip}] blocked using zen.dnsbl.example;"
                f" from=<{spam}>, to=<{victim}>, proto=ESMTP, helo=<{helo}>",
                "reject_postscreen",
            )
            t = self.later(t, 0.1, 1)
            yield line(t, inst, "postscreen", ps, f"DISCONNECT [{ip}]:{port}", "postscreen")
            return
        pool = inst.pool("smtpd")
        pid = pool.acquire()
        client = f"unknown[{ip}]"
        code = "454 4.7.1" if rng.random() < 0.7 else "554 5.7.1"  # defer_/reject_unauth_...
        yield line(t, inst, "smtpd", pid, f"connect from {client}", "connect")
        t = self.later(t, 0.2, 2)
        yield line(
            t,
            inst,
            "smtpd",
            pid,
            f"NOQUEUE: reject: RCPT from {client}: {code} <{victim}>: Relay access"
            f" denied; from=<{spam}> to=<{victim}> proto=ESMTP helo=<{helo}>",
            "reject_noqueue",
        )
        stats = smtpd_stats([("ehlo", 1, 1), ("mail", 1, 1), ("rcpt", 0, 1), ("quit", 1, 1)])
        t = self.later(t, 0.1, 1)
        yield line(t, inst, "smtpd", pid, f"disconnect from {client} {stats}", "disconnect")
        pool.release(pid)

    def session_reject_sub(self, t: int, inst: Instance) -> Proc:
        """Submission refuses a campus sender: no AUTH (relay denied) or a From not theirs.

        Each counts one auth_blk for the envelope sender of the reject line."""
        rng, line = self.rng, self.line
        service = "submission/smtpd"
        pool = inst.pool(service)
        pid = pool.acquire()
        a, b = rng.randrange(256), rng.randrange(1, 255)
        name = f"dhcp-10-2-{a}-{b}.campus.example"
        client = f"{name}[10.2.{a}.{b}]"
        sender, key = self.campus_sender()
        victim, _ = self.ext_rcpt()
        yield line(t, inst, service, pid, f"connect from {client}", "connect")
        t = self.later(t, 0.02, 0.2)
        yield line(
            t,
            inst,
            service,
            pid,
            f"Anonymous TLS connection established from {client}: {TLS_IN}",
            "tls",
        )
        authed = int(rng.random() < 0.4)
        if authed:
            user = self.campus.draw()
            while user == key:
                user = self.campus.draw()
            reply = f"553 5.7.1 <{sender}>: Sender address rejected: not owned by user {user}"
        else:
            reply = rng.choice(
                ("Recipient address rejected: Access denied", "Relay access denied")
            )
            reply = f"554 5.7.1 <{victim}>: {reply}"
        t = self.later(t, 0.1, 1)
        yield line(
            t,
            inst,
            service,
            pid,
            f"NOQUEUE: reject: RCPT from {client}: {reply}; from=<{sender}>"
            f" to=<{victim}> proto=ESMTP helo=<{name}>",
            "reject_noqueue_sub",
            ((key, AUTH_BLK),),
        )
        stats = smtpd_stats(
            [
                ("ehlo", 2, 2),
                ("starttls", 1, 1),
                ("auth", authed, authed),
                ("mail", 1, 1),
                ("rcpt", 0, 1),
                ("quit", 1, 1),
            ]
        )
        t = self.later(t, 0.1, 1)
        yield line(t, inst, service, pid, f"disconnect from {client} {stats}", "disconnect")
        pool.release(pid)

    def session_sasl_fail(self, t: int, inst: Instance) -> Proc:
        """Password guessing, or a user's typo: SASL failures, then the client gives up.

        Each failure naming a user counts one auth_blk for that user name, lower case."""
        rng, line = self.rng, self.line
        r = rng.random()
        service = "submission/smtpd" if r < 0.6 else "submissions/smtpd" if r < 0.8 else "smtpd"
        pool = inst.pool(service)
        pid = pool.acquire()
        real = rng.random() < 0.2
        if real:
            client = f"unknown[198.51.100.{rng.randrange(1, 255)}]"
            user = self.vary(self.campus.draw())
        else:
            client = f"unknown[203.0.113.{rng.randrange(1, 255)}]"
            user = rng.choice(self.attack)
            user = user.capitalize() if rng.random() < 0.1 else user
        yield line(t, inst, service, pid, f"connect from {client}", "connect")
        if service != "smtpd":
            t = self.later(t, 0.02, 0.2)
            yield line(
                t,
                inst,
                service,
                pid,
                f"Anonymous TLS connection established from {client}: {TLS_IN}",
                "tls",
            )
        method = "LOGIN" if rng.random() < 0.7 else "PLAIN"
        tries = 1 if rng.random() < 0.6 else rng.randint(2, 4)
        for _ in range(tries):
            t = self.later(t, 0.5, 4)
            if real and rng.random() < 0.7:  # libsasl adds this for a known user; no name
                text = "warning: SASL authentication failure: Password verification failed"
                yield line(t, inst, service, pid, text, "warning")
            effects: Effects = ((user.lower(), AUTH_BLK),)
            reason = f"authentication failure, sasl_username={user}"
            if rng.random() < 0.1:
                effects, reason = (
                    None,
                    "Invalid authentication mechanism, sasl_username=(unavailable)",
                )
            yield line(
                t,
                inst,
                service,
                pid,
                f"warning: {client}: SASL {method} authentication failed: {reason}",
                "sasl_fail",
                effects,
            )
        starttls = int(service == "submission/smtpd")
        counts = [
            ("ehlo", 1 + starttls, 1 + starttls),
            ("starttls", starttls, starttls),
            ("auth", 0, tries),
        ]
        t = self.later(t, 0.05, 1)
        if rng.random() < 0.5:
            yield line(t, inst, service, pid, f"lost connection after AUTH from {client}", "lost")
        else:
            counts.append(("quit", 1, 1))
        t = self.later(t, 0.001, 0.01)
        yield line(
            t, inst, service, pid, f"disconnect from {client} {smtpd_stats(counts)}", "disconnect"
        )
        pool.release(pid)

    def session_scanner(self, t: int, inst: Instance) -> Proc:
        """A port scanner, or a client that hangs up early."""
        rng, line = self.rng, self.line
        service = "smtpd" if rng.random() < 0.7 else "submission/smtpd"
        pool = inst.pool(service)
        pid = pool.acquire()
        client = f"unknown[203.0.113.{rng.randrange(1, 255)}]"
        yield line(t, inst, service, pid, f"connect from {client}", "connect")
        t = self.later(t, 0.01, 10)
        r = rng.random()
        if r < 0.5:
            yield line(
                t, inst, service, pid, f"lost connection after CONNECT from {client}", "lost"
            )
            stats = "commands=0/0"
        elif r < 0.8:
            yield line(t, inst, service, pid, f"lost connection after EHLO from {client}", "lost")
            stats = "ehlo=1 commands=1"
        else:
            yield line(
                t,
                inst,
                service,
                pid,
                f"warning: non-SMTP command from {client}: GET / HTTP/1.1",
                "warning",
            )
            stats = "unknown=0/1 commands=0/1"
        t = self.later(t, 0.0005, 0.005)
        yield line(t, inst, service, pid, f"disconnect from {client} {stats}", "disconnect")
        pool.release(pid)

    def noise(self, inst: Instance) -> Proc:
        """Background lines: anvil and scache statistics, warnings, tlsproxy, cron."""
        rng, line = self.rng, self.line
        t = self.later(self.start, 0, 300)
        anvil_pid, scache_pid = inst.host.new_pid(), inst.host.new_pid()
        # anvil_status_update_time = 600s; postfix-out runs no anvil or scache of its own
        next_stats = t + self.us(600) if inst.name == "postfix" else 1 << 62
        rate = self.arrival_rate * NOISE_PER_ARRIVAL * (1 if inst.name == "postfix" else 0.1)
        day = datetime.fromtimestamp(self.start // US, self.tz)
        next_reload = int(day.replace(hour=6, minute=25, second=0).timestamp()) * US
        next_reload = self.later(next_reload, 0, 60)
        if next_reload < t:
            next_reload += DAY_US
        while True:
            t += max(1, self.us(rng.expovariate(rate)))
            if t >= min(next_reload, next_stats):  # the earlier of the two first
                if next_reload < next_stats:  # logrotate's daily "postfix reload"
                    t, next_reload = next_reload, self.later(next_reload + DAY_US, -30, 30)
                    yield from self.reload(t, inst)
                else:
                    t, next_stats = next_stats, self.later(next_stats, 600, 720)
                    yield from self.statistics(t, inst, anvil_pid, scache_pid)
                t = self.now
                continue
            r = rng.random()
            if r < 0.3:
                yield line(
                    t,
                    inst,
                    "smtpd",
                    inst.pool("smtpd").get(),
                    "warning: TLS library problem: error:0A000126:SSL routines::"
                    "unexpected eof while reading:../ssl/record/rec_layer_s3.c:650:",
                    "warning",
                )
            elif r < 0.5:
                yield line(
                    t,
                    inst,
                    "smtpd",
                    inst.pool("smtpd").get(),
                    "warning: dnsblog reply timeout 10s for zen.dnsbl.example",
                    "warning",
                )
            elif r < 0.7:
                mx, ip, _ = self.domain_info[rng.choice(self.ext_domains)]
                yield line(
                    t,
                    inst,
                    "smtp",
                    inst.pool("smtp").get(),
                    f"warning: {mx}[{ip}]:25 offered AUTH option multiple times",
                    "warning",
                )
            elif r < 0.85:
                yield (
                    t,
                    inst.host.name,
                    "CRON",
                    inst.host.new_pid(),
                    "(root) CMD (test -x /usr/sbin/logcheck && nice /usr/sbin/logcheck)",
                    "foreign",
                    None,
                )
            else:
                ip = f"192.0.2.{rng.randrange(1, 255)}"
                yield line(
                    t,
                    inst,
                    "tlsproxy",
                    inst.pool("tlsproxy").get(),
                    f"CONNECT from [{ip}]:{rng.randrange(20_000, 65_000)}",
                    "noise",
                )

    def reload(self, t: int, inst: Instance) -> Proc:
        """``postfix reload``: master restarts its children, so every service gets new pids."""
        host = inst.host
        yield (
            t,
            host.name,
            inst.prog("postfix-script"),
            host.new_pid(),
            "refreshing the Postfix mail system",
            "noise",
            None,
        )
        yield self.line(
            self.later(t, 0.01, 0.05),
            inst,
            "master",
            inst.master_pid,
            "reload -- version 3.7.11, configuration /etc/postfix"
            if inst.name == "postfix"
            else f"reload -- version 3.7.11, configuration /etc/{inst.name}",
            "noise",
        )
        inst.qmgr_pid, inst.pickup_pid = host.new_pid(), host.new_pid()
        for pool in inst.pools.values():
            pool.cur = [host.new_pid() for _ in pool.cur]
            pool.free.clear()

    def statistics(self, t: int, inst: Instance, anvil_pid: int, scache_pid: int) -> Proc:
        """anvil's and scache's periodic reports (they embed a year-less stamp)."""
        rng = self.rng
        at = datetime.fromtimestamp(t // US, self.tz)
        at_s = f"{MONTHS[at.month - 1]} {at.day:2d} {at:%H:%M:%S}"
        ip = f"192.0.2.{rng.randrange(1, 255)}"
        texts = [
            f"statistics: max connection rate {rng.randint(1, 40)}/60s for (smtp:{ip}) at {at_s}",
            f"statistics: max connection count {rng.randint(1, 9)} for (smtp:{ip}) at {at_s}",
            f"statistics: max cache size {rng.randint(1, 60)} at {at_s}",
        ]
        for text in texts:
            yield self.line(t, inst, "anvil", anvil_pid, text, "noise")
            t += 100
        if rng.random() < 1 / 6:
            hits, miss = rng.randint(0, 90), rng.randint(1, 40)
            for text in (
                f"statistics: start interval {at_s}",
                f"statistics: domain lookup hits={hits} miss={miss}"
                f" success={100 * hits // (hits + miss)}%",
                f"statistics: address lookup hits={hits // 2} miss={miss}"
                f" success={100 * (hits // 2) // (hits // 2 + miss)}%",
                "statistics: max simultaneous domains=1 addresses=1 connection=1",
            ):
                yield self.line(t, inst, "scache", scache_pid, text, "noise")
                t += 100

    # -- messages ----------------------------------------------------------------------

    def new_msg(
        self, inst: Instance, t: int, sender: str, key: str, sasl: bool, rcpts: list[Rcpt]
    ) -> Msg:
        rng = self.rng
        size = int(min(25_000_000, max(400, rng.lognormvariate(9.3, 1.2))))
        dom = key.partition("@")[2] or inst.host.fqdn
        lifetime = MAX_LIFETIME_US if sender else BOUNCE_LIFETIME_US
        return Msg(
            inst,
            self.new_qid(inst, t),
            sender,
            key,
            sasl,
            size,
            rcpts,
            t,
            lifetime,
            f"<{rng.getrandbits(64):016x}@{dom}>",
        )

    def message_life(self, t: int, msg: Msg) -> Proc:
        """cleanup, then delivery attempts until every recipient is done or time runs out."""
        rng, inst, qid, key = self.rng, msg.inst, msg.qid, msg.key
        yield self.line(
            t,
            inst,
            "cleanup",
            inst.pool("cleanup").get(),
            f"{qid}: message-id={msg.message_id}",
            "cleanup",
        )
        if msg.sasl and inst.name == "postfix" and rng.random() < 0.5:
            t = self.later(t, 0.01, 0.1)
            yield (
                t,
                inst.host.name,
                "opendkim",
                812,
                f"{qid}: DKIM-Signature field added (s=mail, d={key.partition('@')[2]})",
                "foreign",
                None,
            )
        t = self.later(t, 0.02, 0.8)
        pending, attempt = msg.rcpts, 1
        while True:
            effects: Effects = None
            if attempt == 1:
                effects = ((key, MESSAGES), *((key, RCPTS),) * len(pending))
                effects += ((key, AUTH_RCV),) if msg.sasl else ()
            yield self.line(
                t,
                inst,
                "qmgr",
                inst.qmgr_pid,
                f"{qid}: from=<{msg.sender}>, size={msg.size},"
                f" nrcpt={len(pending)} (queue active)",
                "qmgr_from",
                effects,
            )
            still: list[Rcpt] = []
            yield from self.attempt(t, msg, pending, attempt, still)
            bounced = any(r.plan == attempt and r.final == "bounced" for r in pending)
            t = self.later(self.now, 0.001, 0.05)
            expired = bool(still) and t - msg.arrival >= msg.lifetime
            if expired:
                yield self.line(
                    t,
                    inst,
                    "qmgr",
                    inst.qmgr_pid,
                    f"{qid}: from=<{msg.sender}>, status=expired, returned to sender",
                    "expired",
                    ((key, EXPIRED),),
                )
            if msg.sender and (bounced or expired):
                yield from self.notify(t, msg)
            if still and not expired:
                backoff = min(MIN_BACKOFF * 2 ** (attempt - 1), MAX_BACKOFF)
                t = self.later(self.now, backoff, backoff + 300)
                pending, attempt = still, attempt + 1
                continue
            t = self.later(max(t, self.now), 0.001, 0.02)
            yield self.line(t, inst, "qmgr", inst.qmgr_pid, f"{qid}: removed", "removed")
            inst.host.live.pop(qid, None)
            inst.removed.append(qid)
            return

    def attempt(
        self, t: int, msg: Msg, pending: list[Rcpt], attempt: int, still: list[Rcpt]
    ) -> Proc:
        """One delivery attempt: a line per pending recipient, in parallel agents."""
        rng = self.rng
        starts = sorted(
            (self.later(t, 0.01, 0.3) if r.route in LOCAL_ROUTES else self.later(t, 0.2, 4.0), i)
            for i, r in enumerate(pending)
        )
        tls_done: dict[str, bool] = {}
        last = t
        for start, i in starts:
            r = pending[i]
            when = max(start, last)
            status = r.final if r.plan == attempt else "deferred"
            if status == "deferred":
                still.append(r)
            if (
                r.route == "smtp"
                and r.dest != "none"
                and r.dest not in tls_done
                and rng.random() < 0.4
            ):
                tls_done[r.dest] = True
                yield self.line(
                    when,
                    msg.inst,
                    "smtp",
                    msg.inst.pool("smtp").get(),
                    f"Untrusted TLS connection established to {r.dest}: {TLS_OUT}",
                    "tls",
                )
                when += self.us(0.05)
            yield self.delivery_line(when, msg, r, status, attempt)
            last = when

    def delivery_line(self, when: int, msg: Msg, r: Rcpt, status: str, attempt: int) -> Item:
        """``QID: to=<r>, relay=..., delay=..., delays=a/b/c/d, dsn=..., status=... (...)``."""
        rng, inst = self.rng, msg.inst
        delay = (when - msg.arrival) / US
        c = (
            0.0
            if r.route in ("local", "virtual", "pipe") or r.dest == "none"
            else rng.uniform(0.01, 0.4)
        )
        d = rng.uniform(0.0, 0.3) if status != "deferred" else 0.0
        b = rng.uniform(0.0, 0.03)
        a = max(0.0, delay - b - c - d)
        service = AGENTS.get(r.route, r.route)
        if status == "deferred":
            text, dsn = r.defer_text, r.defer_dsn
            if r.dest == "none" and attempt > 2 and rng.random() < 0.3:
                # qmgr has marked the destination dead and defers through error(8)
                service, text = "error", f"delivery temporarily suspended: {text}"
        else:
            text, dsn = r.final_text, r.dsn
        pid = inst.pool(service).get()
        orig = f", orig_to=<{r.orig_to}>" if r.orig_to else ""
        conn = ""
        if r.route in ("smtp", "relay") and r.dest != "none" and rng.random() < 0.15:
            conn = f", conn_use={rng.randint(2, 9)}"
        return self.line(
            when,
            inst,
            service,
            pid,
            f"{msg.qid}: to=<{r.addr}>{orig}, relay={r.dest}{conn},"
            f" delay={fmt_delay(delay)}, delays={fmt_delay(a)}/{fmt_delay(b)}/"
            f"{fmt_delay(c)}/{fmt_delay(d)}, dsn={dsn}, status={status} ({text})",
            status,
            ((msg.key, STATUS_COL[status]),),
        )

    def notify(self, t: int, msg: Msg) -> Proc:
        """bounce(8) returns the message: a new message from <> to the sender."""
        rng, inst = self.rng, msg.inst
        dom = msg.key.partition("@")[2]
        if dom in self.domain_info:
            rcpt = self.rcpt_external(msg.sender, dom, error_ok=False)
        elif inst is self.out_inst:  # postfix-out hands campus mail to the store over SMTP
            text = f"250 2.0.0 Ok: queued as {rng.getrandbits(36):09X}"
            rcpt = Rcpt(msg.sender, None, "smtp", STORE, 1, "sent", "", text, "2.0.0")
        elif dom.endswith("campus.example") and not dom.startswith("relay"):
            rcpt = self.rcpt_local(msg.sender, quota_ok=False)
        else:
            rcpt = Rcpt(
                msg.sender, None, "local", "local", 1, "sent", "", "delivered to mailbox", "2.0.0"
            )
        t1 = self.later(t, 0.001, 0.01)
        ndr = self.new_msg(inst, t1, "", NULL_KEY, False, [rcpt])
        ndr.size = rng.randint(2500, 9000)
        stamp = datetime.fromtimestamp(t1 // US, self.tz).strftime("%Y%m%d%H%M%S")
        ndr.message_id = f"<{stamp}.{ndr.qid}@{inst.host.fqdn}>"
        # The bounce line comes before or after the notification's cleanup line (both are
        # in scenario/README.md's real logs).
        t_bounce = self.later(t1, 0.0005, 0.005)
        first = t1 if rng.random() < 0.5 else self.later(t_bounce, 0.0005, 0.005)
        self.spawn(self.message_life(first, ndr))
        yield self.line(
            t_bounce,
            inst,
            "bounce",
            inst.pool("bounce").get(),
            f"{msg.qid}: sender non-delivery notification: {ndr.qid}",
            "ndr",
        )


def generate(
    params: Params, out_path: Path, truth_path: Path | None = None, keep: bool = True
) -> dict[str, Any]:
    """Write the log (gzip if the name ends in .gz) and the truth; return the truth.

    With ``keep=False`` the returned truth has no senders (it is only on disk), which keeps
    the generator's memory flat for big files. The log's mtime is set to one second after
    its last line, as a live log's would be.
    """
    if params.format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {params.format!r}")
    if datetime.fromisoformat(params.start).tzinfo is None:
        raise ValueError(f"start needs a UTC offset, e.g. {DEFAULT_START}")
    raw: IO[bytes]
    if out_path.suffix == ".gz":
        raw = gzip.GzipFile(out_path, "wb", compresslevel=6, mtime=0)
    else:
        raw = out_path.open("wb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as text:
        world = World(params, text)
        world.run()
    last = world.last_t // US + 1
    os.utime(out_path, (last, last))
    truth: dict[str, Any] = {
        "timezone": params.timezone,
        "generator": {**asdict(params), "version": GENERATOR_VERSION},
        "lines": world.written,
        "first_line": datetime.fromtimestamp(world.first_t / US, world.tz).isoformat(),
        "last_line": datetime.fromtimestamp(world.last_t / US, world.tz).isoformat(),
        "line_kinds": dict(sorted(world.kinds.items())),
        "recipients": world.truth.recipients(),
    }
    if truth_path is not None:
        with truth_path.open("w", encoding="utf-8") as fp:
            world.truth.write(fp, truth)
    keys = sorted(world.truth.senders) if keep else []
    truth["senders"] = {k: days for k in keys if (days := world.truth.days(k))}
    return truth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--lines", type=int, default=1_000_000, help="lines to write")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--format", choices=FORMATS, default="traditional")
    ap.add_argument("--out", type=Path, required=True, help="log file (.gz: compressed)")
    ap.add_argument("--truth", type=Path, help="write the exact counters here (JSON)")
    ap.add_argument("--start", default=DEFAULT_START, help="first moment, with UTC offset")
    ap.add_argument("--relays", type=int, default=3, help="relay hosts in the file")
    ap.add_argument("--days", type=int, help="span of arrivals (default: 3..7 by --lines)")
    ap.add_argument("--timezone", default="UTC", help="zone of the stamps and of the days")
    args = ap.parse_args(argv)
    if args.lines <= 0 or args.relays <= 0 or (args.days is not None and args.days <= 0):
        ap.error("--lines, --relays and --days must be positive")
    params = Params(
        args.lines,
        args.seed,
        args.format,
        args.start,
        args.relays,
        args.days or default_days(args.lines),
        args.timezone,
    )
    try:
        truth = generate(params, args.out, args.truth, keep=False)
    except ValueError as exc:
        ap.error(str(exc))
    print(
        f"genlog: {truth['lines']} lines, {truth['first_line']} .. {truth['last_line']}"
        f" -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
