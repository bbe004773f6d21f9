"""Waiting out a job table that cannot be written: a full state disk, a PostgreSQL server away.

When the disk that holds ``state_dir`` fills up (logs, a download, another
program), SQLite refuses every write to the job table and the store raises
:class:`fixative.daemon.store.StateDiskFull`. A crash there would end
``fixative run`` and kill the engine with a traceback while ``fixative
status`` still said "up". A PostgreSQL job table that restarts, or that the
network hides for a while, raises its parent,
:class:`fixative.daemon.store.StoreUnavailable`, and is waited out the same way
(the store reconnects by itself). As the README promises:

* the watcher and the engine wait and try again every :data:`RETRY_SECONDS`,
  logging one line when the wait starts and one when it ends;
* nothing is lost: a file not yet queued is found by the rescan that follows
  the wait, and a finished job's result is written once there is space;
* ``fixative status`` and systemd's STATUS line say why, from the free space
  itself (:func:`fixative.daemon.store.looks_full`), since no heartbeat can be recorded meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import structlog

from fixative.daemon.store import StateDiskFull, StoreUnavailable, free_bytes

log = structlog.get_logger()

RETRY_SECONDS = 5.0
T = TypeVar("T")


class StoreWait:
    """One process's wait for the job table: a log line when it starts and one when it ends, none in between."""

    def __init__(self, process: str):
        self.process = process
        self.since: float | None = None
        self.what = ""  # "state_disk" or "store": the log events say which wait this was

    def waiting(self, error: StoreUnavailable) -> None:
        """A write failed with ``error``; the first call of a wait logs why."""
        if self.since is None:
            self.since = time.monotonic()
            if isinstance(error, StateDiskFull):
                self.what = "state_disk"
                log.warning(f"{self.process}.state_disk_full", error=str(error), free_bytes=free_bytes(error.folder),
                            retry_every_seconds=RETRY_SECONDS)
            else:
                self.what = "store"
                log.warning(f"{self.process}.store_unavailable", error=str(error), retry_every_seconds=RETRY_SECONDS)

    def resumed(self) -> None:
        """A write went through; ends the wait, if there was one, with its length."""
        if self.since is not None:
            log.info(f"{self.process}.{self.what}_resumed", waited_seconds=round(time.monotonic() - self.since))
            self.since = None


def until_answered(ask: Callable[[], T], *, stop: threading.Event, pause: Callable[[StoreUnavailable], None]) -> T:
    """Call ``ask`` until the job table answers, ``pause`` between tries; its answer.

    For the engine's calls between a protection and its record: minutes of
    work must not be dropped for a blip. On a stop, the StoreUnavailable is raised.
    """
    while True:
        try:
            return ask()
        except StoreUnavailable as error:
            if stop.is_set():
                raise
            pause(error)


def until_written(write: Callable[[], bool], landed: Callable[[], bool] | None, *, stop: threading.Event,
                  pause: Callable[[StoreUnavailable], None]) -> bool:
    """Call ``write`` until the job table answers (:func:`until_answered`); its answer, or False on a stop.

    False also means the row is no longer ours (``write``'s owner guard).
    ``landed``: after a try that failed, whether it was written after all. A
    PostgreSQL COMMIT whose answer was lost with the connection may have
    landed, and then the retry's owner guard no longer matches.
    """
    tries = 0

    def attempt() -> bool:
        nonlocal tries
        tries += 1
        return write() or (tries > 1 and landed is not None and landed())

    try:
        return until_answered(attempt, stop=stop, pause=pause)
    except StoreUnavailable:
        return False  # stopping
