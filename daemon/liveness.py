"""Which processes are alive: the names they beat under, and how old a beat may be.

The watcher and each engine write a heartbeat row every few seconds; the
supervisor (``fixative run``) and ``fixative status`` read them with the rules
here, so the process that restarts an engine and the command that shows it
judge it the same way. Nothing here reads or writes the job table.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fixative.daemon.settings import Settings

# Both processes beat at least every 10 s (watcher 5 s, engine worker.heartbeat_seconds),
# so a minute of silence means the process is gone.
ALIVE_WITHIN_SECONDS = 60.0
# A live process whose loop has not moved for this long is stuck (a hung GPU
# driver). The same figure as the unit's WatchdogSec (tests/test_systemd_unit.py
# checks it): `fixative run` kills and restarts an engine stalled this long, at
# the moment status starts to call it STALLED (fixative.daemon.supervisor). Long enough
# for the longest silence measured in a healthy engine, on 2 CPU cores
# (bench/README.md, 768x512): 21 s per step, and 268 s for the first step plus
# the report's figures, which report no progress.
STALLED_AFTER_SECONDS = 600.0
LOADING_STATUS = "loading model"  # `fixative run` sends READY once the engine's status moves past this


def engine_labels(devices: list[str]) -> list[str]:
    """What tells the engines apart on this machine: their devices, ``cpu#2`` for a device's second engine."""
    seen: Counter[str] = Counter()
    labels = []
    for device in devices:
        seen[device] += 1
        labels.append(device if seen[device] == 1 else f"{device}#{seen[device]}")
    return labels


def daemon_id(settings: Settings) -> str:
    """What tells this daemon apart from every other one on its job table and host; "" for a SQLite job table.

    A SQLite job table lives in the state folder, which one daemon at a time
    may use (fixative.daemon.lock), so the host alone names it. A PostgreSQL
    one may be shared by two daemons on one host (two users, two state
    folders) and by cloned machines that kept their hostname: there, the
    machine id and the state folder, hashed short. Under one name, each would
    read the other's beats as its own processes'.
    """
    if not settings.state_db:
        return ""
    return hashlib.sha256(f"{_machine_id()}\0{settings.state_dir}".encode()).hexdigest()[:6]


def _machine_id() -> str:
    """systemd's /etc/machine-id (or D-Bus's older copy), unique per installation; "" where there is none."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip()
    return ""


def host_suffix(daemon: str = "") -> str:
    """What this daemon's names end with: ``@host``, or ``@host/3f9a1c`` with a :func:`daemon_id`."""
    return f"@{socket.gethostname()}" + (f"/{daemon}" if daemon else "")


def engine_name(label: str, daemon: str = "") -> str:
    """An engine's name in the job table (its heartbeat row, its mark on jobs): ``engine cuda:1@host``.

    Stable across restarts, unlike its lease owner id. The host (and the
    ``daemon``'s id, see :func:`daemon_id`) is in it because several machines
    may share one job table.
    """
    return f"engine {label}{host_suffix(daemon)}"


def watcher_name(daemon: str = "") -> str:
    """The watcher's heartbeat row: ``watcher@host``, one per daemon, like the engines'.

    Several machines may share one job table, each watching an inbox of its own.
    Under one shared name, status would show whichever beat last, and
    ``fixative run`` would take another machine's live watcher for its own
    when deciding whether to ping systemd's watchdog.
    """
    return f"watcher{host_suffix(daemon)}"


def new_owner() -> str:
    """A lease owner id, unique per engine process start.

    A restarted engine must not pass the owner guard of jobs its previous life
    claimed, so the id is new on every start, unlike :func:`engine_name`.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def is_alive(beat: dict[str, Any] | None) -> bool:
    # "stopped", or "stopped: <why>" from an engine that could not start (a device that does not exist).
    return beat is not None and beat["age_seconds"] < ALIVE_WITHIN_SECONDS and not beat["status"].startswith("stopped")


def is_stalled(beat: dict[str, Any] | None) -> bool:
    return beat is not None and beat["progress_age_seconds"] > STALLED_AFTER_SECONDS


def is_healthy(beat: dict[str, Any] | None) -> bool:
    """Alive and moving: what `status` calls up."""
    return is_alive(beat) and not is_stalled(beat)
