"""``fixative run``: the watcher in this process, one engine child per device, each restarted alone.

This is what the systemd unit starts. Why separate processes: an engine holds
gigabytes of model and talks to a GPU driver; when it crashes or is killed by
the OOM killer, the watcher must keep queueing files, the other engines keep
working, and the dead one comes back on its own. Why not one unit each: one
service is simpler to install and to reason about for an artist.

``[engine] devices`` lists the devices (default: one engine on ``[engine]
device``). Each child runs ``fixative engine --device D`` with an owner id of
its own, so its leases are its own: when it dies, its job, and only its job,
goes back to the queue at once.

Only this process talks to systemd (``NotifyAccess=main``): the children get
no ``NOTIFY_SOCKET`` and report through their heartbeat rows in the job table,
which this loop reads to send READY (once the first engine has loaded its
model), STATUS (the engines' own lines) and WATCHDOG. An engine whose loop has
not moved for the stall limit (the unit's ``WatchdogSec``, which is
``fixative.daemon.liveness.STALLED_AFTER_SECONDS``) is killed and restarted here, alone:
with several engines, a hung one must neither hide behind a healthy one nor
take it down with a restart of the whole service. The watchdog is pinged while
the watcher beats and no engine is past that limit, so systemd steps in only
when this loop itself, the watcher, or a kill fails.

This process never imports torch.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import subprocess
import threading
import time

import structlog

from fixative.daemon.inbox_filter import WatcherConfigError
from fixative.daemon.notify import notify, watchdog_interval
from fixative.daemon.settings import EX_CONFIG, Settings
from fixative.daemon.liveness import (LOADING_STATUS, STALLED_AFTER_SECONDS, daemon_id, engine_labels, engine_name,
                                      is_alive, is_healthy, new_owner, watcher_name)
from fixative.daemon.store import JobStore, StoreUnavailable, looks_full, open_store

log = structlog.get_logger()

TICK_SECONDS = 1.0
# Restart backoff for an engine that keeps dying early (a broken driver), each engine its own:
# doubling from 5 s, at most 5 minutes, well inside the unit's WatchdogSec.
RESTART_MIN_SECONDS, RESTART_MAX_SECONDS = 5.0, 300.0
# An engine that ran this long before dying was working; restart it quickly.
HEALTHY_RUN_SECONDS = 600.0
# Waiting for the engines to finish or release their jobs on stop; the unit's
# TimeoutStopSec (180 s) SIGKILLs everything shortly after.
ENGINE_STOP_SECONDS = 170.0
STATE_DISK_FULL_STATUS = "waiting: the state folder's disk is full; resumes by itself once there is space"


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent() -> None:
    """Runs in the engine child before exec: have the kernel SIGTERM it if `fixative run` dies.

    Under systemd the cgroup is cleaned up anyway, but a `fixative run` killed
    with SIGKILL in a terminal (or by a test) left an orphaned engine holding
    the GPU and the job table.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _WatcherThread(threading.Thread):
    def __init__(self, settings: Settings):
        super().__init__(name="watcher")
        self.settings = settings
        self.stop = threading.Event()
        self.exit_code: int | None = None

    def run(self) -> None:
        from fixative.daemon.watcher import run_watcher

        try:
            self.exit_code = run_watcher(self.settings, self.stop)
        except WatcherConfigError as error:
            log.error("watcher.config_error", error=str(error))
            self.exit_code = EX_CONFIG
        except Exception:
            log.exception("watcher.crashed")
            self.exit_code = 1


def run_daemon(settings: Settings, stop: threading.Event, engine_command: list[str],
               pass_fds: tuple[int, ...] = ()) -> int:
    """Supervise until ``stop`` is set, the watcher dies, or no engine can run; returns the exit status.

    ``engine_command``: ``fixative engine`` with the flags every child shares.
    ``pass_fds``: descriptors the engine children inherit (the state folder's lock).
    """
    store = open_store(settings)
    watcher = _WatcherThread(settings)
    watcher.start()
    daemon = daemon_id(settings)
    engines = [_WorkerChild(engine_command, label, engine_name(label, daemon), device, store, pass_fds)
               for label, device in zip(engine_labels(settings.devices), settings.devices)]
    ready = False
    last_status = ""
    ping_every = watchdog_interval()
    # The unit's WatchdogSec, equal to STALLED_AFTER_SECONDS (tests/test_systemd_unit.py);
    # read from systemd so that a test can shorten both together.
    stall_limit = 2 * ping_every if ping_every else STALLED_AFTER_SECONDS
    next_ping = 0.0
    try:
        while not stop.is_set():
            if not watcher.is_alive():
                log.error("run.watcher_stopped", exit_code=watcher.exit_code)
                return watcher.exit_code or 1
            try:
                beats, waiting = store.processes(), None
            except StoreUnavailable as error:  # the PostgreSQL job table is away; the store reconnects
                beats, waiting = {}, f"waiting: {error}; {error.remedy}"
            # A full state disk, or a job database that is away, stops every heartbeat
            # while the loops wait (fixative.daemon.store_wait): say so, and neither kill an engine
            # nor let systemd's watchdog restart a daemon that is waiting, not hung.
            if waiting is None and looks_full(settings):
                waiting = STATE_DISK_FULL_STATUS
            for engine in engines:
                engine.supervise(beats.get(engine.name), None if waiting else stall_limit)
            if all(engine.gave_up for engine in engines):
                return EX_CONFIG  # each logged why (model missing...); restarting cannot help
            live = [(engine, beat) for engine in engines
                    if (beat := beats.get(engine.name)) and beat["pid"] == engine.pid and is_alive(beat)]
            status = waiting or _status_line(live)
            if not ready and not waiting and any(not beat["status"].startswith(LOADING_STATUS) for _, beat in live):
                notify("READY=1")  # the first engine has loaded its model: work is being done
                ready = True
            if status and status != last_status:
                last_status = status
                notify(f"STATUS={status}")
            moving = is_healthy(beats.get(watcher_name(daemon))) and not any(e.stalled(stall_limit) for e in engines)
            if ping_every and (moving or waiting) and time.monotonic() >= next_ping:
                notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping_every
            stop.wait(TICK_SECONDS)
        return 0
    finally:
        notify("STOPPING=1", "STATUS=stopping: letting the engines finish or release their jobs")
        watcher.stop.set()
        _terminate(engines)
        watcher.join(timeout=30)
        store.close()


def _status_line(live: list[tuple[_WorkerChild, dict]]) -> str:
    if len(live) == 1:
        return live[0][1]["status"]
    return "; ".join(f"{engine.label}: {beat['status']}" for engine, beat in live)


def _terminate(engines: list[_WorkerChild]) -> None:
    """SIGTERM every engine at once, then wait for each (they finish or release their jobs in parallel)."""
    for engine in engines:
        engine.signal(signal.SIGTERM)
    deadline = time.monotonic() + ENGINE_STOP_SECONDS
    for engine in engines:
        engine.wait_or_kill(deadline)


class _WorkerChild:
    """One engine child on one device, restarted with a backoff of its own when it dies.

    Each start gets a lease owner id of our choosing (``engine --owner``), so
    that when the child dies, its job goes back to the queue at once instead
    of looking "running" until its lease expires (300 s by default). The
    backoff is a restart time, checked on each tick, never a wait: waiting in
    the loop would leave the other engines unsupervised meanwhile.
    """

    def __init__(self, command: list[str], label: str, name: str, device: str, store: JobStore,
                 pass_fds: tuple[int, ...] = ()):
        self.command = [*command, "--device", device, "--label", label]
        self.label, self.name = label, name
        self.store, self.pass_fds = store, pass_fds
        # The child must not notify systemd itself (NotifyAccess=main would
        # reject it and log a warning on every message).
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.quick_deaths = 0  # deaths in a row that came soon after a start
        self.restart_at: float | None = None
        self.gave_up = False  # exited with EX_CONFIG: not restarted
        self.killed_for: str | None = None  # why we killed it, for its job's error
        self.start()

    def start(self) -> None:
        self.owner = new_owner()
        self.process: subprocess.Popen | None = subprocess.Popen(
            [*self.command, "--owner", self.owner], env=self.env, preexec_fn=_die_with_parent, pass_fds=self.pass_fds)
        self.started, self.started_at = time.monotonic(), time.time()
        self.progress_seen = 0.0  # the latest progress_at of a beat of this child's own
        self.restart_at, self.killed_for = None, None
        log.info("run.engine_started", engine=self.label, pid=self.process.pid)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def supervise(self, beat: dict | None, stall_limit: float | None) -> None:
        """One tick: notice a death, kill a child stalled past ``stall_limit`` (None: judge none), restart when due."""
        if self.process is None:
            if self.restart_at is not None and time.monotonic() >= self.restart_at:
                self.start()
            return
        self.observe(beat)
        code = self.process.poll()
        if code is not None:
            self.died(code)
        elif stall_limit is not None and self.killed_for is None and self.stalled(stall_limit):
            # A step hung in a GPU driver: its heartbeat thread may beat on, its loop does not move.
            self.killed_for = f"it made no progress for {stall_limit:.0f} s, and was killed"
            log.error("run.engine_stalled", engine=self.label, pid=self.pid, seconds=round(stall_limit),
                      status=beat["status"] if beat else None)
            self.process.kill()

    def observe(self, beat: dict | None) -> None:
        """Note the progress ``beat`` shows, if it is this child's own.

        The row may hold another process's beat: this engine's previous life,
        or, should two daemons ever share a name, the other's. Its progress is
        never this child's, and neither is its absence: the child is judged by
        the last beat of its own that was seen.
        """
        if beat is not None and beat["pid"] == self.pid:
            self.progress_seen = max(self.progress_seen, beat["progress_at"])

    def stalled(self, stall_limit: float) -> bool:
        """Running, and its loop has shown no progress (in its own beats, or since its start) for ``stall_limit``."""
        if self.process is None:
            return False
        return time.time() - max(self.started_at, self.progress_seen) > stall_limit

    def died(self, code: int) -> None:
        self.process = None
        if code == EX_CONFIG:
            # A device that does not exist, a model that cannot load: a restart cannot
            # fix it. Only this engine stops (its beat says why, for status): a missing
            # second GPU must not stop the first. run_daemon exits once all have stopped.
            self.gave_up = True
            log.error("run.engine_config_error", engine=self.label,
                      hint="see the engine's error above; fix it and restart")
            return
        released = self.release_jobs(code)
        lived = time.monotonic() - self.started
        if lived > HEALTHY_RUN_SECONDS:
            self.quick_deaths = 0
        delay = min(RESTART_MIN_SECONDS * 2**self.quick_deaths, RESTART_MAX_SECONDS)
        self.quick_deaths += 1
        self.restart_at = time.monotonic() + delay
        log.warning("run.engine_died", engine=self.label, exit_code=code, lived_seconds=round(lived),
                    restart_in_seconds=delay, job_requeued=released)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait_or_kill(self, deadline: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            log.error("run.engine_kill", engine=self.label, hint="did not stop in time; its job goes back to the queue")
            self.process.kill()
            self.release_jobs(self.process.wait())

    def release_jobs(self, code: int) -> bool:
        """Put the dead child's job back in the queue; True if it held one.

        Counted as an attempt, as when a lease expires: an image that kills
        the engine must still end as failed after max_attempts.
        """
        how = self.killed_for or (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
        try:
            return self.store.release_owner(self.owner, f"the engine died while working on it ({how})")
        except StoreUnavailable:
            return False  # then its lease expires, and the next claim queues it again
