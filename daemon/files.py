"""Safe file I/O for originals and protected copies: read once, write atomically, never follow a swap.

And the modes of what fixative writes. Outputs are created as any program
creates a file (the umask, or the folder's default ACL), since they are meant
to be shared as the artist shares the rest of that folder; the state folder
and the job table, which hold every file name and error, are kept to their
owner whatever the umask.

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
import secrets
import stat
import tempfile
from pathlib import Path

from fixative.engine.errors import BadImage, EngineError  # plain exceptions: no torch

PRIVATE_FOLDER_MODE, PRIVATE_FILE_MODE = 0o700, 0o600
# What a new file asks for, as open() does for any program: the umask, or the
# folder's default ACL where it has one, takes away what the folder's owner wants.
NEW_FILE_MODE = 0o666
# The longest file name, in bytes, on the file systems outputs land on (ext4, XFS,
# Btrfs, APFS, NTFS and the NAS protocols all allow 255).
NAME_MAX = 255
# What a temp name adds to its prefix: 8 random hex digits, then ".tmp".
_TEMP_ADDED = 8 + len(".tmp")


class MachineError(Exception):
    """A failure that is the machine's fault, not the image's; retried without using an attempt."""


class SourceChanged(Exception):
    """The original no longer holds the content that was queued: the job is stale, not failed."""


class SourceGone(BadImage):
    """The original is no longer at its path: moved or deleted after it was queued.

    A rename inside the inbox leaves a copy of its content under the new name,
    which the job hands over to (``JobStore.hand_over``); anywhere else it is a
    bad image like any other that cannot be read.
    """


class UnwritableName(EngineError):
    """No name for the output can exist in its folder: longer than :data:`NAME_MAX`. Retrying cannot help."""


class FolderBlocked(EngineError):
    """A file inside the export folder is where the output's folder should be.

    Its job's alone (the other jobs' folders are free), and it lasts until
    someone moves the file: waiting cannot help, so the job fails, saying which file.
    """


def fits(name: str) -> bool:
    """Whether ``name`` can be a file name: at most :data:`NAME_MAX` bytes."""
    return len(os.fsencode(name)) <= NAME_MAX


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
        raise SourceGone(f"{path} is gone: it was moved or deleted after it was queued") from None
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


def check_writable(folder: Path, within: Path | None = None, role: str = "export folder") -> None:
    """Create ``folder`` if needed and prove a file can be made in it; MachineError says why not, naming its ``role``.

    A real file, created and removed: permission bits alone are wrong on some
    network and FUSE file systems, and say nothing of a read-only mount.
    ``within``: the export folder. A file in the way of a folder below it
    (``export/sub`` a file, for ``inbox/sub/a.png``) is FolderBlocked instead;
    the export folder itself a file is the machine's fault, as every job meets it.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError) as error:  # strerror would say "File exists": true, but unhelpful
        blocker = in_the_way(folder)
        if blocker is not None and within is not None and within in blocker.parents:
            raise FolderBlocked(f"cannot write in {folder}: the file {blocker} is in the way where a folder "
                                f"should be; move it, then run `fixative retry --failed`") from error
        raise MachineError(f"cannot write in the {role} {folder}: a file is in the way "
                           f"where a folder should be") from error
    except OSError as error:
        raise MachineError(f"cannot write in the {role} {folder}: {error.strerror or error}") from error


def in_the_way(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that exists and is not a folder (nor a link to one), if any."""
    for path in [*reversed(folder.parents), folder]:
        if os.path.lexists(path) and not path.is_dir():
            return path
    return None


def remove_temp_files(path: Path) -> list[Path]:
    """Remove what :func:`write_atomically` leaves for ``path`` when killed before its rename; what it removed.

    Only names of that exact pattern, and only for an output name reserved for
    the calling job, so nothing else can match.
    """
    removed = []
    for temp in path.parent.glob(f"{glob.escape(temp_prefix(path.name))}*.tmp"):
        with contextlib.suppress(OSError):
            temp.unlink()
            removed.append(temp)
    return removed


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is either absent or complete, even across a power cut.

    A temp file in the same folder (so the rename cannot cross file systems),
    fsync, rename over, then fsync the folder so the rename itself is on disk.
    The temp name is hidden, so sync clients watching the export folder skip it.
    The temp file is created new (O_EXCL, O_NOFOLLOW) and renamed over ``path``,
    so a symlink at ``path`` is replaced, never written through.
    """
    fd, temp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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


def temp_prefix(name: str) -> str:
    """How :func:`write_atomically`'s temp names for ``name`` start: ``.NAME.``, shortened where that would not fit.

    Any name that fits may be written, so a long one (up to NAME_MAX) keeps
    what fits of its start and a digest of the whole: still one prefix per
    name, so :func:`remove_temp_files` never takes another name's temp file.
    """
    prefix = f".{name}."
    if fits(prefix + "X" * _TEMP_ADDED):
        return prefix
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    room = NAME_MAX - _TEMP_ADDED - len(f".~{digest}.")
    start = os.fsencode(name)[:room].decode("utf-8", "ignore")  # never half a character
    return f".{start}~{digest}."


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """A new hidden file beside ``path`` (``.NAME.RANDOM.tmp``: :func:`temp_prefix`), open for writing, with the mode
    a new file gets there.

    Not mkstemp, which asks for 0600 and so leaves a folder's default ACL
    nothing to give. Created new (O_EXCL), never through a symlink (O_NOFOLLOW).
    """
    while True:
        temp = path.parent / f"{temp_prefix(path.name)}{secrets.token_hex(4)}.tmp"
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, NEW_FILE_MODE), temp
        except FileExistsError:  # another writer's temp file, by a one in four billion chance
            continue


def make_private_folder(folder: Path) -> None:
    """``folder``, created if missing (its parents as usual), made readable by its owner alone, whatever it was before."""
    folder.mkdir(mode=PRIVATE_FOLDER_MODE, parents=True, exist_ok=True)
    _chmod(folder, PRIVATE_FOLDER_MODE)


def make_private_file(path: Path, *, create: bool = True) -> None:
    """``path`` made readable by its owner alone; ``create``: if missing, created empty with that mode from the start."""
    if create:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE))
    _chmod(path, PRIVATE_FILE_MODE)


def _chmod(path: Path, mode: int) -> None:
    # Not worth stopping for: a file system that keeps no modes (a CIFS share)
    # refuses, as does another user's file, and a missing file has nothing to hide.
    with contextlib.suppress(OSError):
        os.chmod(path, mode)
