"""The worker: the process behind ``fixative engine``, which owns the GPU and drains the job table.

Load the model once, then: claim a job, protect it, write the output
atomically, record the metrics, repeat. The store (:mod:`fixative.daemon.store`)
keeps work from being lost or done twice; :mod:`~fixative.daemon.placement`
chooses where the output goes, :mod:`~fixative.daemon.files` touches the
files, :mod:`~fixative.daemon.pulse` keeps the leases alive. This module
decides what each kind of failure means:

* the image's fault, for good (``EngineError.permanent``: not an image, a
  decompression bomb...): the job fails at once, with the engine's message;
* the image's fault, maybe not for good (an unexpected exception): retried
  after a growing backoff, and failed after ``max_attempts``, so a poison
  image cannot loop forever;
* out of memory: retried once (another program may have held the memory),
  and failed for good with the reason if it runs out again;
* an output that can never be written (a name over 255 bytes, a file inside
  the export folder in the way of its folder): failed for good, with the
  reason, before any GPU time;
* the machine's fault (export folder unwritable, disk full): the job goes back
  to the queue *without* using an attempt, ``fixative status`` shows why, and
  it waits out a pause that doubles while the fault lasts; the other jobs
  pass it meanwhile. Met again with nothing delivered since, the fault is
  everyone's, and the worker pauses too. The work resumes by itself once the
  folder is fixed;
* nobody's fault: the original changed since it was queued (a slow copy that
  paused longer than the settle time). The job is superseded, not failed; the
  watcher queues the new content once it settles. An original that is gone
  hands its job over to a copy under another name (a rename in the inbox), and
  fails without one.

Each job is protected with the options stored on its row when it was queued,
not with the config file as it reads now: the row's fingerprint must describe its output.

With ``[engine] batch_size`` above 1, the worker claims a job and up to
``batch_size - 1`` more of its fingerprint queued now (it never waits to fill a
batch), each under its own lease. Each original is read and decoded alone, and
fails alone; the rest are grouped by ``fixative.engine.protect.batch_key`` (one
working size) and each group is protected as one batch. Every policy above
applies to each job alone, except that a group of several that runs out of
memory is protected again one image at a time, without using an attempt. A job
that used an attempt before (``Job.retried``: its engine died, or it failed) is
claimed alone, and each group records its start before its first step, so that
a crash costs an attempt only to the group that was running
(``JobStore.release_owner``).

Importing this module does not import torch; :func:`run_worker` does, through
the engine, which turns running out of memory into ``OutOfMemory``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from fixative.daemon.files import MachineError, SourceChanged, SourceGone, read_queued
from fixative.daemon.liveness import daemon_id, engine_name, new_owner
from fixative.daemon.model_cache import ModelCache, job_options
from fixative.daemon.notify import notify
from fixative.daemon.placement import archive, choose_output, write_output
from fixative.daemon.pulse import Pulse
from fixative.daemon.settings import EX_CONFIG, Settings
from fixative.daemon.store import Job, JobStore, StoreUnavailable, open_store
from fixative.daemon.store_wait import RETRY_SECONDS, until_answered, until_written
from fixative.engine.errors import EngineError, OutOfMemory  # plain exceptions: no torch
from fixative.engine.options import EngineOptions

log = structlog.get_logger()

IDLE_POLL_SECONDS = 1.0  # how soon a queued file starts; one indexed query per poll
# On SIGTERM, a job this close to done is finished rather than thrown away; the
# unit's TimeoutStopSec (180 s) leaves room for it.
FINISH_ON_STOP_SECONDS = 60.0
MAX_PAUSE_SECONDS = 600.0  # longest wait between tries while the export folder is unusable


class _Stop(Exception):
    """Raised from the progress callback to abandon the current job."""


@dataclass
class _Ready:
    """A claimed job whose original was read, checked and decoded: it waits for its group's turn."""

    job: Job
    source: Any  # fixative.engine.imaging.SourceImage (the worker does not import the engine at module level)
    options: EngineOptions


class Worker:
    def __init__(self, settings: Settings, store: JobStore, stop: threading.Event, owner: str | None = None,
                 label: str | None = None):
        self.settings, self.store, self.stop = settings, store, stop
        # `fixative run` chooses the owner, so that it can release this engine's job the moment it sees it die.
        self.owner = owner or new_owner()
        self.name = engine_name(label or settings.engine.device, daemon_id(settings))
        self.pulse = Pulse(store, settings, self.owner, self.name)
        self.pause_seconds = settings.worker.retry_backoff_seconds
        self.machine_error: str | None = None  # the last one met by the jobs of this claim: pause after them
        self.models = ModelCache(self.pulse)
        self.model: Any = None  # fixative.engine.model.LoadedModel: the one the current claim's jobs use

    def run(self) -> int:
        from fixative.daemon.logs import adopt_library_loggers

        self.pulse.start()
        last_words = "stopped"
        try:
            self.pulse.check_clock()
            try:
                self.model = self.models.load(self.settings.engine)
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
        if self.settings.batch_size > 1 and job.fingerprint is not None and not job.retried:
            jobs += self.store.claim_more(self.owner, lease, job.fingerprint, self.settings.batch_size - 1,
                                          engine=self.name)
        self.handle(jobs)

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
            if self.pause_seconds > self.settings.worker.retry_backoff_seconds:
                # Met before, and no image delivered since (deliver() resets the pause): the machine's, not a job's.
                self.rest(self.pause_seconds, f"waiting {self.pause_seconds:.0f}s: {self.machine_error}")
            self.pause_seconds = min(self.pause_seconds * 2, MAX_PAUSE_SECONDS)

    def groups(self, ready: list[_Ready]) -> list[list[_Ready]]:
        """The jobs that can share a batch: images of one size (``fixative.engine.protect.batch_key``).

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
        # Before the first step: should this group kill the engine, it alone pays the attempt (JobStore.release_owner).
        until_written(lambda: self.pulse.start_group(jobs), None, stop=self.stop, pause=self.wait_for_store)
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
        elif isinstance(error, SourceGone):
            self.gone(job, error)
        elif isinstance(error, OutOfMemory):
            # Once more at most: a 100-megapixel image that runs out every time must not block the queue max_attempts times.
            self.failed(job, str(error), permanent=job.attempts > 1)
        elif isinstance(error, EngineError):
            self.failed(job, str(error), permanent=error.permanent)
        elif isinstance(error, SourceChanged):
            self.store.supersede(job.id, self.owner, str(error))
            log.info("job.superseded", reason=str(error))
        elif isinstance(error, MachineError):
            # No "(will retry)" here: a queued job's error is shown as one that will be retried.
            self.store.release(job.id, self.owner, error=str(error), retry_after_seconds=self.pause_seconds)
            self.machine_error = str(error)
        else:  # a bug or a library failure: retried, but only max_attempts times
            log.error("engine.unexpected_error", exc_info=error)
            self.failed(job, f"{type(error).__name__}: {error}", permanent=False)

    def gone(self, job: Job, error: SourceGone) -> None:
        """The original was moved or deleted since it was queued: its copy under another name takes the job, if any."""
        heir = self.store.hand_over(job.id, self.owner, str(error))
        if heir is None:
            self.failed(job, str(error), permanent=True)
        else:
            log.info("job.handed_over", reason=str(error), to_job_id=heir.id, to_path=heir.relative_path)

    def release_waiting(self) -> None:
        """On a stop: give back at once every held job whose group has not started."""
        for job in self.pulse.waiting():
            with _about(job):
                self.settle(job, _Stop())

    def wait_for_store(self, error: StoreUnavailable) -> None:
        self.pulse.store_wait.waiting(error)
        self.rest(RETRY_SECONDS, f"waiting: {error}")

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
        data = read_queued(source, job.sha256, self.settings.inbox)  # decoded as read: nothing can be swapped in between
        options = job_options(self.settings, job)
        self.model = self.models.load(options)
        # Before minutes of GPU time, not after: a folder to write in, and a name that can be written.
        self.output_for(job, options)  # chosen for good after the protection (deliver)
        return _Ready(job, decode_image(data, str(source)), options)

    def output_for(self, job: Job, options: EngineOptions) -> Path:
        """Where ``job``'s output goes now (``placement.choose_output``), waiting out the job table."""
        return until_answered(lambda: choose_output(self.store, self.settings, job, options.format), stop=self.stop,
                              pause=self.wait_for_store)

    def deliver(self, ready: _Ready, protected: Any, *, batch: int, started: float) -> None:
        """Write a protected image (an ``fixative.engine.protect.Protected``), record it done, and archive its original.

        Every call to the job table here waits it out: minutes of work must not be lost to a blip.
        """
        job = ready.job
        # Chosen now, one job at a time, not before the batch ran: two jobs of one
        # batch (a.png and a.jpg) must not both find "a.png" free.
        output = self.output_for(job, ready.options)
        output_sha256 = hashlib.sha256(protected.data).hexdigest()
        if not until_written(lambda: self.store.plan_output(job.id, self.owner, output, output_sha256), None,
                             stop=self.stop, pause=self.wait_for_store):
            self.pulse.lost.add(job.id)
            raise _Stop()
        write_output(job, output, protected.data)
        # batch: how many images were protected together (1: alone).
        metrics = {**protected.report, "batch": batch, "warnings": protected.warnings,
                   "output_bytes": len(protected.data)}
        self.pause_seconds = self.settings.worker.retry_backoff_seconds
        written = until_written(lambda: self.store.finish(job.id, self.owner, output, metrics),
                                lambda: self.finished_as(job, output), stop=self.stop, pause=self.wait_for_store)
        self.pulse.let_go(job)
        if not written:
            log.warning("engine.job_taken_over", output=str(output))
            return
        figures = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        log.info("job.done", **{**figures, "output": str(output), "job_seconds": round(time.monotonic() - started, 1)})
        if self.settings.after == "archive":
            until_answered(lambda: archive(self.store, self.settings, job), stop=self.stop, pause=self.wait_for_store)

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


def _about(job: Job) -> contextlib.AbstractContextManager[Any]:
    """Log lines within name the job they are about."""
    return structlog.contextvars.bound_contextvars(job_id=job.id, path=job.relative_path)


def run_worker(settings: Settings, stop: threading.Event, owner: str | None = None, label: str | None = None) -> int:
    """Run until ``stop`` is set; returns the exit status (0, or EX_CONFIG if the model cannot load).

    ``label``: what tells this engine apart on its machine (default: its device); see :func:`engine_name`.
    """
    store = open_store(settings)
    try:
        return Worker(settings, store, stop, owner, label).run()
    finally:
        store.close()
