"""Safe file I/O for originals and protected copies: read once, write atomically, never follow a swap.

No logging and no third-party imports: the job table imports this module, and
``fixative --help`` must stay light (tests/test_cli_commands.py).

Kept apart from the worker's loop so that every rule about touching the
artist's files is in one place, and so that ``fixative protect`` writes its
outputs exactly as the daemon does.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from fixative.engine.errors import BadImage  # a plain exception: no torch

OUTPUT_MODE = 0o644  # mkstemp makes files 0600; protected copies are meant to be shared


class MachineError(Exception):
    """A failure that is the machine's fault, not the image's; retried without using an attempt."""


class SourceChanged(Exception):
    """The original no longer holds the content that was queued: the job is stale, not failed."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # streamed: artwork can be hundreds of MB
            digest.update(chunk)
    return digest.hexdigest()


def read_source(path: Path) -> bytes:
    """The original's bytes, read once through one descriptor; BadImage if it is no longer a regular file.

    The watcher vetted the path when it queued it, but the file may have been
    swapped since. O_NOFOLLOW refuses a symlink put in its place (it could
    point outside the inbox), O_NONBLOCK keeps a FIFO from hanging the open,
    and fstat judges the file that was opened, not whatever the path names a
    moment later. Reading it whole lets the caller hash and decode the same
    bytes: checking by path and then reading by path again would leave a
    window to swap the file between the two.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadImage(f"{path} is gone: it was moved or deleted after it was queued") from None
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise BadImage(f"{path} is no longer a regular file: a symlink replaced it, and symlinks are not followed") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):  # swapped for a FIFO or a device since it was queued
            raise BadImage(f"{path} is no longer a regular file")
        return file.read()


def read_queued(path: Path, sha256: str, inbox: Path) -> bytes:
    """:func:`read_source`, checked against the content that was queued; SourceChanged if it is not that any more."""
    data = read_source(path)
    if hashlib.sha256(data).hexdigest() != sha256:
        then = ("the watcher queues its new content once it stops changing" if path.is_relative_to(inbox.resolve())
                else "`fixative enqueue` it again to protect its new content")
        raise SourceChanged(f"{path} changed after it was queued; {then}")
    return data


def check_writable(folder: Path, role: str = "export folder") -> None:
    """Create ``folder`` if needed and prove a file can be made in it; MachineError says why not, naming its ``role``.

    A real file, created and removed: permission bits alone are wrong on some
    network and FUSE file systems, and say nothing of a read-only mount.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError) as error:  # strerror would say "File exists": true, but unhelpful
        raise MachineError(f"cannot write in the {role} {folder}: a file is in the way "
                           f"where a folder should be") from error
    except OSError as error:
        raise MachineError(f"cannot write in the {role} {folder}: {error.strerror or error}") from error


def remove_temp_files(path: Path) -> list[Path]:
    """Remove what :func:`write_atomically` leaves for ``path`` when killed before its rename; what it removed.

    Only names of that exact pattern, and only for an output name reserved for
    the calling job, so nothing else can match.
    """
    removed = []
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            temp.unlink()
            removed.append(temp)
    return removed


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is either absent or complete, even across a power cut.

    A temp file in the same folder (so the rename cannot cross file systems),
    fsync, rename over, then fsync the folder so the rename itself is on disk.
    The temp name is hidden, so sync clients watching the export folder skip it.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, OUTPUT_MODE)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
