"""Waiting out a full state disk.

When the disk that holds ``state_dir`` fills up (logs, a download, another
program), SQLite refuses every write to the job table and the store raises
:class:`~daemon.store.StateDiskFull`. That used to crash the watcher, end
``fixative run`` with status 1 and kill the engine with a traceback, while
``fixative status`` still said "up". Instead, as the README promises:

* the watcher and the engine wait and try again every :data:`RETRY_SECONDS`,
  logging one line when the wait starts and one when it ends;
* nothing is lost: a file not yet queued is found by the rescan that follows
  the wait, and a finished job's result is written once there is space;
* ``fixative status`` and systemd's STATUS line say why, from the free space
  itself (:func:`daemon.status.looks_full`), since no heartbeat can be recorded meanwhile.
"""

from __future__ import annotations

import time

import structlog

from fixative.daemon.status import free_bytes
from fixative.daemon.store import StateDiskFull

log = structlog.get_logger()

RETRY_SECONDS = 5.0


class Pause:
    """One process's wait for space: a log line when it starts and one when it ends, none in between."""

    def __init__(self, process: str):
        self.process = process
        self.since: float | None = None

    def full(self, error: StateDiskFull) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning(f"{self.process}.state_disk_full", error=str(error), free_bytes=free_bytes(error.folder),
                        retry_every_seconds=RETRY_SECONDS)

    def written(self) -> None:
        if self.since is not None:
            log.info(f"{self.process}.state_disk_resumed", waited_seconds=round(time.monotonic() - self.since))
            self.since = None
