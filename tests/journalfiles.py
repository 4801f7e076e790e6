"""Write real journal files from syslog lines, with systemd-journal-remote.

systemd-journal-remote reads the journal export format on stdin and appends the entries
to the journal file it is given (creating the file, not the directory). Each call of
`write_journal` or `write_entries` is one run of it: a second run onto the same file
appends to it, and a reader following the directory sees the new entries through its
descriptor. A different `file` name in the same directory makes a second journal file,
as journald does after a rotation; `archive` and `vacuum` do the rest of a rotation and
journalctl's vacuuming, so the files that disappear under a reader are real ones.

Export format: https://systemd.io/JOURNAL_EXPORT_FORMATS/
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

JOURNAL_REMOTE = Path("/lib/systemd/systemd-journal-remote")
BOOT_ID = "6d61696c74616c6c79626f6f74303031"  # one boot for every entry written here
# Monotonic stamps count from this moment, so entries of separate runs and separate
# files order the same way by monotonic time (same boot) as by wall-clock time.
BOOTED_AT = datetime(2000, 1, 1, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)

Fields = Mapping[str, str | bytes]


def entry(line: str, **extra: str | bytes) -> dict[str, str | bytes]:
    """Return the fields journald stores for a syslog line sent by Postfix to /dev/log.

    `line` is ``2026-12-03T09:41:40.123456+00:00 host ident[pid]: message`` (an RFC 3339
    stamp, as in ``tests/data/scenario/mail.log.rfc3339``); ``[pid]`` may be missing.
    `extra` adds or replaces fields: ``MESSAGE=b"\\xff"`` writes a message that is not
    UTF-8, ``SYSLOG_IDENTIFIER="dovecot"`` a foreign program on the mail facility.
    """
    stamp, host, rest = line.split(" ", 2)
    tag, message = rest.split(": ", 1)
    ident, _, pid = tag.partition("[")
    realtime = (datetime.fromisoformat(stamp) - EPOCH) // US
    fields: dict[str, str | bytes] = {
        "__REALTIME_TIMESTAMP": str(realtime),
        "__MONOTONIC_TIMESTAMP": str(realtime - (BOOTED_AT - EPOCH) // US),
        "_BOOT_ID": BOOT_ID,
        "_TRANSPORT": "syslog",
        "PRIORITY": "6",
        "SYSLOG_FACILITY": "2",
        "SYSLOG_IDENTIFIER": ident,
        "MESSAGE": message,
        "_HOSTNAME": host,
    }
    if pid:
        fields["SYSLOG_PID"] = fields["_PID"] = pid.rstrip("]")
    fields.update(extra)
    return fields


def write_entries(
    directory: Path, entries: Iterable[Fields], file: str = "remote.journal"
) -> Path:
    """Append `entries` (field name -> value) to the journal file `directory`/`file`.

    The directory is created if missing, the file if new; returns the file's path.
    `__REALTIME_TIMESTAMP` and `__MONOTONIC_TIMESTAMP` (microseconds) are required.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file
    export = b"".join(_export(fields) for fields in entries)
    subprocess.run(
        [JOURNAL_REMOTE, f"--output={path}", "-"],
        input=export,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return path


def write_journal(directory: Path, lines: Iterable[str], file: str = "remote.journal") -> Path:
    """Append one journal entry per syslog line (see `entry`) to `directory`/`file`."""
    return write_entries(directory, (entry(line) for line in lines), file)


def _export(fields: Fields) -> bytes:
    out = []
    for name, value in fields.items():
        data = value.encode() if isinstance(value, str) else value
        if b"\n" in data or isinstance(value, bytes):
            # The binary form: name, newline, little-endian 64-bit length, data, newline.
            out.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            out.append(name.encode() + b"=" + data + b"\n")
    return b"".join(out) + b"\n"


def archive(path: Path) -> Path:
    """Rename an active journal file to the archived name journald gives it on rotation.

    The name, ``remote@<seqnum id>-<head seqnum>-<head realtime>.journal``, comes from
    the file header (https://systemd.io/JOURNAL_FILE_FORMAT/); journalctl's vacuum
    removes only files named so.
    """
    with path.open("rb") as f:
        header = f.read(192)
    seqnum_id = header[72:88].hex()
    head_seqnum, _, head_realtime = struct.unpack_from("<QQQ", header, 168)
    target = path.with_name(
        f"{path.stem}@{seqnum_id}-{head_seqnum:016x}-{head_realtime:016x}.journal"
    )
    path.rename(target)
    return target


def vacuum(directory: Path, keep_files: int = 1) -> None:
    """Delete archived journal files in `directory` as ``journalctl --vacuum-files`` does."""
    subprocess.run(
        ["journalctl", f"--directory={directory}", f"--vacuum-files={keep_files}"],
        capture_output=True,
        check=True,
        timeout=60,
    )
