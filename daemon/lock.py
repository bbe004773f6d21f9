"""One daemon per state folder: an exclusive ``flock`` on ``state_dir/daemon.lock``.

Two ``fixative run`` on one job table each ran a watcher and an engine: two
models loaded on one GPU, two engines racing for the same queue. ``run``,
``watch`` and ``engine`` therefore take this lock before anything else, and a
second one exits with :data:`EXIT_ALREADY_RUNNING`, naming the holder's pid.

Why flock and not a pid file: the kernel drops a flock when its holder dies,
however it dies, so a SIGKILL or a power cut never leaves a stale lock that
blocks the next start. The file keeps the holder's pid and role only to name
them in the refusal; it is never deleted (deleting a lock file lets two
processes lock two different files).

``fixative run`` hands its open lock file to its engine child
(``engine --lock-fd N``). A flock belongs to the open file description, which
a child shares with its parent, so the child holds the same lock rather than
fighting it; and the lock stays held until the child has exited too, so an
engine still finishing its step after ``run`` was killed keeps a new daemon out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fixative.daemon.files import make_private_file, make_private_folder

LOCK_FILE = "daemon.lock"
# sysexits.h EX_TEMPFAIL: not an error in this process, and it would work once
# the other daemon stops. The unit lists it in RestartPreventExitStatus, so a
# service started beside a daemon in a terminal stops instead of retrying forever.
EXIT_ALREADY_RUNNING = 75


class AlreadyRunning(Exception):
    """Another process holds the state folder's lock."""

    def __init__(self, state_dir: Path, holder: str):
        self.state_dir, self.holder = state_dir, holder
        super().__init__(
            f"the state folder {state_dir} is in use by {holder}: only one daemon may use it. "
            "Stop that one first (`systemctl --user stop fixative`, or Ctrl-C where it runs), "
            "or give this one a state_dir of its own."
        )


@contextlib.contextmanager
def hold(state_dir: Path, role: str, *, inherited_fd: int | None = None) -> Iterator[int]:
    """Hold the lock while the block runs; yields the lock file's descriptor.

    ``role`` ("run", "watch" or "engine") is recorded for the refusal message.
    ``inherited_fd`` is the descriptor ``fixative run`` passed to its engine
    child: it must be this state folder's lock file, and it is not rewritten
    (the refusal should name ``run``, the process a person stops).
    """
    path = state_dir / LOCK_FILE
    if inherited_fd is None:
        make_private_folder(state_dir)
        make_private_file(path)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    else:
        fd = inherited_fd
        if not _same_file(fd, path):
            raise AlreadyRunning(state_dir, f"another process (descriptor {fd} is not {path})")
    try:
        try:
            # On the parent's own open file this succeeds at once: it holds the lock already.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(state_dir, _holder(fd)) from None
        if inherited_fd is None:
            _record(fd, role)
        yield fd
    finally:
        os.close(fd)  # releases the lock, unless a child still has the file open


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, theirs = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _record(fd: int, role: str) -> None:
    # Best effort: on a full disk even these few bytes fail, and the lock,
    # which needs no space, is what matters. The refusal then says "pid unknown".
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)


def _holder(fd: int) -> str:
    """'fixative run (pid 123)', from what the holder recorded."""
    try:
        pid, role = os.pread(fd, 100, 0).decode().split()
        return f"fixative {role} (pid {int(pid)})"
    except (OSError, ValueError):
        return "another fixative (pid unknown)"
