"""Read syslog files, plain or gzip, as blocks of complete, decoded lines.

A file is known by a fingerprint of its first line, not by its name or inode, so a log
that logrotate renamed or compressed is recognised as the one read before.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mailtally.errors import SourceError
from mailtally.parse import MAX_LINE

CHUNK = 256 * 1024
FINGERPRINT_BYTES = 4096
GZIP_MAGIC = b"\x1f\x8b"


def fingerprint(head: bytes) -> str | None:
    """Return the source key for a file starting with `head`, or None if no line yet."""
    end = head.find(b"\n")
    if end < 0:
        if len(head) < FINGERPRINT_BYTES:
            return None
        end = FINGERPRINT_BYTES
    return "file:" + hashlib.sha256(head[: end + 1]).hexdigest()[:32]


def open_log(path: Path) -> BinaryIO:
    """Open a log file for reading, decompressing gzip whatever its name."""
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from exc
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    raw.seek(0)
    return raw


def read_blocks(stream: BinaryIO, *, final: bool) -> Iterator[tuple[int, list[str | None]]]:
    """Yield (bytes consumed so far, decoded lines) per chunk of complete lines.

    A line that is not UTF-8 comes out as None; of a line longer than `MAX_LINE` with no
    newline in sight only a prefix comes out, which the parser rejects for its length.
    The last line without a newline is held back unless `final` (a closed, rotated file).
    """
    consumed = 0
    rest = b""
    overlong = False
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            break
        data = rest + chunk if rest else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            if len(rest) > MAX_LINE:  # no newline in sight: drop it, keep counting bytes
                consumed += len(rest)
                prefix, rest = rest[: MAX_LINE + 1], b""
                if not overlong:
                    overlong = True
                    yield consumed, [prefix.decode("utf-8", "replace")]
            continue
        block, rest = data[: cut + 1], data[cut + 1 :]
        consumed += len(block)
        lines = _decode(block)
        if overlong:  # the tail of a line already counted as too long
            lines = lines[1:]
            overlong = False
        yield consumed, lines
    if final and rest and not overlong:
        consumed += len(rest)
        yield consumed, _decode(rest + b"\n")


def _decode(block: bytes) -> list[str | None]:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        out: list[str | None] = []
        for raw in block.split(b"\n")[:-1]:
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(None)
        return out
    lines: list[str | None] = text.split("\n")  # type: ignore[assignment]
    lines.pop()  # the empty string after the last newline
    return lines
