"""systemd's notify protocol (sd_notify(3)): datagrams like "READY=1" to $NOTIFY_SOCKET.

A few lines over an AF_UNIX datagram socket rather than a dependency: the protocol is one
`sendto` per message. Outside systemd ($NOTIFY_SOCKET unset) every call does nothing, so
the service needs no flag to run by hand.
"""

from __future__ import annotations

import os
import socket

import trio


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address or None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send one message ("READY=1", "STATUS=..."); False if there is no socket or
        systemd is gone (a notification is never worth failing the service for)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC in seconds (systemd's advice), if the watchdog is on for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


async def keep_watchdog(notifier: Notifier, interval: float, healthy: object = None) -> None:
    """WATCHDOG=1 every `interval` while trio's loop runs and `healthy()` (if given) says
    so. A loop blocked by a stuck call stops the pings, and systemd restarts the service."""
    while True:
        if healthy is None or healthy():  # type: ignore[operator]
            notifier.send("WATCHDOG=1")
        await trio.sleep(interval)
