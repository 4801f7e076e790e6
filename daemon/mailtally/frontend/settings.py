"""The ``frontend:`` section: who may use the query form, how often, where its state lives."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
)

from mailtally.config import Config, _first_error, _plain, parse_duration, parse_listen
from mailtally.errors import ConfigError

Language = Literal["en", "zh-TW"]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
_RATE = re.compile(r"(\d+)\s*/\s*(\d*(?:\.\d+)?\s*(?:ms|[smhdw]))\Z")
_DOMAIN = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)


class Rate(BaseModel):
    """At most `count` events within `window` seconds; written ``10/h`` or ``3/30m``."""

    model_config = ConfigDict(frozen=True)

    count: int
    window: float


def parse_rate(value: object) -> Rate:
    """Return the Rate for ``"10/h"``, ``"10/1h"``, ``"3/30m"``; raise ValueError otherwise."""
    m = _RATE.match(str(value).strip())
    if m is None or int(m.group(1)) <= 0:
        raise ValueError(f"expected COUNT/PERIOD such as 10/h or 3/30m, got {value!r}")
    period = m.group(2).strip()
    if period[:1].isalpha():
        period = f"1{period}"
    return Rate(count=int(m.group(1)), window=parse_duration(period))


class FrontendSettings(BaseModel):
    """The ``frontend:`` section of mailtally.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = "127.0.0.1:8080"
    domains: list[str] = Field(default_factory=list)  # the domain or any subdomain of it
    networks: list[IPvAnyNetwork] = Field(
        default_factory=lambda: [ip_network("127.0.0.0/8"), ip_network("::1/128")]
    )
    proxies: list[IPvAnyNetwork] = Field(default_factory=list)  # X-Forwarded-For trusted
    secret_file: Path = Path("/var/lib/mailtally/frontend.key")  # made at first start, 0600
    state: Path = Path("/var/lib/mailtally/frontend.db")  # used codes and rate limits
    max_days: int = Field(default=31, gt=0, le=366, strict=True)
    code_ttl: float = 600.0
    per_client: Rate = Rate(count=10, window=3600.0)
    per_address: Rate = Rate(count=3, window=3600.0)
    language: Language = "en"
    details: bool = True  # the per-delivery table in the mail
    threads: PositiveInt = 4  # waitress worker threads
    cookie_secure: bool = False  # set when the reverse proxy serves HTTPS
    hostname: str | None = None  # in the mail; default: the host's name

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            domain = str(item).strip().lower().strip(".")
            if not _DOMAIN.fullmatch(domain) or len(domain) > 253:  # noqa: PLR2004
                raise ValueError(f"expected a domain such as example.edu, got {item!r}")
            out.append(domain)
        return out

    @field_validator("code_ttl", mode="before")
    @classmethod
    def _ttl(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("per_client", "per_address", mode="before")
    @classmethod
    def _rate(cls, value: object) -> Rate:
        return value if isinstance(value, Rate) else parse_rate(value)

    def allows_domain(self, domain: str) -> bool:
        """Whether `domain` is one of `domains` or a subdomain of one (any case)."""
        domain = domain.lower()
        return any(domain == d or domain.endswith(f".{d}") for d in self.domains)

    def allows_client(self, address: IPv4Address | IPv6Address) -> bool:
        return any(address in net for net in self.networks)

    def is_proxy(self, address: IPv4Address | IPv6Address) -> bool:
        return any(address in net for net in self.proxies)


def client_address(text: str) -> IPv4Address | IPv6Address | None:
    """Parse a peer address; an IPv4-mapped IPv6 address counts as the IPv4 one."""
    try:
        address = ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class _File(BaseModel):
    model_config = ConfigDict(extra="ignore")

    frontend: FrontendSettings


def frontend_settings(config: Config, path: Path | None = None) -> FrontendSettings:
    """Validate the config's ``frontend:`` mapping; errors name ``frontend.<key>`` and the line.

    Once Config holds a FrontendSettings itself, that one is returned as it is.
    """
    raw: object = config.frontend
    if isinstance(raw, FrontendSettings):
        return raw
    try:
        return _File.model_validate({"frontend": raw}).frontend
    except ValidationError as exc:
        where = path or Path("mailtally.yaml")
        raise ConfigError(_first_error(exc, where, _lines(path))) from exc


def _lines(path: Path | None) -> dict[tuple[str | int, ...], int]:
    lines: dict[tuple[str | int, ...], int] = {}
    if path is None:
        return lines
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return lines  # load_config read it a moment ago; lines are only a help
    if node is not None:
        _plain(node, (), lines)
    return lines


def settings_error(message: str, path: Path | None, key: str) -> ConfigError:
    """A ConfigError for a frontend rule checked after validation."""
    line = _lines(path).get(("frontend", *key.split(".")), 1)
    return ConfigError(f"{path or 'mailtally.yaml'}:{line}: frontend.{key}: {message}")
