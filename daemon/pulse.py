"""The worker's liveness thread: leases renewed, progress recorded, a beat for ``fixative status``, systemd's watchdog.

A thread of its own, because the main loop spends minutes inside one PGD run
and the job table must still hear from this process every few seconds. It is
also the one place that decides whether the loop *moves*: a hung GPU driver
must look dead, not busy. And it warns when the leases cannot hold: a clock
that disagrees with the database server's, a lease found expired on renewal.
"""

from __future__ import annotations

import threading
import time

import structlog

from fixative.daemon.liveness import LOADING_STATUS, STALLED_AFTER_SECONDS
from fixative.daemon.notify import notify, watchdog_interval
from fixative.daemon.settings import Settings
from fixative.daemon.store import LEASE_EXPIRED, Job, JobStore, StoreUnavailable, skew_problem
from fixative.daemon.store_wait import StoreWait

log = structlog.get_logger()


class Pulse(threading.Thread):
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
        self.store_wait = StoreWait("engine")

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

    def waiting(self) -> list[Job]:
        """The jobs held whose group has not started."""
        running = {job.id for job in self.running}
        return [job for job in self.held.values() if job.id not in running]

    def start_group(self, jobs: list[Job]) -> bool:
        """``jobs`` are being protected from now on; their progress (step 0) is recorded at once, not at the next beat.

        From the main loop, before the first step: that progress is what tells
        the group that was running from the waiting ones if the engine dies
        during that step (``JobStore.release_owner``). True if the jobs are all still ours.
        """
        self.running, self.step, self.total = jobs, None, None
        self.group_started = time.time()
        self.progressed(f"protecting {job_names(jobs)}")
        return self.store.start_group([job.id for job in jobs], self.owner, self.lease)

    def run(self) -> None:
        while not self.quit.is_set():
            try:
                self.pulse()
                self.store_wait.resumed()
            except StoreUnavailable as error:
                # The lease cannot be renewed. Should this outlast it while other machines
                # still reach the database, one of them takes the job, and the owner guard
                # keeps this engine's late writes out.
                self.store_wait.waiting(error)
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
            renewed = self.store.heartbeat(job.id, self.owner, self.lease, *((step, total) if mine else (None, None)))
            if not renewed and job.id not in self.lost:
                self.lost.add(job.id)
                self.tell_why_lost(job)
        if running and total:
            status = f"protecting {job_names(running)} {100 * (step or 0) // total}%"
        status += f" · {self.store.counts()['queued']} queued"
        progress_at = time.time() if self.loading else self.last_progress
        self.store.beat(self.name, status, progress_at=progress_at, device=self.device)
        moving = time.time() - progress_at < STALLED_AFTER_SECONDS
        if not moving:
            log.warning("engine.stalled", seconds=round(time.time() - progress_at), status=status)
        notify(f"STATUS={status}", *(["WATCHDOG=1"] if self.watchdog and moving else []))

    def check_clock(self) -> None:
        """Warn if this machine's clock disagrees with the database server's, as ``fixative doctor`` does; at start.

        Leases are expiry times: an engine whose clock is behind writes leases
        that the others find expired, and loses every job it starts.
        """
        try:
            skew = self.store.clock_skew()
        except StoreUnavailable:
            return  # the worker's loop meets it again, and waits
        if (problem := skew_problem(skew)) is not None:
            log.warning("engine.clock_skew", skew_seconds=round(skew), problem=problem)

    def tell_why_lost(self, job: Job) -> None:
        """Warn when a renewal finds that the lease had expired: the job was queued again, or another engine took it.

        Superseded (new content, a hand-over) is no fault, nor is a job this
        engine ended just before the renewal. An expiry while this engine still
        worked on it is: its beats did not get through in time, or its clock is
        behind the others', which find every lease it writes already expired.
        """
        now = self.store.get(job.id)
        if now is not None and now.state != "superseded" and (now.error == LEASE_EXPIRED or now.engine != self.name):
            log.warning("engine.lease_expired", job_id=job.id, path=job.relative_path, state=now.state,
                        lease_seconds=self.lease,
                        problem="the job's lease expired while this engine worked on it, and it was queued again: "
                                "the job table did not hear from this engine in time, or this machine's clock is "
                                "behind the others' (fixative doctor compares them)")


def job_names(jobs: list[Job]) -> str:
    """'a.png', or 'a.png and 2 more' for a batch."""
    return jobs[0].relative_path + (f" and {len(jobs) - 1} more" if len(jobs) > 1 else "")
