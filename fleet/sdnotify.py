"""systemd's notify protocol, in the standard library: READY=1, STATUS=..., WATCHDOG=1.

A datagram to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading "@" is the abstract namespace).
Without $NOTIFY_SOCKET (not under systemd, or Type=simple) every call is a no-op, so the same code
runs under `fleetd up`, in tests and under systemd.
"""

from __future__ import annotations

import os
import socket

import anyio
import structlog

log = structlog.get_logger("fleet.sdnotify")


def notify(*fields: str) -> bool:
    """Send `KEY=value` lines; True if a socket was there to take them."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), address)
        except OSError as e:  # systemd gone or the socket is wrong: log, never fail the service
            log.warning("sd_notify_failed", socket=path, error=repr(e))
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


async def watchdog_loop() -> None:
    """Ping from the event loop itself, so a stuck loop stops pinging and systemd restarts us."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await anyio.sleep(interval)
