"""Where a protected copy goes, which names it may take, and where an archived original goes.

The rules that keep the export folder honest: the inbox's subfolders mirrored
under ``export_dir``; one current protected copy per original; never
overwriting another original's copy, an artist's own file, or anything in the
archive. They are decided from the job table and the file system together,
one job at a time, so two jobs of one batch cannot both take a free name.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path, PurePosixPath

import structlog

from fixative.daemon.files import (NAME_MAX, MachineError, SourceChanged, UnwritableName, check_writable,
                                   file_sha256, fits, read_queued, remove_temp_files, write_atomically)
from fixative.daemon.settings import Settings
from fixative.daemon.store import Job, JobStore
from fixative.engine.errors import BadImage  # a plain exception: no torch

log = structlog.get_logger()


def export_folder(settings: Settings, job: Job) -> Path:
    """The folder of ``job``'s output: the inbox's subfolders mirrored under ``export_dir``."""
    if job.output_path:
        return Path(job.output_path).parent
    return settings.export_dir.joinpath(*PurePosixPath(job.relative_path).parent.parts)


def choose_output(store: JobStore, settings: Settings, job: Job, fmt: str) -> Path:
    """Where this job's output in format ``fmt`` goes, in :func:`export_folder`, once that folder takes a file.

    A name planned by an earlier attempt of this job is reused, so a crash
    after the write leaves one file, not two. Otherwise the first name that
    :func:`may_write` allows: ``a.png``, then ``a-2.png``... What can never
    be written fails for good: UnwritableName once the names left are too
    long for any file system to hold, FolderBlocked (``files.check_writable``)
    for a file in the way of the folder.
    """
    from fixative.engine.imaging import OUTPUT_FORMATS  # numpy and PIL, not torch: only once a job needs them

    folder = export_folder(settings, job)
    check_writable(folder, within=settings.export_dir)
    if job.output_path:
        return Path(job.output_path)
    stem, suffix = PurePosixPath(job.relative_path).stem, OUTPUT_FORMATS[fmt]
    for n in range(1, 10_000):
        candidate = folder / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}"
        if not fits(candidate.name):
            taken = "" if n == 1 else " (the names before it are taken)"
            raise UnwritableName(f"the protected copy cannot be named {candidate.name}{taken}: that is "
                                 f"{len(os.fsencode(candidate.name))} bytes, and a file name may have at most "
                                 f"{NAME_MAX}; rename the original to a shorter name")
        if may_write(store, candidate, job):
            return candidate
    raise MachineError(f"no free file name for {stem}{suffix} in {folder}")


def may_write(store: JobStore, candidate: Path, job: Job) -> bool:
    """A free name, or the earlier output of this same source, as we wrote it.

    Replacing that one keeps one current protected copy per original when
    the settings or the original change, instead of a growing pile of
    ``-2``, ``-3``. Never replaced: another source's output (``a.png`` from
    ``a.jpg`` next to one from ``a.png``); an output whose original was
    archived (a new file under the same name is another picture); a file
    that is not what we wrote (the artist edited it, or put their own there).
    """
    holders = store.output_holders(candidate, job.id)
    if any(other.source_path != job.source_path or other.archived_to for other in holders):
        return False
    try:
        mode = os.lstat(candidate).st_mode
    except FileNotFoundError:
        return True  # free, or our earlier output that the artist deleted
    except OSError:
        return True  # the folder is unusable: files.check_writable reported why
    return stat.S_ISREG(mode) and file_sha256(candidate) in {other.output_sha256 for other in holders}


def write_output(job: Job, output: Path, data: bytes) -> None:
    """Write ``job``'s protected copy at ``output``, as chosen by :func:`choose_output`; MachineError if the disk refuses."""
    if job.output_path:  # an earlier attempt planned this name, and may have died mid-write
        for temp in remove_temp_files(output):
            log.info("engine.removed_temp_file", file=str(temp))
    try:
        write_atomically(output, data)
    except OSError as error:
        raise MachineError(f"cannot write {output}: {error.strerror or error}") from error


def archive(store: JobStore, settings: Settings, job: Job) -> None:
    """``after = "archive"``: move the original out of the inbox, never over another file."""
    source = Path(job.source_path)
    try:
        read_queued(source, job.sha256, settings.inbox)
        relative = PurePosixPath(job.relative_path)
        folder = settings.archive_dir.joinpath(*relative.parent.parts)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / relative.name
        n = 2
        while os.path.lexists(target):
            target = folder / f"{relative.stem}-{n}{relative.suffix}"
            n += 1
        # Recorded first: if we die mid-move, the worst case is a later file
        # of this name getting a `-2` output instead of replacing this one's.
        store.record_archive(job.id, target)
        shutil.move(source, target)  # a rename, or copy + delete across file systems
        log.info("engine.archived", to=str(target))
    except SourceChanged:
        log.info("engine.not_archived", reason="the original changed since it was queued")
    except BadImage as error:
        log.info("engine.not_archived", reason=str(error))
    except OSError as error:  # the protected copy is done; an archive failure only leaves the original in place
        store.record_archive(job.id, None)
        log.warning("engine.archive_failed", error=str(error))
