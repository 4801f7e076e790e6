"""The ``notify:`` section: where notices go, in which language, how fast, how often."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from mailtally.notify.address import safe_address

Language = Literal["en", "zh-TW"]
_TIME = re.compile(r"([01]\d|2[0-3]):([0-5]\d)\Z")
PositiveInt = Annotated[int, Field(gt=0, strict=True)]


def _duration(value: object) -> float:
    from mailtally.config import parse_duration  # config imports this module

    return parse_duration(value)


def _address(value: str, key: str = "") -> str:
    text = value.strip()
    if safe_address(text) is None:  # the check every notice's addresses pass again
        raise ValueError(f"{key}expected a mail address such as postmaster@example.edu")
    return text


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SmtpSettings(_Section):
    """``notify.smtp``: the server notices are handed to."""

    host: str = "localhost"
    port: int = Field(default=25, gt=0, lt=65536, strict=True)
    starttls: bool = False  # STARTTLS after EHLO (submission on 587)
    tls: bool = False  # TLS from the first byte (465)
    ca_file: Path | None = None  # CA certificates to verify the server by (default: system's)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None  # read at start and on reload; keeps it out of YAML
    timeout: float = 30.0
    helo: str | None = None  # default: the host's name

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: object) -> float:
        return _duration(value)

    @model_validator(mode="after")
    def _auth(self) -> SmtpSettings:
        if self.starttls and self.tls:
            raise ValueError("starttls and tls exclude each other")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("a password needs a username")
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file exclude each other")
        return self


class RetrySettings(_Section):
    """``notify.retry``: backoff after a temporary failure (SMTP down, 4xx)."""

    first: float = 60.0
    max: float = 3600.0
    give_up: float = 2 * 86400.0

    @field_validator("first", "max", "give_up", mode="before")
    @classmethod
    def _durations(cls, value: object) -> float:
        return _duration(value)


class NotifySettings(_Section):
    """The ``notify:`` section."""

    enabled: bool = True
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    from_addr: str = Field(default="postmaster@localhost", alias="from")
    reply_to: str | None = None
    envelope_from: str | None = None  # the SMTP MAIL FROM; default: from
    admins: list[str] = Field(default_factory=list)
    copy_admins: bool = False  # Cc the admins on each sender's notice
    language: Language = "en"
    languages: dict[str, Language] = Field(default_factory=dict)  # per domain
    when: Literal["crossing", "daily", "both"] = "crossing"
    daily_at: str = "00:30"  # local time of the previous-day notices and the digest
    digest: bool = True  # the admins' digest of the previous day (needs admins)
    templates: Path | None = None  # a directory of replacement templates
    username_domain: str | None = None  # identity: sasl: mail user@this
    max_per_minute: PositiveInt = 60
    top: PositiveInt = 5  # destinations listed in a notice
    retry: RetrySettings = Field(default_factory=RetrySettings)

    @field_validator("from_addr", "reply_to", "envelope_from")
    @classmethod
    def _addresses(cls, value: str | None) -> str | None:
        return None if value is None else _address(value)

    @field_validator("admins")
    @classmethod
    def _admins(cls, value: list[str]) -> list[str]:
        return [_address(v) for v in value]

    @field_validator("languages")
    @classmethod
    def _languages(cls, value: dict[str, Language]) -> dict[str, Language]:
        return {k.strip().lower().rstrip("."): v for k, v in value.items()}

    @field_validator("daily_at")
    @classmethod
    def _daily_at(cls, value: str) -> str:
        if not _TIME.match(str(value)):
            raise ValueError("expected a time of day such as 00:30")
        return str(value)

    def language_for(self, address: str) -> str:
        """The language of the notice to `address`: its domain's, else the default."""
        domain = address.rpartition("@")[2].lower()
        labels = domain.split(".")
        for i in range(len(labels)):
            found = self.languages.get(".".join(labels[i:]))
            if found is not None:
                return found
        return self.language
