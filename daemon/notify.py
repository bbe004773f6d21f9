"""sd_notify without a library: one datagram to ``$NOTIFY_SOCKET``.

The unit is ``Type=notify`` with ``NotifyAccess=main``: systemd only listens to
the main process, so call this from ``fixative run`` itself, never from a child.
Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import os
import socket

from fixative.daemon.text import printable


def notify(*fields: str) -> bool:
    """Send e.g. ``notify("READY=1", "STATUS=idle")``; True if systemd got it.

    The datagram is one field a line, so each field is escaped to one line: a
    file name in a STATUS must not add assignments of its own (``MAINPID=``).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace: a leading NUL byte, not a file
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # Non-blocking: a datagram send blocks while the reader's queue is full,
        # and a heartbeat thread stuck there would hold up shutdown forever.
        sock.setblocking(False)
        try:
            sock.sendto("\n".join(printable(field) for field in fields).encode(), address)
        except OSError:  # queue full, or systemd gone or restarting: never crash the daemon for a status line
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or None if systemd wants none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2
