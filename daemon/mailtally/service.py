"""Talk to systemd: readiness, watchdog pings and status through ``$NOTIFY_SOCKET``.

The protocol (sd_notify(3)) is one datagram of ``KEY=value`` lines on a Unix socket.
It is written out here rather than taken from systemd-python, so that the daemon still
reports to systemd on hosts where that optional package is not installed.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Send sd_notify messages; does nothing when not started by systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address: str | None = env.get("NOTIFY_SOCKET") or None
        if self.address is not None and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]  # abstract namespace
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)  # a listener that stops reading must not stall us
        self.watchdog_interval = _watchdog_interval(env)
        self._failed = False

    @property
    def active(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> None:
        """Send one message, e.g. ``send(READY=1, STATUS="following")``."""
        if self._sock is None or self.address is None:
            return
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self._failed:  # once: systemd may be restarting
                log.warning("cannot notify systemd socket=%s error=%s", self.address, exc)
                self._failed = True
        else:
            self._failed = False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: os._Environ[str] | dict[str, str]) -> float | None:
    """Seconds between pings (half of ``WatchdogSec=``), or None if no watchdog is set."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process
    return int(usec) / 2_000_000
