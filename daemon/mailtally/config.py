"""Read the YAML configuration into frozen, validated settings.

Errors name the file, the line and the dotted key, e.g.
``mailtally.yaml:14: correlate.max_open: expected a positive integer, got 'ten'``.
Unknown keys are errors, so a misspelt key never silently falls back to a default.
"""

from __future__ import annotations

import logging
import re
from datetime import tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mailtally.correlate import CorrelatorSettings
from mailtally.errors import ConfigError
from mailtally.notify.settings import NotifySettings
from mailtally.thresholds import Thresholds, ThresholdsSection

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/etc/mailtally/mailtally.yaml")
DEFAULT_DATABASE = Path("/var/lib/mailtally/mailtally.db")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|[smhdw]?)\Z")
_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

_DEFAULTS = CorrelatorSettings()
PositiveInt = Annotated[int, Field(gt=0, strict=True)]


def parse_duration(value: object) -> float:
    """Return seconds for ``90``, ``"200ms"``, ``"30s"``, ``"8d"``; raise ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 15m, 8d")
    if isinstance(value, int | float) and value > 0:
        return float(value)
    m = _DURATION.match(str(value).strip())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"expected a duration such as 30s, 15m, 8d, got {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


Duration = Annotated[float, Field(gt=0)]


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``127.0.0.1:9154``, ``[::1]:9154`` or ``:9154`` into host and port."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:  # noqa: PLR2004
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9154, got {text!r}")
    host = host.strip("[]")
    return host, int(port)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorrelateSection(_Section):
    """How log lines are joined into messages (``correlate:``)."""

    max_open: PositiveInt = _DEFAULTS.max_open
    max_age: Duration = _DEFAULTS.max_age
    reorder_window: Duration = _DEFAULTS.reorder_window
    auth_services: list[str] = Field(default_factory=lambda: sorted(_DEFAULTS.auth_services))
    strip_extension: bool = False
    recipient_delimiter: str = Field(default="+", min_length=1, max_length=1)
    content_filters: list[str] = Field(default_factory=list)
    reinject_services: list[str] = Field(default_factory=list)

    @field_validator("max_age", "reorder_window", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)


class IngestSection(_Section):
    """Reading and batching of commits (``ingest:``), for ``ingest`` and ``run``."""

    batch_lines: PositiveInt = 20_000
    batch_interval: Duration = 0.2
    poll_interval: Duration = 1.0
    inotify: bool = True
    syslog_names: list[str] = Field(default_factory=lambda: ["postfix"], min_length=1)

    @field_validator("batch_interval", "poll_interval", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)


class MetricsSection(_Section):
    """The Prometheus exporter of ``mailtally run`` (``metrics:``)."""

    enabled: bool = True
    listen: str = "127.0.0.1:9154"  # postfix_exporter's port: mailtally replaces it
    tls_cert: Path | None = None
    tls_key: Path | None = None
    basic_auth_username: str | None = None
    basic_auth_password_file: Path | None = None
    top_senders: int = Field(default=0, ge=0, le=50, strict=True)  # opt-in, per-sender

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @model_validator(mode="after")
    def _pairs(self) -> MetricsSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if (self.basic_auth_username is None) != (self.basic_auth_password_file is None):
            raise ValueError("basic_auth_username and basic_auth_password_file go together")
        return self


_ACTION = re.compile(
    r"(DUNNO|WARN( .+)?|HOLD( .+)?|DEFER( .+)?|DEFER_IF_PERMIT( .+)?|REJECT( .+)?"
    r"|PREPEND [A-Za-z0-9-]+: ?.*)\Z"
)


def _policy_action(value: str) -> str:
    text = str(value).strip()
    if not _ACTION.match(text) or any(ord(c) < 32 for c in text):  # noqa: PLR2004
        raise ValueError(
            "expected a policy action: DUNNO, WARN text, PREPEND Header: value, HOLD text,"
            " DEFER_IF_PERMIT text, DEFER text or REJECT text"
        )
    return text


PolicyAction = Annotated[str, AfterValidator(_policy_action)]


class PolicySection(_Section):
    """The policy delegation server of ``mailtally run`` (``policy:``)."""

    listen: list[str] = Field(default_factory=list)  # "127.0.0.1:10040", "unix:/path"
    identity: Literal["envelope", "sasl", "client"] | None = None  # default: top identity
    count_at: Literal["END-OF-MESSAGE", "DATA"] = "END-OF-MESSAGE"
    actions: dict[str, PolicyAction] = Field(default_factory=dict)  # level -> action
    fail_action: str = "DUNNO"  # on an internal error, a locked database, a slow answer
    budget: Duration = 0.5  # seconds a decision may take before fail_action is answered
    idle_timeout: Duration = 300.0  # Postfix's smtpd_policy_service_max_idle
    request_timeout: Duration = 10.0  # to send one whole request
    max_connections: PositiveInt = 10_000
    backlog: PositiveInt = 1024

    @field_validator("budget", "idle_timeout", "request_timeout", mode="before")
    @classmethod
    def _durations(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: list[str]) -> list[str]:
        for item in value:
            if item.startswith("unix:"):
                if not item[5:].startswith("/"):
                    raise ValueError(f"expected unix:/absolute/path, got {item!r}")
            else:
                parse_listen(item)
        return value

    @field_validator("fail_action")
    @classmethod
    def _fail_action(cls, value: str) -> str:
        text = _policy_action(value)
        if not text.startswith(("DUNNO", "DEFER_IF_PERMIT")):
            raise ValueError("expected DUNNO or DEFER_IF_PERMIT text")
        return text


class JournalOptions(_Section):
    directory: Path | None = None
    start: Literal["now", "oldest"] = "now"


class FileSourceConfig(_Section):
    file: str = Field(min_length=1)  # a path or a glob (/var/log/mail/*.log)


class JournalSourceConfig(_Section):
    journal: JournalOptions


_DEFAULT_SOURCE: FileSourceConfig | JournalSourceConfig = FileSourceConfig(
    file="/var/log/mail.log"
)


class Config(_Section):
    """The whole file; DESIGN.md fixes the top-level keys."""

    timezone: str | None = None
    database: Path = DEFAULT_DATABASE
    sources: list[FileSourceConfig | JournalSourceConfig] = Field(
        default_factory=lambda: [_DEFAULT_SOURCE], min_length=1
    )
    identity: Literal["envelope", "sasl"] = "envelope"
    correlate: CorrelateSection = Field(default_factory=CorrelateSection)
    ingest: IngestSection = Field(default_factory=IngestSection)
    details_days: PositiveInt = 35
    thresholds: ThresholdsSection = Field(default_factory=ThresholdsSection)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    policy: PolicySection = Field(default_factory=PolicySection)
    # Checked key by key by mailtally.frontend.settings (the frontend's own process, and
    # check-config), which builds on this module: kept raw here to avoid a cycle.
    frontend: dict[str, Any] = Field(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    def tz(self) -> tzinfo:
        """Return the configured zone, or the host's."""
        if self.timezone is not None:
            return ZoneInfo(self.timezone)
        return host_zone()

    def policy_identity(self) -> str:
        return self.policy.identity or self.identity

    def thresholds_rules(self) -> Thresholds:
        """The compiled thresholds; the notifier's own From address is never limited."""
        n = self.notify
        return Thresholds(self.thresholds, [n.from_addr, *filter(None, [n.envelope_from])])

    def correlator_settings(self) -> CorrelatorSettings:
        c = self.correlate
        return CorrelatorSettings(
            identity=self.identity,
            strip_extension=c.strip_extension,
            recipient_delimiter=c.recipient_delimiter,
            auth_services=frozenset(c.auth_services),
            max_open=c.max_open,
            max_age=c.max_age,
            reorder_window=c.reorder_window,
            content_filters=tuple(c.content_filters),
            reinject_services=frozenset(c.reinject_services),
        )


def _all_levels(section: ThresholdsSection) -> set[str]:
    rules = [section.default, *section.domains.values(), *section.senders.values()]
    levels: set[str] = set()
    for rule in rules:
        levels.update(rule.levels())
        for watched in (rule.watch or {}).values():
            levels.update(watched)
    return levels


def host_zone() -> tzinfo:
    """Return the host's zone (TZ, then /etc/localtime), falling back to UTC."""
    import tzlocal  # only needed when no zone is configured

    try:
        return tzlocal.get_localzone()
    except (ZoneInfoNotFoundError, ValueError, LookupError) as exc:
        log.warning("host time zone unknown, using UTC error=%s", exc)
        return ZoneInfo("UTC")


def load_config(path: Path | None) -> Config:
    """Load and validate `path`; None means the defaults (no file)."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    """Validate YAML `text`; errors cite `path`, the line and the dotted key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{line} invalid YAML: {problem}") from exc
    lines: dict[tuple[str | int, ...], int] = {}
    data = _plain(node, (), lines) if node is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of settings at the top level")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, path, lines)) from exc
    _check_policy(config, path, lines)
    return config


def _check_policy(config: Config, path: Path, lines: dict[tuple[str | int, ...], int]) -> None:
    """Refuse policy rules that could never apply: a listener without actions, or an
    action for a level no thresholds rule has."""
    policy = config.policy
    if not policy.listen:
        return
    if not policy.actions:
        line = lines.get(("policy", "listen"), 1)
        raise ConfigError(
            f"{path}:{line}: policy.actions: empty while policy.listen is set;"
            " every request would be answered DUNNO"
        )
    levels = _all_levels(config.thresholds)
    for level in policy.actions:
        if level not in levels:
            line = lines.get(("policy", "actions", level), 1)
            known = ", ".join(sorted(levels)) or "none"
            raise ConfigError(
                f"{path}:{line}: policy.actions.{level}: no thresholds rule has a level"
                f" {level!r} (levels: {known}), so it could never apply"
            )


def _plain(
    node: yaml.Node, where: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int]
) -> Any:
    """Turn a composed YAML node into Python values, noting each key's line."""
    lines[where] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.SafeLoader(" ").construct_object(key_node)
            lines[(*where, str(key))] = key_node.start_mark.line + 1
            out[key] = _plain(value_node, (*where, str(key)), lines)
            lines[(*where, str(key))] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item, (*where, i), lines) for i, item in enumerate(node.value)]
    return yaml.SafeLoader(" ").construct_object(node)


def _first_error(exc: ValidationError, path: Path, lines: dict[tuple[str | int, ...], int]) -> str:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not _is_union_tag(p) and p != "[key]")
    line = 1
    for cut in range(len(loc), -1, -1):
        found = lines.get(tuple(str(p) if isinstance(p, str) else p for p in loc[:cut]))
        if found is not None:
            line = found
            break
    key = "".join(_key_text(p) for p in loc).lstrip(".") or "(top level)"
    problem = _problem(err)
    return f"{path}:{line}: {key}: {problem}"


def _is_union_tag(part: object) -> bool:
    # pydantic names the union member it tried ("FileSourceConfig"); users never wrote it.
    return isinstance(part, str) and part[:1].isupper()


def _key_text(part: object) -> str:
    if isinstance(part, int):
        return f"[{part}]"
    text = str(part)
    return f'."{text}"' if "." in text else f".{text}"


def _problem(err: Any) -> str:
    kind, got = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key missing"
    if kind in {"greater_than", "int_type", "int_parsing"}:
        return f"expected a positive integer, got {got!r}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"expected {expected.replace(chr(39), '')}, got {got!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if got is None or "got" in msg or isinstance(got, dict | list):
        return msg
    return f"{msg}, got {got!r}"
