"""The watcher against real watchdog observers, real files and a real SQLite job table."""

import errno
import hashlib
import io
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog
from PIL import Image
from watchdog.events import FileClosedNoWriteEvent, FileCreatedEvent, FileDeletedEvent, FileMovedEvent
from watchdog.observers import Observer

from fixative.daemon import watcher
from fixative.daemon.settings import Settings
from fixative.daemon.liveness import watcher_name
from fixative.daemon.store import JobStore
from fixative.daemon.watcher import EXIT_OBSERVER_DIED, WatcherConfigError, _EventRecorder, run_watcher

STABILITY = 0.5


def png(seed: int) -> bytes:
    """A small valid PNG, different for every seed."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (seed % 256, seed // 256 % 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        inbox=tmp_path / "inbox",
        export_dir=tmp_path / "export",
        state_dir=tmp_path / "state",
        watcher={"stability_seconds": STABILITY, "rescan_seconds": 300, "poll_interval_seconds": 0.1},
    )


@pytest.fixture
def inbox(settings) -> Path:
    settings.inbox.mkdir()
    return settings.inbox.resolve()


@pytest.fixture
def store(settings):
    store = JobStore(settings.db_path)
    yield store
    store.close()


@contextmanager
def running(settings):
    """run_watcher in a thread; on exit, stop it and check it ended cleanly."""
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_watcher(settings, stop)), daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert result == [0]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


def sources(store) -> list[str]:
    return sorted(job.source_path for job in store.jobs(limit=10_000))


def test_a_file_written_slowly_is_queued_once_after_it_is_complete(settings, inbox, store):
    data = png(1) + b"\0" * 4000  # padded so that it takes five writes
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    target = inbox / "slow.png"
    with running(settings):
        with open(target, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                f.flush()
                # Longer than a tick, shorter than the stability delay: the
                # watcher looks at the half-written file several times.
                time.sleep(0.3)
        wait_for(lambda: store.jobs())
        time.sleep(2 * STABILITY)  # a second job would have appeared by now

    [job] = store.jobs()
    assert job.source_path == str(target)
    assert job.state == "queued"
    assert job.sha256 == hashlib.sha256(data).hexdigest()


def test_a_rename_into_place_is_an_arrival_and_stray_events_are_ignored(settings, inbox, store, monkeypatch):
    enqueued: list[Path] = []

    class CountingStore(JobStore):
        def enqueue(self, path, *args, **kwargs):
            enqueued.append(Path(path))
            return super().enqueue(path, *args, **kwargs)

    monkeypatch.setattr(watcher, "open_store", lambda settings: CountingStore(settings.db_path))
    with running(settings):
        (inbox / "x.part").write_bytes(png(2))
        time.sleep(3 * STABILITY)
        assert store.jobs() == []

        (inbox / "x.part").rename(inbox / "x.png")
        wait_for(lambda: sources(store) == [str(inbox / "x.png")])

        # A reader that opens for writing and closes again (some NAS indexers
        # and antivirus scanners do) changes nothing: no second look at the store.
        open(inbox / "x.png", "ab").close()
        time.sleep(3 * STABILITY)
    assert enqueued == [inbox / "x.png"]


def test_a_burst_of_200_files_is_queued_exactly_once_each(settings, inbox, store):
    with running(settings):
        for i in range(200):
            (inbox / f"burst-{i:03}.png").write_bytes(png(i))
        wait_for(lambda: len(store.jobs(limit=1000)) >= 200, timeout=20)
        time.sleep(2 * STABILITY)
        # `fixative status` shows what the watcher is doing, from its heartbeat.
        assert "200 recorded since start" in store.processes()[watcher_name()]["status"]

    jobs = store.jobs(limit=1000)
    assert sorted(job.source_path for job in jobs) == [str(inbox / f"burst-{i:03}.png") for i in range(200)]
    assert {job.state for job in jobs} == {"queued"}


def test_files_arriving_across_a_watcher_restart_are_queued_without_duplicates(settings, inbox, store):
    expected = [str(inbox / f"r-{i:02}.png") for i in range(40)]

    def arrive():
        for i in range(40):
            (inbox / f"r-{i:02}.png").write_bytes(png(1000 + i))
            time.sleep(0.05)

    writer = threading.Thread(target=arrive)
    with running(settings):
        writer.start()
        time.sleep(1.2)
    # Some files were queued by the first watcher, some were still settling
    # when it stopped; more arrive while it is down. The next one's startup
    # scan must find all of them and queue none twice.
    assert 0 < len(store.jobs()) < 40
    time.sleep(0.4)
    with running(settings):
        writer.join()
        wait_for(lambda: sources(store) == expected)
        time.sleep(2 * STABILITY)
    assert sources(store) == expected


def test_symlinks_out_of_the_inbox_and_fifos_are_refused_and_the_watcher_goes_on(settings, inbox, store, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(3))
    (inbox / "evil.png").symlink_to(secret)
    os.mkfifo(inbox / "pipe.png")
    (inbox / "good.png").write_bytes(png(4))

    with running(settings):
        wait_for(lambda: len(store.jobs()) == 3)
        (inbox / "later.png").write_bytes(png(5))
        wait_for(lambda: len(store.jobs()) == 4)

    jobs = {Path(job.source_path).name: job for job in store.jobs()}
    assert jobs["good.png"].state == jobs["later.png"].state == "queued"
    assert jobs["evil.png"].state == "failed"
    assert "symlink" in jobs["evil.png"].error
    assert jobs["pipe.png"].state == "failed"
    assert "FIFO" in jobs["pipe.png"].error


def test_a_symlinked_folder_is_refused_with_a_reason_not_ignored(settings, inbox, store, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.png").write_bytes(png(8))
    (inbox / "at-start").symlink_to(elsewhere, target_is_directory=True)
    with running(settings):
        wait_for(lambda: len(store.jobs()) == 1)  # found by the first scan
        (inbox / "later").symlink_to(elsewhere, target_is_directory=True)
        wait_for(lambda: len(store.jobs()) == 2)  # found by its event
        (inbox / ".hidden").symlink_to(elsewhere, target_is_directory=True)
        time.sleep(3 * STABILITY)

    assert sources(store) == [str(inbox / "at-start"), str(inbox / "later")]
    for job in store.jobs():
        assert job.state == "failed" and job.error.startswith("symlink to a folder"), job


def test_junk_is_ignored_and_subfolders_are_watched(settings, inbox, store, tmp_path):
    for junk in [".hidden.png", ".DS_Store", "._a.png", "Thumbs.db", "a.png.part", "a.png~", "notes.txt",
                 "@eaDir/x.png/SYNOFILE_THUMB_M.jpg", ".stfolder/x.png", ".Trash-1000/files/x.png"]:
        (inbox / junk).parent.mkdir(parents=True, exist_ok=True)
        (inbox / junk).write_bytes(png(6))
    (inbox / "old" / "deeper").mkdir(parents=True)
    (inbox / "old" / "deeper" / "a.png").write_bytes(png(7))

    # A folder moved in whole, the way a file manager drops a batch: only the
    # folder gets an event.
    batch = tmp_path / "batch"
    batch.mkdir()
    for i in range(3):
        (batch / f"b{i}.png").write_bytes(png(20 + i))

    with running(settings):
        wait_for(lambda: len(store.jobs()) == 1)
        batch.rename(inbox / "batch")
        (inbox / "new").mkdir()
        (inbox / "new" / "c.png").write_bytes(png(8))  # before inotify's watch on "new" may exist
        wait_for(lambda: len(store.jobs()) == 5)
        time.sleep(2 * STABILITY)

    assert sources(store) == sorted(
        str(inbox / p) for p in ["old/deeper/a.png", "batch/b0.png", "batch/b1.png", "batch/b2.png", "new/c.png"]
    )
    assert {job.relative_path for job in store.jobs()} >= {"old/deeper/a.png", "new/c.png"}


def test_the_periodic_rescan_finds_files_whose_events_were_lost(settings, inbox, store, monkeypatch):
    monkeypatch.setattr(_EventRecorder, "dispatch", lambda self, event: None)  # every event lost
    settings.watcher.rescan_seconds = 1
    with running(settings):
        time.sleep(0.2)  # after the startup scan
        (inbox / "missed.png").write_bytes(png(11))
        wait_for(lambda: sources(store) == [str(inbox / "missed.png")])


def test_polling_observer(settings, inbox, store):
    settings.watcher.polling = True
    with running(settings):
        (inbox / "polled.png").write_bytes(png(9))
        wait_for(lambda: sources(store) == [str(inbox / "polled.png")])
    assert store.processes()[watcher_name()]["status"] == "stopped"


def test_inotify_watch_limit_falls_back_to_polling_and_names_the_sysctl(settings, inbox, store, monkeypatch):
    class FullInotify(Observer):
        def start(self):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watcher, "Observer", FullInotify)
    with structlog.testing.capture_logs() as logs:
        # A fresh proxy, so that the capture applies even if logging was
        # configured with cache_logger_on_first_use earlier in the session.
        monkeypatch.setattr(watcher, "log", structlog.get_logger())
        with running(settings):
            (inbox / "a.png").write_bytes(png(10))
            wait_for(lambda: store.jobs())

    [limit] = [entry for entry in logs if entry["event"] == "watcher.inotify_limit"]
    assert "fs.inotify.max_user_watches" in limit["fix"]
    assert any(entry.get("observer") == "PollingObserver" for entry in logs)


def test_a_dead_observer_makes_the_watcher_exit_non_zero(settings, inbox, monkeypatch):
    class DyingObserver(Observer):
        def dispatch_events(self, event_queue):
            raise RuntimeError("simulated death of the observer thread")

    monkeypatch.setattr(watcher, "Observer", DyingObserver)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the death is expected; keep the output clean
    assert run_watcher(settings, threading.Event()) == EXIT_OBSERVER_DIED


def test_the_event_handler_never_raises_and_records_only_arrivals():
    recorded = []

    class Sink:
        def put(self, item):
            recorded.append(item)

    recorder = _EventRecorder(Sink())
    recorder.dispatch(FileCreatedEvent("/in/a.png"))
    recorder.dispatch(FileMovedEvent("/in/b.part", "/in/b.png"))
    recorder.dispatch(FileDeletedEvent("/in/c.png"))
    recorder.dispatch(FileClosedNoWriteEvent("/in/d.png"))
    assert recorded == [(Path("/in/a.png"), False), (Path("/in/b.png"), False)]

    class BrokenSink:
        def put(self, item):
            raise RuntimeError("boom")

    _EventRecorder(BrokenSink()).dispatch(FileCreatedEvent("/in/a.png"))  # does not raise


def test_refuses_to_start_when_the_folders_overlap(settings, tmp_path):
    settings.export_dir = settings.inbox / "protected"  # Settings validates this too; the watcher re-checks
    with pytest.raises(WatcherConfigError, match="inside the inbox"):
        run_watcher(settings, threading.Event())

    settings.export_dir = tmp_path / "export"
    settings.inbox = tmp_path / "export" / "inbox"
    with pytest.raises(WatcherConfigError, match="inside export_dir"):
        run_watcher(settings, threading.Event())


def test_refuses_an_inbox_whose_parent_is_missing(settings, tmp_path):
    settings.inbox = tmp_path / "unmounted-share" / "ToProtect"
    with pytest.raises(WatcherConfigError) as refused:
        run_watcher(settings, threading.Event())
    # The whole message: "inbox" alone would match any folder error, the overlap checks' included.
    assert str(refused.value) == f"inbox: cannot use {settings.inbox} as a folder (No such file or directory)"
    assert not settings.inbox.parent.exists()  # no tree created over an unmounted share's mount point


def test_the_watcher_never_imports_torch():
    code = "import sys, daemon.watcher; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
