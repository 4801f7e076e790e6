"""Daily limits: which rule applies to a sender, and which levels a day's row has passed.

Rules come from the ``thresholds:`` section. A rule maps level names to limits
(``warn: 200``, ``alert: 1000``) on the counted metric (``count``: messages,
recipients or sum), and may watch other columns of the day's row too
(``watch: {bounced: {warn: 10}}``). The default rule is refined, key by key, by the
rules of the sender's domain and its parent domains (least specific first), then by
sender globs in file order, then by the sender's exact address. ``exempt: true`` at
any of those steps (or a match in ``thresholds.exempt``) means no limit at all.

A level is passed when the count is greater than its limit: with ``warn: 200`` the
201st message of the day passes it.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mailtally.correlate import NULL_SENDER
from mailtally.store import DayRow, Notice

log = logging.getLogger(__name__)

Count = Literal["messages", "recipients", "sum"]
Column = Literal[
    "messages",
    "recipients",
    "sum",
    "auth_rcv",
    "auth_blk",
    "sent",
    "bounced",
    "deferred",
    "expired",
]
Limit = Annotated[int, Field(gt=0, strict=True)]
LEVEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")
_DOMAIN = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z"
)
CACHE_LIMIT = 100_000  # senders whose effective rule is remembered
EARLIEST_EVERY = 10.0  # seconds between looks at the clock for the first day judged


def _level_names(levels: dict[str, int], where: str) -> None:
    for name in levels:
        if not LEVEL_NAME.match(name):
            raise ValueError(
                f"{where}{name!r} is not a level name (lower case letters, digits, _)"
            )


class Rule(BaseModel):
    """One rule: level name -> limit, plus ``exempt``, ``count`` and ``watch``."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, Limit] = Field(init=False)  # the levels

    exempt: bool | None = None
    count: Count | None = None
    watch: dict[Column, dict[str, Limit]] | None = None

    @model_validator(mode="after")
    def _names(self) -> Rule:
        _level_names(self.levels(), "")
        for column, levels in (self.watch or {}).items():
            _level_names(levels, f"watch.{column}: ")
        return self

    def levels(self) -> dict[str, int]:
        return dict(self.__pydantic_extra__ or {})


def _default_rule() -> Rule:
    return Rule.model_validate({"warn": 200})


class ThresholdsSection(BaseModel):
    """The ``thresholds:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: Count = "messages"
    default: Rule = Field(default_factory=_default_rule)
    domains: dict[str, Rule] = Field(default_factory=dict)
    senders: dict[str, Rule] = Field(default_factory=dict)
    exempt: list[str] = Field(default_factory=list)  # addresses or globs, never limited

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: dict[str, Rule]) -> dict[str, Rule]:
        out = {}
        for name, rule in value.items():
            key = name.strip().lower().rstrip(".")
            if not _DOMAIN.match(key):
                raise ValueError(f"{name!r} is not a domain name")
            out[key] = rule
        return out

    @field_validator("senders")
    @classmethod
    def _senders(cls, value: dict[str, Rule]) -> dict[str, Rule]:
        out = {}
        for name, rule in value.items():
            key = name.strip().lower()
            if not key or any(c.isspace() for c in key):
                raise ValueError(f"{name!r} is not an address, username or glob")
            out[key] = rule
        return out

    @field_validator("exempt")
    @classmethod
    def _exempt(cls, value: list[str]) -> list[str]:
        return [v.strip().lower() for v in value]


@dataclass(frozen=True, slots=True)
class Level:
    """One limit of the effective rule: `metric` passing `limit` reaches `level`."""

    metric: str
    level: str
    limit: int


@dataclass(frozen=True, slots=True)
class Effective:
    """The rule that applies to one sender, after every override."""

    exempt: bool
    count: str
    levels: tuple[Level, ...]  # by metric, then limit
    applied: tuple[str, ...]  # the rules that made it, for check-config --sender

    def passed(self, row: DayRow) -> list[tuple[Level, int]]:
        """The levels `row` has passed, each with the count that passed it."""
        if self.exempt:
            return []
        out = []
        for level in self.levels:
            value = metric_value(row, level.metric)
            if value > level.limit:
                out.append((level, value))
        return out


def metric_value(row: DayRow, metric: str) -> int:
    value: int = getattr(row, metric)
    return value


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


class Thresholds:
    """The compiled ``thresholds:`` section; `always_exempt` adds e.g. notify.from."""

    def __init__(self, section: ThresholdsSection, always_exempt: Iterable[str] = ()) -> None:
        self.section = section
        self._always = list(always_exempt)
        self._exact = {k: r for k, r in section.senders.items() if not _is_glob(k)}
        self._globs = [(k, r) for k, r in section.senders.items() if _is_glob(k)]
        exempt = [*section.exempt, *(a.lower() for a in always_exempt), NULL_SENDER]
        self._exempt_exact = {e for e in exempt if not _is_glob(e)}
        self._exempt_globs = [e for e in exempt if _is_glob(e)]
        self._cache: dict[str, Effective] = {}

    def __getstate__(self) -> dict[str, Any]:  # sent to the writer process: no cache
        return {"section": self.section, "always": self._always}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["section"], state["always"])  # type: ignore[misc]

    def effective(self, sender: str) -> Effective:
        """The rule for `sender` (a counted key: lower-case address or username)."""
        found = self._cache.get(sender)
        if found is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            found = self._cache[sender] = self._resolve(sender)
        return found

    def _resolve(self, sender: str) -> Effective:
        section = self.section
        layers: list[tuple[str, Rule]] = [("default", section.default)]
        _, at, domain = sender.rpartition("@")
        if at:
            labels = domain.split(".")
            for i in range(len(labels) - 1, -1, -1):  # example.edu before cs.example.edu
                name = ".".join(labels[i:])
                rule = section.domains.get(name)
                if rule is not None:
                    layers.append((f"domain {name}", rule))
        for pattern, rule in self._globs:
            if fnmatch.fnmatchcase(sender, pattern):
                layers.append((f"sender {pattern}", rule))
        rule = self._exact.get(sender)
        if rule is not None:
            layers.append((f"sender {sender}", rule))
        count: str = section.count
        levels: dict[str, int] = {}
        watch: dict[str, dict[str, int]] = {}
        for _, rule in layers:
            if rule.count is not None:
                count = rule.count
            levels.update(rule.levels())
            for column, column_levels in (rule.watch or {}).items():
                watch.setdefault(column, {}).update(column_levels)
        # The exempt list always wins; otherwise the most specific rule saying it decides.
        exempt = self._listed(sender) or _last_exempt(layers)
        out = [Level(count, name, limit) for name, limit in levels.items()]
        for metric, metric_levels in watch.items():
            out.extend(Level(metric, name, limit) for name, limit in metric_levels.items())
        out.sort(key=lambda lv: (lv.metric, lv.limit, lv.level))
        return Effective(exempt, count, tuple(out), tuple(name for name, _ in layers))

    def _listed(self, sender: str) -> bool:
        return sender in self._exempt_exact or any(
            fnmatch.fnmatchcase(sender, p) for p in self._exempt_globs
        )


def _last_exempt(layers: list[tuple[str, Rule]]) -> bool:
    """The most specific rule that says `exempt` decides."""
    for _, rule in reversed(layers):
        if rule.exempt is not None:
            return rule.exempt
    return False


class CrossingJudge:
    """Make a crossing notice when a day's count passes a level (`store.Judge`).

    Only days from `days_back` days ago on are judged (None: every day, as
    ``ingest --notify`` asks), so a backfill of old logs mails nobody.
    """

    def __init__(self, thresholds: Thresholds, tz: tzinfo, days_back: int | None = 1) -> None:
        self.thresholds = thresholds
        self.tz = tz
        self.days_back = days_back
        self._earliest = ""
        self._checked_at = -1.0

    def earliest(self) -> str:
        """The first day judged (ISO), or "" for every day."""
        if self.days_back is None:
            return ""
        now = time.monotonic()
        if now - self._checked_at >= EARLIEST_EVERY:
            today = datetime.now(self.tz).date()
            self._earliest = (today - timedelta(days=self.days_back)).isoformat()
            self._checked_at = now
        return self._earliest

    def wants(self, sender: str, day: str) -> bool:
        return day >= self.earliest() and not self.thresholds.effective(sender).exempt

    def notices(self, sender: str, row: DayRow) -> list[Notice]:
        return [
            Notice("crossing", sender, row.day, level.level, level.metric, level.limit, value)
            for level, value in self.thresholds.effective(sender).passed(row)
        ]
