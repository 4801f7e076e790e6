"""Check the query form's fields: one allowed address and a date range inside the window.

Each problem is a key of the frontend's words (``mailtally.frontend.i18n``) with the
values its text needs, so the page can say it in the chosen language.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from ipaddress import IPv4Address, IPv6Address

from mailtally.frontend.settings import FrontendSettings, client_address
from mailtally.notify.message import safe_address

MAX_ADDRESS = 254  # RFC 5321 4.5.3.1.3, a path of 256 with its brackets
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}\Z")

Problem = tuple[str, dict[str, object]]


@dataclass(frozen=True, slots=True)
class Query:
    address: str  # lower case, as the store keeps senders
    since: date
    until: date


@dataclass(frozen=True, slots=True)
class Window:
    """The dates a query may ask for: earliest..today, at most `max_days` of them."""

    earliest: date
    today: date
    max_days: int


def check_address(text: str, settings: FrontendSettings) -> tuple[str | None, Problem | None]:
    """Return the address (lower case) if it is one plain address of an allowed domain.

    The domain is taken from the address as `safe_address` accepts it (one `@`, a
    dot-atom local part, LDH labels), so ``user@evil.example?@nthu.edu.tw`` or
    ``user@nthu.edu.tw.evil.example`` never count as the allowed domain.
    """
    example: dict[str, object] = {
        "domain": settings.domains[0] if settings.domains else "example.edu"
    }
    if any(ord(c) < 32 or ord(c) == 127 for c in text):  # noqa: PLR2004 - C0 controls, DEL
        return None, ("err_address", example)
    text = text.strip(" ")
    if len(text) > MAX_ADDRESS or safe_address(text) is None:
        return None, ("err_address", example)
    domain = text.rpartition("@")[2].lower()
    if not settings.allows_domain(domain):
        return None, ("err_domain", {"domains": ", ".join(settings.domains)})
    return text.lower(), None


def check_dates(
    since: str, until: str, window: Window
) -> tuple[tuple[date, date] | None, Problem | None]:
    """Return (since, until) if both are ISO dates forming a range inside `window`."""
    if not (_ISO_DATE.match(since) and _ISO_DATE.match(until)):
        return None, ("err_date", {})
    try:
        first, last = date.fromisoformat(since), date.fromisoformat(until)
    except ValueError:
        return None, ("err_date", {})
    if last > window.today:
        return None, ("err_future", {"today": window.today.isoformat()})
    if first < window.earliest:
        return None, ("err_early", {"earliest": window.earliest.isoformat()})
    if first > last:
        return None, ("err_reversed", {})
    if (last - first).days + 1 > window.max_days:
        return None, ("err_long", {"days": window.max_days})
    return (first, last), None


def read_query(
    form: Mapping[str, str], settings: FrontendSettings, window: Window
) -> tuple[Query | None, list[Problem]]:
    """Check the form's address, since and until; the Query, or the problems found."""
    address, bad_address = check_address(form.get("address", ""), settings)
    dates, bad_dates = check_dates(
        form.get("since", "").strip(), form.get("until", "").strip(), window
    )
    if address is None or dates is None:
        return None, [p for p in (bad_address, bad_dates) if p is not None]
    return Query(address, *dates), []


def client_of(
    remote: str | None, forwarded: list[str], settings: FrontendSettings
) -> IPv4Address | IPv6Address | None:
    """The client's address: the peer, or, from a trusted proxy, the nearest untrusted hop.

    ``X-Forwarded-For`` is read right to left (each proxy appends the address it saw)
    and only while the hop it came from is a configured proxy; a malformed hop means
    the client is unknown (None), which the caller refuses.
    """
    peer = client_address(remote or "")
    if peer is None or not forwarded or not settings.is_proxy(peer):
        return peer
    hops = [h for header in forwarded for h in header.split(",")]
    found = peer
    for hop in reversed(hops):
        address = client_address(hop)
        if address is None:
            return None
        found = address
        if not settings.is_proxy(address):
            break
    return found
