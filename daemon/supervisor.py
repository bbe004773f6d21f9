"""``fixative run``: the watcher in this process, the engine as a child it restarts.

This is what the systemd unit starts. Why two processes: the engine holds
gigabytes of model and talks to a GPU driver; when it crashes or is killed by
the OOM killer, the watcher must keep queueing files, and the engine comes
back on its own. Why not two units: one service is simpler to install and to
reason about for an artist.

Only this process talks to systemd (``NotifyAccess=main``): the engine child
gets no ``NOTIFY_SOCKET`` and reports through its heartbeat row in the job
table, which this loop reads to send READY (once the model is loaded),
STATUS (the engine's own line) and WATCHDOG (only when the engine's loop has
moved since the last ping and the watcher beats, so that the unit's
``WatchdogSec`` is the one stall limit; see ``daemon.status.STALLED_AFTER_SECONDS``).

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
from fixative.daemon.status import is_alive, is_healthy, looks_full
from fixative.daemon.store import JobStore, StoreUnavailable, open_store
from fixative.daemon.worker import LOADING_STATUS, new_owner

log = structlog.get_logger()

TICK_SECONDS = 1.0
# Restart backoff for an engine that keeps dying early (a broken driver):
# doubling from 5 s, at most 5 minutes, well inside the unit's WatchdogSec.
RESTART_MIN_SECONDS, RESTART_MAX_SECONDS = 5.0, 300.0
# An engine that ran this long before dying was working; restart it quickly.
HEALTHY_RUN_SECONDS = 600.0
# Waiting for the engine to finish or release its job on stop; the unit's
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
    """Supervise until ``stop`` is set or the watcher dies; returns the exit status.

    ``pass_fds``: descriptors the engine child inherits (the state folder's lock).
    """
    store = open_store(settings)
    watcher = _WatcherThread(settings)
    watcher.start()
    engine = _Engine(engine_command, store, pass_fds)
    ready = False
    last_status = ""
    ping_every = watchdog_interval()
    next_ping = 0.0
    pinged_progress = 0.0  # the engine's progress_at when we last pinged the watchdog
    try:
        while not stop.is_set():
            if not watcher.is_alive():
                log.error("run.watcher_stopped", exit_code=watcher.exit_code)
                return watcher.exit_code or 1
            code = engine.poll_and_restart(stop)
            if code == EX_CONFIG:
                return EX_CONFIG  # the engine logged why (model missing...); restarting cannot help
            try:
                beats, waiting = store.processes(), None
            except StoreUnavailable as error:  # the PostgreSQL job table is away; the store reconnects
                beats, waiting = {}, f"waiting: {error}; {error.remedy}"
            engine_beat = beats.get("engine")
            engine_fresh = is_alive(engine_beat) and engine_beat["pid"] == engine.pid
            # A full state disk, or a job database that is away, stops every heartbeat
            # while both loops wait (daemon.state_disk): say so, and keep systemd's
            # watchdog from restarting a daemon that is waiting, not hung.
            if waiting is None and looks_full(settings.state_dir):
                waiting = STATE_DISK_FULL_STATUS
            paused = code is None and waiting is not None
            if paused and last_status != waiting:
                last_status = waiting
                notify(f"STATUS={last_status}")
            elif engine_fresh and not paused:
                if not ready and not engine_beat["status"].startswith(LOADING_STATUS):
                    notify("READY=1")
                    ready = True
                if engine_beat["status"] != last_status:
                    last_status = engine_beat["status"]
                    notify(f"STATUS={last_status}")
            # Ping for progress, not for time: had it pinged every WatchdogSec/2 while the
            # engine counted as not stalled, a hang would be noticed after the stall
            # limit *plus* WatchdogSec (25 minutes with 900 s and 600 s).
            moved = (engine_fresh and engine_beat["progress_at"] > pinged_progress
                     and is_healthy(beats.get("watcher")))
            if ping_every and (moved or paused and time.monotonic() >= next_ping):
                notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping_every
                if moved:
                    pinged_progress = engine_beat["progress_at"]
            stop.wait(TICK_SECONDS)
        return 0
    finally:
        notify("STOPPING=1", "STATUS=stopping: letting the engine finish or release its job")
        watcher.stop.set()
        engine.terminate()
        watcher.join(timeout=30)
        store.close()


class _Engine:
    """The engine child process, restarted with a backoff when it dies.

    Each start gets a lease owner id of our choosing (``engine --owner``), so
    that when the child dies, its job goes back to the queue at once instead
    of looking "running" until its lease expires (300 s by default).
    """

    def __init__(self, command: list[str], store: JobStore, pass_fds: tuple[int, ...] = ()):
        self.command, self.store, self.pass_fds = command, store, pass_fds
        # The child must not notify systemd itself (NotifyAccess=main would
        # reject it and log a warning on every message).
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.quick_deaths = 0  # deaths in a row that came soon after a start
        self.start()

    def start(self) -> None:
        self.owner = new_owner()
        self.process = subprocess.Popen([*self.command, "--owner", self.owner], env=self.env,
                                        preexec_fn=_die_with_parent, pass_fds=self.pass_fds)
        self.started = time.monotonic()
        log.info("run.engine_started", pid=self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll_and_restart(self, stop: threading.Event) -> int | None:
        """If the engine died, restart it (after a backoff) and return its exit code; None if it runs."""
        code = self.process.poll()
        if code is None:
            return None
        if code == EX_CONFIG:
            log.error("run.engine_config_error", hint="see the engine's error above; fix it and restart")
            return code
        released = self.release_jobs(code)
        lived = time.monotonic() - self.started
        if lived > HEALTHY_RUN_SECONDS:
            self.quick_deaths = 0
        delay = min(RESTART_MIN_SECONDS * 2**self.quick_deaths, RESTART_MAX_SECONDS)
        self.quick_deaths += 1
        log.warning("run.engine_died", exit_code=code, lived_seconds=round(lived), restart_in_seconds=delay,
                    job_requeued=released)
        if not stop.wait(delay):
            self.start()
        return code

    def terminate(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=ENGINE_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.error("run.engine_kill", hint="did not stop in time; its job goes back to the queue")
            self.process.kill()
            self.release_jobs(self.process.wait())

    def release_jobs(self, code: int) -> bool:
        """Put the dead child's job back in the queue; True if it held one.

        Counted as an attempt, as when a lease expires: an image that kills
        the engine must still end as failed after max_attempts.
        """
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        try:
            return self.store.release_owner(self.owner, f"the engine died while working on it ({how})")
        except StoreUnavailable:
            return False  # then its lease expires, and the next claim queues it again
