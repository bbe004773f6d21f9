"""Which paths in the inbox the watcher may queue, and which it must refuse.

Two different questions, answered by two functions:

* :func:`ignore_reason` is *lexical*: it looks only at the name. Hidden files,
  half-downloaded files, OS junk and non-images are none of our business, so
  they are skipped silently (a debug log line at most) and never reach the
  job table.
* :func:`refusal_reason` asks the *filesystem*: is this really a regular file
  that lives inside the inbox? A path that looks like an image but is a
  symlink, a FIFO or a device is refused loudly and recorded in the job table
  with the reason, so the artist can see why it was not protected.

The watcher calls :func:`refusal_reason` right before it queues a file, not
when the event arrives: the file can be swapped for a symlink in between
(OCRmyPDF's watcher re-checks at the point of use for the same reason).

:func:`check_folders` is the startup check that the export folder and the
inbox do not overlap.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})

# Browsers, rsync, editors and copy tools write under a temporary name and
# rename when done. The rename is the arrival; the temp name never is.
TEMP_SUFFIXES = frozenset({".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", ".swp"})

# Files and folders that operating systems and sync tools sprinkle into shared
# folders. Compared case-insensitively: Windows and SMB shares do not care.
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "@eadir", "#recycle", "$recycle.bin", "system volume information"})


class WatcherConfigError(ValueError):
    """The folders are configured in a way the watcher must not run with.

    The CLI turns it into exit code 78 (EX_CONFIG), which the systemd unit lists
    in ``RestartPreventExitStatus`` so a bad config does not restart forever.
    """


def ignore_reason(path: Path, inbox: Path) -> str | None:
    """Why ``path`` is not a candidate for protection, or None if it is.

    Every component below the inbox is checked, so a file inside a hidden or
    junk folder (``.Trash-1000/a.png``, ``@eaDir/a.png/SYNOFILE_THUMB_M.jpg``)
    is skipped too. The inbox's own location may be hidden; that is fine.
    """
    try:
        parts = path.relative_to(inbox).parts
    except ValueError:
        return "outside the inbox"
    if not parts:
        return "the inbox itself"
    for part in parts:
        if reason := _name_reason(part):
            return reason
    name = parts[-1]
    if name.endswith("~"):
        return "editor backup (trailing ~)"
    suffix = Path(name).suffix.lower()
    if suffix in TEMP_SUFFIXES:
        return f"temporary or partial file ({suffix})"
    if suffix not in IMAGE_SUFFIXES:
        return f"not an image extension ({suffix or 'none'})"
    return None


def skip_folder(name: str) -> bool:
    """Whether a scan should not descend into a folder called ``name``.

    Saves walking a Synology ``@eaDir`` (thumbnails for every image) or a
    trash folder only to ignore everything in it.
    """
    return _name_reason(name) is not None


def _name_reason(name: str) -> str | None:
    # Covers .DS_Store, ._resource-forks (macOS on SMB/FAT), .stfolder
    # (Syncthing), .Trash-1000 (Linux desktops) and editors' .x.swp files.
    if name.startswith("."):
        return f"hidden: {name}"
    if name.casefold() in JUNK_NAMES:
        return f"OS or NAS junk: {name}"
    return None


_FILE_TYPES = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def refusal_reason(path: Path, inbox: Path) -> str | None:
    """Why ``path`` must not be read, or None if it is safe to queue.

    Uses ``os.lstat``, which does not follow symlinks: a symlink is refused
    rather than followed, because it could point at anything the user can read
    (``~/.ssh/id_ed25519.png -> ../.ssh/id_ed25519``) and the protected copy
    would then be published. FIFOs and devices are refused because opening one
    blocks forever or reads endlessly, which would hang the engine.

    The resolved path must stay inside the resolved inbox. This catches a
    regular file reached through a symlinked *folder* inside the inbox, which
    lstat of the file alone cannot see.

    Raises FileNotFoundError if the file is gone; the caller treats that as
    "nothing to do", not as a refusal.
    """
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        if path.is_dir():
            return "symlink to a folder: fixative does not follow links, so none of its images is protected"
        return "symlink: fixative does not follow links"
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_TYPES.items() if test(mode)), "not a regular file")
        return f"not a regular file: {kind}"
    resolved = path.resolve(strict=True)
    if not resolved.is_relative_to(inbox.resolve()):
        return f"resolves outside the inbox (to {resolved})"
    return None


def check_folders(inbox: Path, export_dir: Path) -> None:
    """Refuse folder layouts that would feed the daemon its own output.

    Export inside the inbox: every protected copy would be picked up and
    protected again, forever. Inbox inside the export folder: the engine
    mirrors the inbox's subfolders into the export folder, so a subfolder with
    the right name would land back in the inbox. Both paths are resolved, so a
    symlink cannot hide the overlap; neither has to exist yet.
    """
    inbox_r = inbox.expanduser().resolve()
    export_r = export_dir.expanduser().resolve()
    if export_r == inbox_r:
        raise WatcherConfigError(f"export_dir and inbox are the same folder ({inbox_r})")
    if export_r.is_relative_to(inbox_r):
        raise WatcherConfigError(
            f"export_dir ({export_r}) is inside the inbox ({inbox_r}): "
            "protected copies would be protected again in a loop; move it outside"
        )
    if inbox_r.is_relative_to(export_r):
        raise WatcherConfigError(
            f"inbox ({inbox_r}) is inside export_dir ({export_r}): "
            "mirrored subfolders could land back in the inbox; move it outside"
        )
