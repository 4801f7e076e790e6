"""Which addresses mailtally writes into a header or an SMTP envelope: plain ones only."""

from __future__ import annotations

import re

MAX_LOCAL = 64
MAX_DOMAIN = 253

# Plain ASCII dot-atom local part (RFC 5322 atext) and LDH domain labels (RFC 1123).
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def safe_address(text: str) -> str | None:
    """Return `text` if it is safe as a header value and an SMTP envelope address, else None.

    Accepted: exactly one `@`, an ASCII dot-atom local part of 1..64 characters, a domain
    of 1..253 characters made of letter-digit-hyphen labels (IDN only as `xn--`). Nothing
    else: no quoting, comments, brackets, lists, whitespace or control characters.
    """
    local, at, domain = text.partition("@")
    if not at or not 1 <= len(local) <= MAX_LOCAL or not 1 <= len(domain) <= MAX_DOMAIN:
        return None
    if _LOCAL.fullmatch(local) is None:
        return None
    if not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        return None
    return text
