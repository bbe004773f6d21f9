"""``fixative watch``: notice finished images in the inbox and queue each one once.

Three ideas, kept apart on purpose:

1. watchdog's observer thread calls :class:`_EventRecorder`, which only puts
   paths on a queue. Nothing there touches the disk or the database, because
   an exception escaping a handler kills the observer thread without a trace
   (watchdog issues 427, 663, 793, 829) and the daemon would go on looking
   alive while seeing nothing.
2. The main loop (:class:`_Watcher`) owns everything else: it feeds those
   paths to the :class:`~fixative.daemon.stability.StabilityTracker`, checks the files
   that settled, and writes them to the job table.
3. Events are hints, not the source of truth. The inbox is scanned at start
   (files that arrived while we were down) and every ``rescan_seconds``
   (events lost to an inotify overflow, a watch limit, a network share); the
   job table's (sha256, settings) uniqueness makes a rescan harmless.

This module must never import torch: the watcher starts in a second and stays
small. ``tests/test_watcher.py`` checks that in a fresh interpreter.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from contextlib import closing, suppress
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from fixative.daemon.inbox_filter import WatcherConfigError, check_folders, ignore_reason, refusal_reason, skip_folder
from fixative.daemon.settings import Settings
from fixative.daemon.stability import Settled, StabilityTracker
from fixative.daemon.liveness import daemon_id, watcher_name
from fixative.daemon.store import JobStore, StoreUnavailable, open_store
from fixative.daemon.store_wait import RETRY_SECONDS, StoreWait

__all__ = ["EXIT_OBSERVER_DIED", "WatcherConfigError", "run_watcher"]

log = structlog.get_logger()

# How often the main loop wakes up. Shorter only burns CPU; the stability delay
# dominates how soon a file is queued.
TICK_SECONDS = 0.5
# The watcher writes its heartbeat to the job table for `fixative status` at
# least this often, and also whenever its status text changes.
HEARTBEAT_SECONDS = 5.0
# Exit status when the observer thread has died: any non-zero status makes
# systemd's Restart=on-failure start a fresh watcher.
EXIT_OBSERVER_DIED = 1

# Events that can mean "a file arrived or grew". "moved" counts through its
# destination, so `x.part` -> `x.png` is an arrival. Deletions need no event:
# the tracker drops files that vanish. Open and close-without-write come from
# readers (thumbnailers, antivirus, our own engine), never from a new file.
_FILE_EVENTS = frozenset({"created", "modified", "closed", "moved"})
# For folders only a new one matters; a folder's "modified" fires on every
# file added to it, and the files have events of their own.
_FOLDER_EVENTS = frozenset({"created", "moved"})

_SYSCTL_FOR = {
    errno.ENOSPC: "fs.inotify.max_user_watches",
    errno.EMFILE: "fs.inotify.max_user_instances",
}


class _EventRecorder(FileSystemEventHandler):
    """Runs on watchdog's observer thread; records ``(path, is_folder)`` and nothing else."""

    def __init__(self, sink: queue.SimpleQueue[tuple[Path, bool]]) -> None:
        self._sink = sink

    def dispatch(self, event: FileSystemEvent) -> None:
        # Overriding dispatch() (not on_created & co.) puts every event behind
        # this one try. See the module docstring for why nothing may escape.
        try:
            wanted = _FOLDER_EVENTS if event.is_directory else _FILE_EVENTS
            if event.event_type not in wanted:
                return
            path = event.dest_path if event.event_type == "moved" else event.src_path
            self._sink.put((Path(os.fsdecode(path)), event.is_directory))
        except Exception:
            log.exception("watcher.event_dropped", fs_event=repr(event))


class _Watcher:
    """The main loop's state: what is settling and what is already handled."""

    def __init__(self, settings: Settings, store: JobStore, inbox: Path) -> None:
        self.inbox = inbox
        self.store = store
        self.name = watcher_name(daemon_id(settings))
        self.options = settings.engine  # stored on each job: the engine protects with these
        self.rescan_seconds = settings.watcher.rescan_seconds
        self.tick_seconds = min(TICK_SECONDS, settings.watcher.stability_seconds / 2)
        self.tracker = StabilityTracker(settings.watcher.stability_seconds)
        self.events: queue.SimpleQueue[tuple[Path, bool]] = queue.SimpleQueue()
        # path -> (size, mtime_ns) when it was queued or refused. NAS metadata
        # updates and antivirus scans make "modified"/"closed" events on files
        # we already handled; an unchanged stat means there is nothing new.
        # (The job table would dedupe them anyway, but only after hashing.)
        self.handled: dict[Path, tuple[int, int]] = {}
        self.recorded = 0  # files written to the job table since start, refusals included
        self.refused = 0
        self.store_wait = StoreWait("watcher")

    def run(self, observer: BaseObserver, stop: threading.Event) -> int:
        next_scan = next_beat = 0.0
        last_status = ""
        while not stop.is_set():
            if not _observer_alive(observer):
                log.error("watcher.observer_died", hint="exiting so that systemd restarts the watcher")
                return EXIT_OBSERVER_DIED
            now = time.monotonic()
            try:
                if now >= next_scan:
                    self.scan(self.inbox, now)
                    next_scan = now + self.rescan_seconds
                self.drain_events(now)
                for settled in self.tracker.ready(now):
                    self.admit(settled)
                status = self.status_text()
                if now >= next_beat or status != last_status:
                    self.store.beat(self.name, status)
                    next_beat, last_status = now + HEARTBEAT_SECONDS, status
            except StoreUnavailable as error:
                self.store_wait.waiting(error)
                # Files that settled meanwhile were not queued (nor marked handled):
                # rescan once writes work again rather than wait for the next rescan.
                next_scan = next_beat = 0.0
                stop.wait(RETRY_SECONDS)
                continue
            self.store_wait.resumed()
            stop.wait(self.tick_seconds)
        return 0

    def drain_events(self, now: float) -> None:
        while True:
            try:
                path, is_folder = self.events.get_nowait()
            except queue.Empty:
                return
            if is_folder:
                # Files written into a new folder before inotify's watch on it
                # exists produce no events at all; look inside instead.
                if not any(skip_folder(part) for part in path.relative_to(self.inbox).parts):
                    self.scan(path, now)
            elif ignore_reason(path, self.inbox) is None or _is_folder_link(path, self.inbox):
                self.tracker.touch(path, now)

    def scan(self, folder: Path, now: float) -> None:
        """Hand every candidate under ``folder`` that is not already handled to the tracker."""
        seen: set[Path] = set()
        # followlinks=False: a symlinked folder could lead anywhere, including
        # back into the inbox (an endless walk). Files listed include symlinks,
        # FIFOs and devices, so that they are refused with a reason.
        for dirpath, dirnames, filenames in os.walk(folder, onerror=_log_unreadable):
            dirnames[:] = [name for name in dirnames if not skip_folder(name)]
            # os.walk lists a symlinked folder among the folders and, without
            # followlinks, goes no further: it is refused like a symlinked file
            # instead, so that the artist sees why its images are not protected.
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                if ignore_reason(path, self.inbox) is not None and not _is_folder_link(path, self.inbox):
                    continue
                seen.add(path)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue  # gone since the listing
                if self.handled.get(path) != (st.st_size, st.st_mtime_ns):
                    self.tracker.touch(path, now)
        if folder == self.inbox:
            # Forget files that left the inbox, so months of traffic do not
            # grow this without bound.
            self.handled = {path: key for path, key in self.handled.items() if path in seen}

    def admit(self, settled: Settled) -> None:
        """Queue or refuse one settled file. Never raises: one bad file must not stop the watcher."""
        path = settled.path
        key = (settled.size, settled.mtime_ns)
        if self.handled.get(path) == key:
            return
        try:
            # Checked here, right before use, not when the event came: the
            # file may have been swapped for a symlink while it settled.
            reason = refusal_reason(path, self.inbox)
            if reason is not None:
                job = self.store.record_refusal(path, reason)
                self.refused += 1
                log.warning("watcher.refused", path=str(path), job_id=job.id, reason=reason)
            else:
                # The job's state says what happened: "queued" for new content,
                # "skipped" for a copy of known content, or the state of the
                # job this exact file already has (after a restart, say).
                job = self.store.enqueue(path, self.options, inbox=self.inbox)
                log.info("watcher.recorded", path=str(path), job_id=job.id, state=job.state)
            self.recorded += 1
        except FileNotFoundError:
            return  # removed or renamed between settling and now; its new name has its own event
        except StoreUnavailable:
            raise  # not this file's fault: the main loop waits for the job table, then rescans
        except Exception as error:
            # Not marked handled, so the next rescan tries again (a locked
            # database, a file we may not read yet).
            log.exception("watcher.admit_failed", path=str(path), error=str(error))
            return
        self.handled[path] = key

    def status_text(self) -> str:
        return (
            f"watching {self.inbox} · {len(self.tracker)} settling · "
            f"{self.recorded} recorded since start ({self.refused} refused)"
        )


def _is_folder_link(path: Path, inbox: Path) -> bool:
    """A symlink to a folder, not hidden or junk: its files are never read, so it is refused with a reason."""
    return os.path.islink(path) and os.path.isdir(path) and not any(
        skip_folder(part) for part in path.relative_to(inbox).parts)


def _log_unreadable(error: OSError) -> None:
    log.warning("watcher.folder_unreadable", path=error.filename, error=error.strerror)


def _observer_alive(observer: BaseObserver) -> bool:
    # The emitters are threads too (one per watch); one that dies stops events
    # from arriving just as surely as a dead observer.
    return observer.is_alive() and all(emitter.is_alive() for emitter in list(observer.emitters))


def _start_observer(settings: Settings, inbox: Path, handler: _EventRecorder, *, polling: bool) -> BaseObserver:
    if polling:
        observer: BaseObserver = PollingObserver(timeout=settings.watcher.poll_interval_seconds)
    else:
        observer = Observer()
    observer.schedule(handler, str(inbox), recursive=True)
    try:
        observer.start()
    except OSError as error:
        sysctl = _SYSCTL_FOR.get(error.errno)
        if polling or sysctl is None:
            raise
        # inotify needs one watch per folder, and the default limit is low on
        # older distributions. Polling is slower to notice files but works.
        # watchdog raises this only when the inbox itself cannot be watched: a
        # subfolder it cannot watch is skipped silently (observers/inotify.py,
        # _add_callback), and the periodic rescan is what finds files there.
        log.error(
            "watcher.inotify_limit",
            error=str(error),
            fix=f"raise {sysctl}: `echo {sysctl}=524288 | sudo tee /etc/sysctl.d/90-fixative.conf "
            f"&& sudo sysctl --system`, or set [watcher] polling = true",
            fallback="polling",
        )
        return _start_observer(settings, inbox, handler, polling=True)
    return observer


def _prepare_inbox(settings: Settings) -> Path:
    """Check the folders and create the inbox if needed; returns its resolved path."""
    check_folders(settings.inbox, settings.export_dir)
    try:
        # parents=False on purpose: if the inbox's parent is missing (an
        # unmounted share, a typo), creating a tree there would hide the problem.
        settings.inbox.mkdir(exist_ok=True)
    except (FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        raise WatcherConfigError(f"inbox: cannot use {settings.inbox} as a folder ({error.strerror})") from None
    return settings.inbox.resolve()


def run_watcher(settings: Settings, stop: threading.Event) -> int:
    """Watch the inbox until ``stop`` is set; returns the process exit status.

    0 after ``stop``; :data:`EXIT_OBSERVER_DIED` if watchdog's observer died.
    Raises :class:`WatcherConfigError` for a folder layout it must not run
    with (the CLI exits 78 on it).
    """
    inbox = _prepare_inbox(settings)
    with closing(open_store(settings)) as store:
        watcher = _Watcher(settings, store, inbox)
        observer = _start_observer(settings, inbox, _EventRecorder(watcher.events), polling=settings.watcher.polling)
        log.info("watcher.started", inbox=str(inbox), observer=type(observer).__name__)
        # The observer starts before the first scan, so a file arriving during
        # the scan is seen by one or the other, never by neither.
        try:
            return watcher.run(observer, stop)
        finally:
            observer.stop()
            observer.join(timeout=10)
            # `fixative status` then says "down" at once instead of after the
            # heartbeat goes stale. Suppressed: if the database is what failed,
            # that error is the one to report, not this one.
            with suppress(Exception):
                store.beat(watcher.name, "stopped")
            log.info("watcher.stopped")
