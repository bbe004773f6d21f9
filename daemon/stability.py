"""Decide when a file in the inbox has finished arriving.

An event only says "something happened to this file". A slow SMB copy, a
scanner or a browser download produces a stream of created/modified/closed
events over seconds or minutes, and some tools open and close the file several
times while writing (so inotify's close-after-write is a hint, not a
signal). Queuing on the first event would protect half an image.

The rule, as in paperless-ngx's consumer: a file is *settled* when no event
has arrived for ``stability_seconds`` and its size and mtime are the same as
they were at the last event. The stat comparison catches writers that produce
no events we see (network shares, polling gaps); the quiet period catches
writers that pause without changing the stat yet.

Time is passed in (``now``) rather than read from a clock, so the tests can
step it exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Pending:
    last_event: float
    stat: tuple[int, int] | None  # (size, mtime_ns) at the last event; None if it was gone


@dataclass(frozen=True)
class Settled:
    """A file that has stopped changing, with the stat it settled at."""

    path: Path
    size: int
    mtime_ns: int


def _stat(path: Path) -> tuple[int, int] | None:
    # lstat, not stat: the tracker must not follow a symlink either (the
    # refusal check after it reports the link itself). Any OSError counts as
    # gone: the only other one lstat gives is EACCES on a folder we cannot
    # search, and the watcher's scan already logs that folder as unreadable.
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class StabilityTracker:
    """Files that had events recently, waiting to settle. Not thread-safe: the
    watcher's main loop owns it; the observer thread never touches it."""

    def __init__(self, stability_seconds: float) -> None:
        self.stability_seconds = stability_seconds
        self._pending: dict[Path, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def touch(self, path: Path, now: float) -> None:
        """Record an event for ``path``: restart its quiet period and take its stat."""
        self._pending[path] = _Pending(last_event=now, stat=_stat(path))

    def ready(self, now: float) -> list[Settled]:
        """Remove and return the files that have settled.

        Each file quiet for ``stability_seconds`` is stat'ed again. Unchanged
        since its last event: settled. Changed: something wrote to it without
        an event reaching us, so its quiet period restarts from the new stat.
        Gone (deleted, or renamed away as ``x.part`` is): dropped; the rename's
        destination has its own event.
        """
        settled: list[Settled] = []
        for path, pending in list(self._pending.items()):
            if now - pending.last_event < self.stability_seconds:
                continue
            current = _stat(path)
            if current is None:
                del self._pending[path]
            elif current == pending.stat:
                del self._pending[path]
                settled.append(Settled(path, *current))
            else:
                self._pending[path] = _Pending(last_event=now, stat=current)
        return settled
