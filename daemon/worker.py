"""``fixative engine``: the one process that owns the GPU and drains the job table.

Load the model once, then: claim a job, protect it, write the output
atomically, record the metrics, repeat. What keeps work from being lost or
done twice lives in ``daemon.store``; this module decides what each kind of
failure means:

* the image's fault, for good (``EngineError.permanent``: not an image, a
  decompression bomb...): the job fails at once, with the engine's message;
* the image's fault, maybe not for good (an unexpected exception): retried
  after a growing backoff, and failed after ``max_attempts``, so a poison
  image cannot loop forever;
* out of memory: retried once (another program may have held the memory),
  and failed for good with the reason if it runs out again;
* the machine's fault (export folder unwritable, disk full): the job goes back
  to the queue *without* using an attempt, the reason is shown by
  ``fixative status``, and the engine pauses before claiming again. Once the
  folder is fixed, the work resumes by itself;
* nobody's fault: the original changed since it was queued (a slow copy that
  paused longer than the settle time). The job is superseded, not failed; the
  watcher queues the new content once it settles.

Each job is protected with the engine options stored on its row when it was
queued, not with the config file as it reads now: the file may have been
edited since, and the row's fingerprint must describe its output.

With ``[engine] batch_size`` above 1, the engine claims a job and then up to
``batch_size - 1`` more queued now with the same fingerprint
(``JobStore.claim_more``; it never waits to fill a batch), each under its own
lease. Each original is read and decoded alone, and one that cannot be fails
or is superseded alone. The rest are grouped by ``engine.protect.batch_key``
(images of one working size) and each group is protected as one batch per PGD
step. Jobs whose group has not started stay leased, "running" on this engine
with no progress yet ("starting" in ``fixative status``). Every policy above
applies to each job alone, with one exception: a group of several that runs
out of memory is protected again one image at a time in the same cycle,
without using an attempt, since the batch, not the image, was too big.

A background :class:`_Pulse` thread renews every lease the engine holds,
records the running group's progress on each of its jobs and tells systemd we
are alive, but only while the main loop really advances: a hung GPU driver must
look dead, not busy.

Importing this module does not import torch; :func:`run_engine` does, through
the engine. The worker itself never touches torch: the engine turns running
out of memory into ``engine.errors.OutOfMemory`` and empties the GPU's cache.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from fixative.daemon.notify import notify, watchdog_interval
from fixative.daemon.settings import EX_CONFIG, Settings
from fixative.daemon.state_disk import RETRY_SECONDS, Pause
from fixative.daemon.status import STALLED_AFTER_SECONDS, engine_name
from fixative.daemon.store import Job, JobStore, StoreUnavailable, file_sha256, open_store
from fixative.engine.errors import BadImage, EngineError, OutOfMemory  # plain exceptions: no torch
from fixative.engine.options import EngineOptions

log = structlog.get_logger()

IDLE_POLL_SECONDS = 1.0  # how soon a queued file starts; one indexed query per poll
LOADING_STATUS = "loading model"  # `fixative run` sends READY once the engine's status moves past this
# On SIGTERM, a job this close to done is finished rather than thrown away; the
# unit's TimeoutStopSec (180 s) leaves room for it.
FINISH_ON_STOP_SECONDS = 60.0
MAX_PAUSE_SECONDS = 600.0  # longest wait between tries while the export folder is unusable
# The options that load_model builds into the model; a job queued with other
# values needs the model loaded again.
MODEL_OPTIONS = ("model", "device", "dtype", "low_vram", "prompt")
OUTPUT_MODE = 0o644  # mkstemp makes files 0600; protected copies are meant to be shared


class _Stop(Exception):
    """Raised from the progress callback to abandon the current job."""


class MachineError(Exception):
    """A failure that is the machine's fault, not the image's; retried without using an attempt."""


class _SourceChanged(Exception):
    """The original no longer holds the content that was queued: the job is stale, not failed."""


@dataclass
class _Ready:
    """A claimed job whose original was read, checked and decoded: it waits for its group's turn."""

    job: Job
    source: Any  # engine.imaging.SourceImage (the worker does not import the engine at module level)
    options: EngineOptions


class _Pulse(threading.Thread):
    """Renews the leases, records progress, beats for ``fixative status`` and pings systemd's watchdog.

    Lease and beat say "this process is alive", so they go on whatever the
    main loop does; a crash stops them and the lease expires. The watchdog
    ping says "the loop moves": it stops when the main loop has reported no
    progress (a PGD step, an idle poll) for ``STALLED_AFTER_SECONDS``, so
    systemd restarts an engine hung in a GPU driver. ``fixative status``
    shows the same judgement from the beat's ``progress_at``.
    """

    def __init__(self, store: JobStore, settings: Settings, owner: str, name: str):
        super().__init__(name="engine-pulse", daemon=True)
        self.store, self.owner, self.name = store, owner, name
        self.device = settings.engine.device
        self.lease = settings.worker.lease_seconds
        self.watchdog = watchdog_interval()  # None unless systemd set WatchdogSec
        self.interval = min(settings.worker.heartbeat_seconds, self.watchdog or float("inf"))
        # Replaced whole, never changed in place: this thread reads them while the main loop moves on.
        self.held: dict[int, Job] = {}  # every job this engine holds a lease on
        self.running: list[Job] = []  # the group being protected now; step and total are theirs
        self.group_started = 0.0
        self.step: int | None = None
        self.total: int | None = None
        self.status = LOADING_STATUS
        self.loading = True  # loading a model from a cold disk can take minutes; it is not a stall
        self.last_progress = time.time()
        self.lost: set[int] = set()  # jobs taken from us (superseded, or reclaimed after a lost lease)
        self.wake = threading.Event()
        self.quit = threading.Event()
        self.disk = Pause("engine")

    def progressed(self, status: str | None = None) -> None:
        self.last_progress = time.time()
        if status is not None and status != self.status:
            self.status = status
            self.wake.set()  # show a new state (ready, protecting x) now, not at the next heartbeat

    def hold(self, jobs: list[Job]) -> None:
        self.held = {job.id: job for job in jobs}
        self.running, self.lost = [], set()

    def let_go(self, job: Job) -> None:
        """``job`` ended one way or another (done, failed, released...): its lease is no longer ours to renew."""
        self.held = {job_id: held for job_id, held in self.held.items() if job_id != job.id}

    def start_group(self, jobs: list[Job]) -> None:
        self.running, self.step, self.total = jobs, None, None
        self.group_started = time.time()
        self.progressed(f"protecting {_names(jobs)}")

    def run(self) -> None:
        while not self.quit.is_set():
            try:
                self.pulse()
                self.disk.written()
            except StoreUnavailable as error:
                # The lease cannot be renewed. Should this outlast it while other machines
                # still reach the database, one of them takes the job, and the owner guard
                # keeps this engine's late writes out.
                self.disk.full(error)
            except Exception:  # a locked database must not silently end the heartbeats
                log.exception("engine.pulse_failed")
            self.wake.wait(self.interval)
            self.wake.clear()

    def pulse(self) -> None:
        held, running = self.held, self.running
        step, total = self.step, self.total
        status = self.status
        for job in held.values():
            # Jobs waiting for their group keep their lease, and no progress until it starts.
            mine = any(job.id == other.id for other in running)
            if not self.store.heartbeat(job.id, self.owner, self.lease, *((step, total) if mine else (None, None))):
                self.lost.add(job.id)
        if running and total:
            status = f"protecting {_names(running)} {100 * (step or 0) // total}%"
        status += f" · {self.store.counts()['queued']} queued"
        progress_at = time.time() if self.loading else self.last_progress
        self.store.beat(self.name, status, progress_at=progress_at, device=self.device)
        moving = time.time() - progress_at < STALLED_AFTER_SECONDS
        if not moving:
            log.warning("engine.stalled", seconds=round(time.time() - progress_at), status=status)
        notify(f"STATUS={status}", *(["WATCHDOG=1"] if self.watchdog and moving else []))


class Engine:
    def __init__(self, settings: Settings, store: JobStore, stop: threading.Event, owner: str | None = None,
                 label: str | None = None):
        self.settings, self.store, self.stop = settings, store, stop
        # Unique per process start: a restarted engine must not pass the owner
        # guard of jobs its previous life claimed. `fixative run` chooses it, so
        # that it can release this engine's job the moment it sees it die.
        self.owner = owner or new_owner()
        # Stable across restarts, unlike the owner: its heartbeat row, and its mark on the jobs it did.
        self.name = engine_name(label or settings.engine.device)
        self.pulse = _Pulse(store, settings, self.owner, self.name)
        self.pause_seconds = settings.worker.retry_backoff_seconds
        self.machine_error: str | None = None  # the last one met by the jobs of this claim: pause after them
        self.model: Any = None
        self.model_options: dict[str, Any] | None = None  # the MODEL_OPTIONS self.model was loaded with

    def run(self) -> int:
        from fixative.daemon.logs import adopt_library_loggers

        self.pulse.start()
        last_words = "stopped"
        try:
            try:
                self.load(self.settings.engine)
            except EngineError as error:
                # Missing model, pickle checkpoint, no GPU: a restart cannot fix
                # it, so exit as a config error and let systemd stop (status 78).
                log.error("engine.cannot_load_model", error=str(error))
                last_words = f"stopped: {error}"  # status shows why this engine is not working
                return EX_CONFIG
            adopt_library_loggers()  # diffusers/transformers installed their own handlers on import
            log.info("engine.ready", device=str(self.model.device), model=self.model.source)
            self.pulse.progressed("idle")
            notify("READY=1", "STATUS=idle")
            while not self.stop.is_set():
                try:
                    self.claim_and_handle()
                except StoreUnavailable as error:
                    # A job caught mid-way stays ours until its lease expires, then is queued again.
                    self.wait_for_store(error)
            return 0
        finally:
            self.pulse.quit.set()
            self.pulse.wake.set()
            self.pulse.join()
            with contextlib.suppress(StoreUnavailable):  # status then says "dead" a minute later instead
                self.store.beat(self.name, last_words, device=self.pulse.device)
            notify("STOPPING=1")

    def claim_and_handle(self) -> None:
        lease = self.settings.worker.lease_seconds
        job = self.store.claim(self.owner, lease, engine=self.name)
        if job is None:
            self.rest(IDLE_POLL_SECONDS, "idle")
            return
        jobs = [job]
        if self.settings.batch_size > 1 and job.fingerprint is not None:
            jobs += self.store.claim_more(self.owner, lease, job.fingerprint, self.settings.batch_size - 1,
                                          engine=self.name)
        self.handle(jobs)

    def load(self, options: EngineOptions) -> None:
        """Load the model for ``options``, unless the one loaded already fits them."""
        from fixative.engine.model import load_model

        wanted = {name: getattr(options, name) for name in MODEL_OPTIONS}
        if self.model is not None and wanted == self.model_options:
            return
        log.info("engine.loading_model", model=options.model)
        self.model = self.model_options = None  # free the old model first: two may not fit in memory
        self.pulse.loading = True  # minutes from a cold disk; not a stall
        try:
            self.model = load_model(options)
        finally:
            self.pulse.loading = False
            self.pulse.progressed()
        self.model_options = wanted

    def options_for(self, job: Job) -> EngineOptions:
        """The options ``job`` was queued with; the device is this engine's (it is not in the fingerprint)."""
        if job.options is None:  # queued before the job table kept options
            return self.settings.engine
        return EngineOptions.model_validate({**job.options, "device": self.settings.engine.device})

    def handle(self, jobs: list[Job]) -> None:
        """Protect claimed jobs (one claim's batch) and record how each ended. Never raises for a job's own failure.

        A StoreUnavailable leaves the jobs not yet recorded leased: they are
        queued again when their leases expire (run() waits for the table).
        """
        started = time.monotonic()
        self.pulse.hold(jobs)
        self.machine_error = None
        try:
            ready = []
            for job in jobs:
                with _about(job):
                    try:
                        ready.append(self.prepare(job))
                    except Exception as error:
                        self.settle(job, error)
            for number, group in enumerate(self.groups(ready)):
                if number and self.stop.is_set():  # the first group runs as a lone job would (FINISH_ON_STOP_SECONDS)
                    self.release_waiting()
                    break
                self.protect_group(group, started)
        finally:
            self.pulse.hold([])
        if self.machine_error is not None:
            # Once per claim, however many of its jobs met it: the folder is the same.
            log.warning("engine.machine_error", error=self.machine_error, pause_seconds=self.pause_seconds)
            self.rest(self.pause_seconds, f"waiting {self.pause_seconds:.0f}s: {self.machine_error}")
            self.pause_seconds = min(self.pause_seconds * 2, MAX_PAUSE_SECONDS)

    def groups(self, ready: list[_Ready]) -> list[list[_Ready]]:
        """The jobs that can share a batch: images of one size (``engine.protect.batch_key``).

        The options are one already: a claim's jobs share one fingerprint (``JobStore.claim_more``).
        """
        from fixative.engine.protect import batch_key

        groups: dict[Any, list[_Ready]] = {}
        for each in ready:
            groups.setdefault(batch_key(each.source, self.model), []).append(each)
        return list(groups.values())

    def protect_group(self, group: list[_Ready], started: float) -> None:
        """Protect ``group`` as one batch, then write and record each job alone."""
        from fixative.engine.protect import protect_batch

        group = [each for each in group if each.job.id in self.pulse.held]  # released on a stop, or taken over
        for each in group:
            if each.job.id in self.pulse.lost:
                self.settle(each.job, _Stop())
        group = [each for each in group if each.job.id not in self.pulse.lost]
        if not group:
            return
        jobs = [each.job for each in group]
        self.pulse.start_group(jobs)
        too_big: OutOfMemory | None = None
        try:
            with structlog.contextvars.bound_contextvars(job_ids=[job.id for job in jobs]):
                results = protect_batch([each.source for each in group], self.model, group[0].options,
                                        progress=self.on_progress)
        except OutOfMemory as error:
            too_big, results = (error, []) if len(group) > 1 else (None, [error])
        except Exception as error:  # one failure for the whole batch: each job's policy decides what it means
            results = [error] * len(group)
        finally:
            self.pulse.running = []
        if too_big is not None:
            # The batch was too big, not any of its images: each alone, in this cycle, on the attempt already counted.
            log.warning("engine.batch_out_of_memory", job_ids=[job.id for job in jobs], error=str(too_big))
            for each in group:
                self.protect_group([each], started)
            return
        for each, result in zip(group, results):
            with _about(each.job):
                if isinstance(result, BaseException):
                    self.settle(each.job, result)
                    continue
                try:
                    self.deliver(each, result, batch=len(group), started=started)
                except Exception as error:
                    self.settle(each.job, error)

    def settle(self, job: Job, error: BaseException) -> None:
        """Record how ``job`` failed, by what ``error`` means (the module docstring); StoreUnavailable is raised."""
        self.pulse.let_go(job)
        if isinstance(error, StoreUnavailable):
            raise error  # not the image's fault: run() waits for the job table
        if isinstance(error, _Stop):
            if job.id in self.pulse.lost:
                # Superseded by newer content, or reclaimed after a lost lease: the row is not ours.
                log.warning("engine.job_taken_over")
            else:
                self.store.release(job.id, self.owner)
                log.info("engine.job_released", reason="stopping")
        elif isinstance(error, OutOfMemory):
            # Issue 9: a 100-megapixel image that ran out of memory was retried, and blocked the queue, max_attempts times.
            self.failed(job, str(error), permanent=job.attempts > 1)
        elif isinstance(error, EngineError):
            self.failed(job, str(error), permanent=error.permanent)
        elif isinstance(error, _SourceChanged):
            self.store.supersede(job.id, self.owner, str(error))
            log.info("job.superseded", reason=str(error))
        elif isinstance(error, MachineError):
            # No "(will retry)" here: a queued job's error is shown as one that will be retried.
            self.store.release(job.id, self.owner, error=str(error))
            self.machine_error = str(error)
        else:  # a bug or a library failure: retried, but only max_attempts times
            log.error("engine.unexpected_error", exc_info=error)
            self.failed(job, f"{type(error).__name__}: {error}", permanent=False)

    def release_waiting(self) -> None:
        """On a stop: give back at once every held job whose group has not started."""
        running = {job.id for job in self.pulse.running}
        for job in [job for job in self.pulse.held.values() if job.id not in running]:
            with _about(job):
                self.settle(job, _Stop())

    def wait_for_store(self, error: StoreUnavailable) -> None:
        self.pulse.disk.full(error)
        self.rest(RETRY_SECONDS, f"waiting: {error}")

    def until_written(self, write: Callable[[], bool], landed: Callable[[], bool] | None = None) -> bool:
        """Record a protected image's output, waiting out a job table that is unavailable: minutes of work must not be lost.

        False if the job is no longer ours, or if we are asked to stop first
        (then the lease expires and the job is protected again). ``landed``:
        after a try that failed, whether it was written after all. A PostgreSQL
        COMMIT whose answer was lost with the connection may have landed, and
        then the retry's owner guard no longer matches.
        """
        interrupted = False
        while True:
            try:
                return write() or (interrupted and landed is not None and landed())
            except StoreUnavailable as error:
                if self.stop.is_set():
                    return False
                interrupted = True
                self.wait_for_store(error)

    def finished_as(self, job: Job, output: Path) -> bool:
        now = self.store.get(job.id)
        return now is not None and now.state == "done" and now.output_path == str(output)

    def rest(self, seconds: float, status: str) -> None:
        """Wait until ``stop``, telling the pulse that waiting is not being stuck."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self.pulse.progressed(status)
            self.stop.wait(min(IDLE_POLL_SECONDS, left))

    def failed(self, job: Job, error: str, *, permanent: bool) -> None:
        backoff = self.settings.worker.retry_backoff_seconds * 2 ** (job.attempts - 1)
        self.store.fail(job.id, self.owner, error, permanent=permanent, retry_after_seconds=backoff)
        log.warning("job.failed", error=error, permanent=permanent, attempt=job.attempts,
                    retry_in_seconds=None if permanent else backoff)

    def prepare(self, job: Job) -> _Ready:
        """Read, check and decode ``job``'s original, and make sure its output can be written, before any GPU time."""
        from fixative.engine.imaging import decode_image

        source = Path(job.source_path)
        data = _read_source(source)  # hashed and decoded as read: nothing can be swapped in between
        if hashlib.sha256(data).hexdigest() != job.sha256:
            inbox = self.settings.inbox.resolve()
            then = ("the watcher queues its new content once it stops changing" if source.is_relative_to(inbox)
                    else "`fixative enqueue` it again to protect its new content")
            raise _SourceChanged(f"{source} changed after it was queued; {then}")
        options = self.options_for(job)
        self.load(options)
        _check_writable(self.export_folder(job))  # before minutes of GPU time, not after
        return _Ready(job, decode_image(data, str(source)), options)

    def deliver(self, ready: _Ready, protected: Any, *, batch: int, started: float) -> None:
        """Write a protected image (an ``engine.protect.Protected``), record it done, and archive its original."""
        from fixative.engine.imaging import OUTPUT_FORMATS

        job = ready.job
        # Chosen now, one job at a time, not before the batch ran: two jobs of one
        # batch (a.png and a.jpg) must not both find "a.png" free.
        output = self.choose_output(job, OUTPUT_FORMATS[ready.options.format])
        output_sha256 = hashlib.sha256(protected.data).hexdigest()
        if not self.until_written(lambda: self.store.plan_output(job.id, self.owner, output, output_sha256)):
            self.pulse.lost.add(job.id)
            raise _Stop()
        if job.output_path:  # an earlier attempt planned this name, and may have died mid-write
            _remove_temp_files(output)
        try:
            write_atomically(output, protected.data)
        except OSError as error:
            raise MachineError(f"cannot write {output}: {error.strerror or error}") from error
        # batch: how many images were protected together (1: alone).
        metrics = {**protected.report, "batch": batch, "warnings": protected.warnings,
                   "output_bytes": len(protected.data)}
        self.pause_seconds = self.settings.worker.retry_backoff_seconds
        written = self.until_written(lambda: self.store.finish(job.id, self.owner, output, metrics),
                                     landed=lambda: self.finished_as(job, output))
        self.pulse.let_go(job)
        if not written:
            log.warning("engine.job_taken_over", output=str(output))
            return
        # The one summary line per job: the engine's scalar figures (PSNR, gain...) plus where it went.
        figures = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        log.info("job.done", **{**figures, "output": str(output), "job_seconds": round(time.monotonic() - started, 1)})
        if self.settings.after == "archive":
            self.archive(job)

    def on_progress(self, step: int, total: int, loss: float) -> None:
        """Called by the engine after every PGD step of the running group; raising here abandons the group."""
        self.pulse.step, self.pulse.total = step, total
        self.pulse.progressed()
        if all(job.id in self.pulse.lost for job in self.pulse.running):
            raise _Stop()
        if self.stop.is_set():
            self.release_waiting()  # at once, not after this group: another engine may take them now
            per_step = (time.time() - self.pulse.group_started) / max(step, 1)
            if per_step * (total - step) > FINISH_ON_STOP_SECONDS:
                raise _Stop()

    def export_folder(self, job: Job) -> Path:
        """The folder of ``job``'s output: the inbox's subfolders mirrored under ``export_dir``."""
        if job.output_path:
            return Path(job.output_path).parent
        return self.settings.export_dir.joinpath(*PurePosixPath(job.relative_path).parent.parts)

    def choose_output(self, job: Job, suffix: str) -> Path:
        """Where this job's output goes, in :meth:`export_folder`.

        A name planned by an earlier attempt of this job is reused, so a crash
        after the write leaves one file, not two. Otherwise the first name that
        :meth:`may_write` allows: ``a.png``, then ``a-2.png``...
        """
        if job.output_path:
            return Path(job.output_path)
        stem = PurePosixPath(job.relative_path).stem
        folder = self.export_folder(job)
        for n in range(1, 10_000):
            candidate = folder / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}"
            if self.may_write(candidate, job):
                return candidate
        raise MachineError(f"no free file name for {stem}{suffix} in {folder}")

    def may_write(self, candidate: Path, job: Job) -> bool:
        """A free name, or the earlier output of this same source, as we wrote it.

        Replacing that one keeps one current protected copy per original when
        the settings or the original change, instead of a growing pile of
        ``-2``, ``-3``. Never replaced: another source's output (``a.png`` from
        ``a.jpg`` next to one from ``a.png``); an output whose original was
        archived (a new file under the same name is another picture); a file
        that is not what we wrote (the artist edited it, or put their own there).
        """
        holders = self.store.output_holders(candidate, job.id)
        if any(other.source_path != job.source_path or other.archived_to for other in holders):
            return False
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            return True  # free, or our earlier output that the artist deleted
        except OSError:
            return True  # the folder is unusable: _check_writable reports why
        return stat.S_ISREG(mode) and file_sha256(candidate) in {other.output_sha256 for other in holders}

    def archive(self, job: Job) -> None:
        """``after = "archive"``: move the original out of the inbox, never over another file."""
        source = Path(job.source_path)
        try:
            if hashlib.sha256(_read_source(source)).hexdigest() != job.sha256:
                log.info("engine.not_archived", reason="the original changed since it was queued")
                return
            relative = PurePosixPath(job.relative_path)
            folder = self.settings.archive_dir.joinpath(*relative.parent.parts)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / relative.name
            n = 2
            while os.path.lexists(target):
                target = folder / f"{relative.stem}-{n}{relative.suffix}"
                n += 1
            # Recorded first: if we die mid-move, the worst case is a later file
            # of this name getting a `-2` output instead of replacing this one's.
            self.store.record_archive(job.id, target)
            shutil.move(source, target)  # a rename, or copy + delete across file systems
            log.info("engine.archived", to=str(target))
        except BadImage as error:
            log.info("engine.not_archived", reason=str(error))
        except OSError as error:  # the protected copy is done; an archive failure only leaves the original in place
            self.store.record_archive(job.id, None)
            log.warning("engine.archive_failed", error=str(error))


def _about(job: Job) -> contextlib.AbstractContextManager[Any]:
    """Log lines within name the job they are about."""
    return structlog.contextvars.bound_contextvars(job_id=job.id, path=job.relative_path)


def _names(jobs: list[Job]) -> str:
    """'a.png', or 'a.png and 2 more' for a batch."""
    return jobs[0].relative_path + (f" and {len(jobs) - 1} more" if len(jobs) > 1 else "")


def _read_source(path: Path) -> bytes:
    """The original's bytes, read once through one descriptor; BadImage if it is no longer a regular file.

    The watcher vetted the path when it queued it, but the file may have been
    swapped since. O_NOFOLLOW refuses a symlink put in its place (it could
    point outside the inbox), O_NONBLOCK keeps a FIFO from hanging the open,
    and fstat judges the file that was opened, not whatever the path names a
    moment later. Reading it whole lets the caller hash and decode the same
    bytes: checking by path and then reading by path again (as this did
    before) left a window to swap the file between the two.
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


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError) as error:  # strerror would say "File exists": true, but unhelpful
        raise MachineError(f"cannot write in the export folder {folder}: a file is in the way "
                           f"where a folder should be") from error
    except OSError as error:
        raise MachineError(f"cannot write in the export folder {folder}: {error.strerror or error}") from error


def _remove_temp_files(path: Path) -> None:
    """Remove what :func:`write_atomically` leaves for ``path`` when killed before its rename.

    Only names of that exact pattern, and only for an output name reserved for
    the calling job, so nothing else can match.
    """
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            temp.unlink()
            log.info("engine.removed_temp_file", file=str(temp))


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


def new_owner() -> str:
    """A lease owner id, unique per engine process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run_engine(settings: Settings, stop: threading.Event, owner: str | None = None, label: str | None = None) -> int:
    """Run until ``stop`` is set; returns the exit status (0, or EX_CONFIG if the model cannot load).

    ``label``: what tells this engine apart on its machine (default: its device); see :func:`engine_name`.
    """
    store = open_store(settings)
    try:
        return Engine(settings, store, stop, owner, label).run()
    finally:
        store.close()
