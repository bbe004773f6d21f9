"""The engine worker: where outputs go, what each failure means, stopping, archiving.

Most tests drive :class:`fixative.daemon.worker.Worker` in-process with stand-ins for
``fixative.engine.imaging.decode_image`` and ``fixative.engine.protect.protect_batch``, on a
real job table and real folders, so they run in milliseconds. ``tests/test_worker_process.py`` runs the real thing.
"""

from __future__ import annotations

import ast
import hashlib
import os
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fixative.daemon.worker
import fixative.engine.imaging
import fixative.engine.ensemble
import fixative.engine.protect
from fixative.daemon.settings import Settings
from fixative.daemon.status import build_report, render
from fixative.daemon.store import JobStore, StoreUnavailable
from fixative.daemon.files import remove_temp_files, temp_prefix, write_atomically
from fixative.daemon.worker import Worker
from fixative.engine.errors import BadImage, OutOfMemory
from fixative.engine.protect import Protected


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "inbox" / "sub").mkdir(parents=True)
    return Settings(inbox=tmp_path / "inbox", export_dir=tmp_path / "export", state_dir=tmp_path / "state",
                    archive_dir=tmp_path / "originals", worker={"retry_backoff_seconds": 30})


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore(settings.db_path)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the engine's load_protector (one model or an ensemble); lists the options of every load."""
    loads: list = []

    def fake(options):
        loads.append(options)
        return SimpleNamespace(device=torch.device("cpu"), options=options)

    monkeypatch.setattr(fixative.engine.ensemble, "load_protector", fake)
    return loads


@pytest.fixture
def worker(settings: Settings, store: JobStore, loads: list) -> Worker:
    engine = Worker(settings, store, threading.Event())
    engine.rest = lambda seconds, status: None  # no real pauses in tests
    return engine


@pytest.fixture
def protect(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the engine's decoding and protection; append an exception to make the next batch raise it."""
    raising: list = []

    def fake(sources: list, model, options, progress=None) -> list[Protected]:
        for step in (1, 2):
            progress(step, 2, 0.5)
        if raising:
            raise raising.pop(0)
        return [Protected(data=b"protected " + source.data, suffix=".png", report={"psnr": 40.0}) for source in sources]

    monkeypatch.setattr(fixative.engine.imaging, "decode_image", lambda data, name: SimpleNamespace(data=data))
    monkeypatch.setattr(fixative.engine.protect, "batch_key", lambda source, model: None)
    monkeypatch.setattr(fixative.engine.protect, "protect_batch", fake)
    return raising


def drop(settings: Settings, name: str, content: bytes) -> Path:
    path = settings.inbox / name
    path.write_bytes(content)
    return path


def run_one(worker: Worker, store: JobStore):
    job = store.claim(worker.owner, 60)
    worker.handle([job])
    return store.get(job.id)


def test_outputs_mirror_subfolders_and_never_overwrite(worker, store, settings, protect) -> None:
    unrelated = settings.export_dir / "sub" / "a.png"
    unrelated.parent.mkdir(parents=True)
    unrelated.write_bytes(b"the artist's own file")
    sources = [drop(settings, "sub/a.png", b"one"), drop(settings, "sub/a.jpg", b"two")]
    for source in sources:
        store.enqueue(source, settings.engine, inbox=settings.inbox)

    first, second = run_one(worker, store), run_one(worker, store)
    assert (first.state, second.state) == ("done", "done")
    assert first.output_path == str(settings.export_dir / "sub" / "a-2.png")
    assert second.output_path == str(settings.export_dir / "sub" / "a-3.png")
    assert Path(first.output_path).read_bytes() == b"protected one"
    assert unrelated.read_bytes() == b"the artist's own file"
    assert first.metrics["psnr"] == 40.0
    assert [p.read_bytes() for p in sources] == [b"one", b"two"]  # originals untouched
    assert not list(settings.export_dir.rglob(".*.tmp"))


def test_a_crash_after_writing_leaves_one_output(worker, store, settings, protect) -> None:
    store.enqueue(drop(settings, "a.png", b"one"), settings.engine, inbox=settings.inbox)
    job = store.claim("engine-that-died", lease_seconds=-1)
    planned = settings.export_dir / "a.png"
    store.plan_output(job.id, "engine-that-died", planned, hashlib.sha256(b"protected one").hexdigest())
    planned.parent.mkdir()
    planned.write_bytes(b"written just before the crash")
    # And a temp file of an attempt killed before its rename (write_atomically's name pattern).
    (settings.export_dir / ".a.png.k2j4h6g8.tmp").write_bytes(b"half a file")

    assert run_one(worker, store).output_path == str(planned)
    assert [p.name for p in settings.export_dir.iterdir()] == ["a.png"]
    assert planned.read_bytes() == b"protected one"


def test_unusable_export_folder_keeps_the_job_and_its_attempts(worker, store, settings, protect) -> None:
    settings.export_dir.write_text("a file where the export folder should be")
    store.enqueue(drop(settings, "a.png", b"one"), settings.engine, inbox=settings.inbox)

    job = run_one(worker, store)
    assert (job.state, job.attempts) == ("queued", 0)
    assert "cannot write in the export folder" in job.error
    assert store.failures()[0].id == job.id  # fixative status shows why, saying once that it will retry
    [line] = [line for line in render(build_report(settings)).splitlines() if "cannot write" in line]
    assert line.endswith("(will retry)") and line.count("(will retry)") == 1

    assert job.not_before > job.updated_at + 29  # put back for a while: the other jobs pass it meanwhile
    store.backend.execute("UPDATE jobs SET not_before = NULL", {})  # skip the pause

    settings.export_dir.unlink()  # the artist fixes it; the engine resumes by itself
    assert run_one(worker, store).state == "done"


def test_each_kind_of_failure(worker, store, settings, protect) -> None:
    for name in ("bad.png", "oom.png", "bug.png"):
        store.enqueue(drop(settings, name, name.encode()), settings.engine, inbox=settings.inbox)
    protect += [BadImage("not an image"), OutOfMemory("out of memory protecting..."), KeyError("surprise")]

    bad, oom, bug = (run_one(worker, store) for _ in range(3))
    assert (bad.state, bad.error) == ("failed", "not an image")
    assert (oom.state, oom.attempts, oom.error) == ("queued", 1, "out of memory protecting...")
    assert oom.not_before > oom.updated_at + 29  # backoff before the next attempt
    assert (bug.state, bug.error) == ("queued", "KeyError: 'surprise'")


def test_out_of_memory_again_fails_for_good(worker, store, settings, protect) -> None:
    """a 100-megapixel image ran out of memory after 10 minutes, and was retried, blocking the queue."""
    store.enqueue(drop(settings, "huge.png", b"huge"), settings.engine, inbox=settings.inbox)
    protect += [OutOfMemory("out of memory: once"), OutOfMemory("out of memory: again")]
    assert run_one(worker, store).state == "queued"  # the memory may have been another program's
    store.backend.execute("UPDATE jobs SET not_before = NULL", {})  # skip the backoff
    job = run_one(worker, store)
    assert (job.state, job.attempts, job.error) == ("failed", 2, "out of memory: again")


def test_the_worker_leaves_torch_to_the_engine() -> None:
    """Out of memory arrives as the engine's own error; the daemon never imports torch, not even to catch it."""
    tree = ast.parse(Path(fixative.daemon.worker.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "torch" not in imported


def test_stop_releases_a_long_job(worker, store, settings, protect, monkeypatch) -> None:
    store.enqueue(drop(settings, "a.png", b"one"), settings.engine, inbox=settings.inbox)
    monkeypatch.setattr("fixative.daemon.worker.FINISH_ON_STOP_SECONDS", -1)  # every job is "too long" to finish
    worker.stop.set()  # SIGTERM arrived
    job = run_one(worker, store)
    assert (job.state, job.attempts, job.error) == ("queued", 0, None)
    assert not settings.export_dir.exists() or not any(settings.export_dir.iterdir())


def test_stop_finishes_a_job_that_is_nearly_done(worker, store, settings, protect) -> None:
    store.enqueue(drop(settings, "a.png", b"one"), settings.engine, inbox=settings.inbox)
    worker.stop.set()
    assert run_one(worker, store).state == "done"


def test_source_changed_or_replaced_since_queued(worker, store, settings, protect) -> None:
    store.enqueue(drop(settings, "a.png", b"one"), settings.engine, inbox=settings.inbox)
    store.enqueue(drop(settings, "b.png", b"two"), settings.engine, inbox=settings.inbox)
    drop(settings, "a.png", b"edited")
    (settings.inbox / "b.png").unlink()
    (settings.inbox / "b.png").symlink_to("/etc/passwd")

    changed, replaced = run_one(worker, store), run_one(worker, store)
    # Not the image's fault: the new content gets a job of its own once it settles.
    assert changed.state == "superseded" and "changed after it was queued" in changed.error
    assert "the watcher queues its new content" in changed.error
    assert [job.id for job in store.failures()] == [replaced.id]
    assert replaced.state == "failed" and "no longer a regular file" in replaced.error


def test_archive_moves_originals_without_overwriting(worker, store, settings, protect) -> None:
    worker.settings = settings.model_copy(update={"after": "archive"})
    (settings.archive_dir / "sub").mkdir(parents=True)
    (settings.archive_dir / "sub" / "a.png").write_bytes(b"archived earlier")
    store.enqueue(drop(settings, "sub/a.png", b"one"), settings.engine, inbox=settings.inbox)

    assert run_one(worker, store).state == "done"
    assert not (settings.inbox / "sub" / "a.png").exists()
    assert (settings.archive_dir / "sub" / "a-2.png").read_bytes() == b"one"
    assert (settings.archive_dir / "sub" / "a.png").read_bytes() == b"archived earlier"


def test_a_finish_whose_answer_was_lost_but_that_landed_counts_as_ours(worker, store, settings, protect,
                                                                       monkeypatch) -> None:
    # A PostgreSQL COMMIT whose answer is lost with the connection may have landed
    # (daemon.store_postgres): injected here, as no real server loses it on cue.
    worker.settings = settings.model_copy(update={"after": "archive"})
    finish = store.finish

    def finish_then_lose_the_answer(*args):
        monkeypatch.setattr(store, "finish", finish)
        finish(*args)
        raise StoreUnavailable("the job database is unavailable: server closed the connection unexpectedly")

    monkeypatch.setattr(store, "finish", finish_then_lose_the_answer)
    store.enqueue(drop(settings, "a.png", b"one"), settings.engine, inbox=settings.inbox)
    assert run_one(worker, store).state == "done"
    # Taken for its own finish, not someone else's: the rest of the job (archiving) went on.
    assert (settings.archive_dir / "a.png").read_bytes() == b"one"


def test_write_atomically_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    write_atomically(target, b"first")
    write_atomically(target, b"second")
    assert target.read_bytes() == b"second"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


@pytest.mark.parametrize("name", ["x" * 251 + ".png", "é" * 125 + "x.png", "é" * 124 + "xy.png"])
def test_write_atomically_writes_any_name_a_file_can_have(tmp_path: Path, name: str) -> None:
    """Up to 255 bytes, multi-byte characters too; and what a killed write leaves of it is found again."""
    target = tmp_path / name
    write_atomically(target, b"protected")
    assert target.read_bytes() == b"protected" and [p.name for p in tmp_path.iterdir()] == [name]
    killed = tempfile.mkstemp(dir=tmp_path, prefix=temp_prefix(name), suffix=".tmp")[1]
    neighbour = tmp_path / (name[:-5] + "z.png")  # the same long start: its temp files are not this name's
    write_atomically(neighbour, b"other")
    other = tempfile.mkstemp(dir=tmp_path, prefix=temp_prefix(neighbour.name), suffix=".tmp")[1]
    assert remove_temp_files(target) == [Path(killed)] and Path(other).exists()


def default_acl(folder: Path, user: int, group: int, other: int) -> None:
    """Give ``folder`` a default ACL (as ``setfacl -d``), the way a shared NAS folder hands its files to a group."""
    entries = [(0x01, user), (0x04, group), (0x20, other)]  # ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER
    value = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries)
    try:
        os.setxattr(folder, "system.posix_acl_default", value)
    except OSError as error:
        pytest.skip(f"no POSIX ACLs on {folder}'s file system ({error.strerror})")


def test_outputs_are_created_as_the_export_folder_would_create_any_file(tmp_path: Path) -> None:
    """No mode of fixative's own: the umask decides, or the folder's default ACL where it has one."""
    shared = tmp_path / "shared"
    shared.mkdir()
    default_acl(shared, user=7, group=7, other=5)
    old = os.umask(0o077)  # an artist who keeps their files to themselves
    try:
        write_atomically(tmp_path / "private.png", b"mine")
        write_atomically(shared / "a.png", b"the group's")  # the ACL wins over the umask
        os.umask(0o002)  # a studio that shares through a group
        write_atomically(tmp_path / "group.png", b"ours")
    finally:
        os.umask(old)
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode))
             for path in (tmp_path / "private.png", shared / "a.png", tmp_path / "group.png")}
    assert modes == {"private.png": "0o600", "a.png": "0o664", "group.png": "0o664"}


def test_each_job_is_protected_with_the_settings_it_was_queued_with(worker, store, settings, protect, loads) -> None:
    # The config file changed between enqueue and claim (see also tests/test_worker_process.py).
    store.enqueue(drop(settings, "a.png", b"one"), settings.engine.model_copy(update={"format": "webp"}),
                  inbox=settings.inbox)
    store.enqueue(drop(settings, "b.png", b"two"), settings.engine.model_copy(update={"model": "/models/other"}),
                  inbox=settings.inbox)
    store.enqueue(drop(settings, "c.png", b"three"), settings.engine.model_copy(update={"model": "/models/other"}),
                  inbox=settings.inbox)

    a, b, c = (run_one(worker, store) for _ in range(3))
    assert a.output_path == str(settings.export_dir / "a.webp")
    assert [options.model for options in loads] == [settings.engine.model, "/models/other"]  # loaded once each
    assert (b.state, c.state) == ("done", "done")


def test_a_new_protection_of_the_same_source_replaces_its_earlier_output(worker, store, settings, protect) -> None:
    export = settings.export_dir
    store.enqueue(drop(settings, "a.png", b"one"), settings.engine, inbox=settings.inbox)
    store.enqueue(drop(settings, "a.jpg", b"jpeg"), settings.engine, inbox=settings.inbox)
    first, jpeg = run_one(worker, store), run_one(worker, store)
    assert (first.output_path, jpeg.output_path) == (str(export / "a.png"), str(export / "a-2.png"))

    # New settings, then an edited original: each time, one current copy under the same name.
    store.enqueue(settings.inbox / "a.png", settings.engine.model_copy(update={"steps": 7}), inbox=settings.inbox)
    assert run_one(worker, store).output_path == str(export / "a.png")
    store.enqueue(drop(settings, "a.png", b"two"), settings.engine, inbox=settings.inbox)
    assert run_one(worker, store).output_path == str(export / "a.png")
    assert (export / "a.png").read_bytes() == b"protected two"
    assert sorted(p.name for p in export.iterdir()) == ["a-2.png", "a.png"]
    assert store.get(first.id).state == "done"  # the history stays

    # An output the artist retouched is theirs now; one they deleted is written again.
    (export / "a.png").write_bytes(b"retouched by the artist")
    (export / "a-2.png").unlink()
    store.enqueue(drop(settings, "a.png", b"three"), settings.engine, inbox=settings.inbox)
    store.enqueue(drop(settings, "a.jpg", b"jpeg 2"), settings.engine, inbox=settings.inbox)
    assert run_one(worker, store).output_path == str(export / "a-3.png")  # a-2.png is a.jpg's
    assert run_one(worker, store).output_path == str(export / "a-2.png")
    assert (export / "a.png").read_bytes() == b"retouched by the artist"
    assert (export / "a-2.png").read_bytes() == b"protected jpeg 2"


def test_a_new_file_under_an_archived_ones_name_gets_its_own_output(worker, store, settings, protect) -> None:
    worker.settings = settings.model_copy(update={"after": "archive"})
    store.enqueue(drop(settings, "a.png", b"one"), settings.engine, inbox=settings.inbox)
    first = run_one(worker, store)
    assert first.archived_to == str(settings.archive_dir / "a.png")
    store.enqueue(drop(settings, "a.png", b"another picture"), settings.engine, inbox=settings.inbox)

    assert run_one(worker, store).output_path == str(settings.export_dir / "a-2.png")
    assert (settings.export_dir / "a.png").read_bytes() == b"protected one"


def test_an_output_that_a_copy_shares_is_not_replaced(worker, store, settings, protect) -> None:
    store.enqueue(drop(settings, "a.png", b"one"), settings.engine, inbox=settings.inbox)
    run_one(worker, store)
    copy = store.enqueue(drop(settings, "copy.png", b"one"), settings.engine, inbox=settings.inbox)
    assert copy.output_path == str(settings.export_dir / "a.png")
    store.enqueue(drop(settings, "a.png", b"edited"), settings.engine, inbox=settings.inbox)

    assert run_one(worker, store).output_path == str(settings.export_dir / "a-2.png")
    assert (settings.export_dir / "a.png").read_bytes() == b"protected one"  # still copy.png's protected copy


# Opens of watched paths, as the interpreter's audit hook sees them (os.open and open() both raise "open").
_OPEN_HOOKS: dict[str, Callable[[], None]] = {}


def _on_open(event: str, args: tuple) -> None:
    if event == "open" and _OPEN_HOOKS and isinstance(args[0], (str, Path)) and str(args[0]) in _OPEN_HOOKS:
        _OPEN_HOOKS[str(args[0])]()


sys.addaudithook(_on_open)  # audit hooks cannot be removed; it does nothing while _OPEN_HOOKS is empty


def test_a_symlink_swapped_in_after_the_check_is_never_read(worker, store, settings, protect, tmp_path) -> None:
    """The original is opened once: hashed and protected from the same bytes.

    Checked by path and then read by path again, a file replaced by a symlink in
    between (here: at the second open) had the symlink's target protected, a
    file outside the inbox the artist never dropped there.
    """
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"outside the inbox")
    source = drop(settings, "a.png", b"the artist's picture")
    store.enqueue(source, settings.engine, inbox=settings.inbox)
    opens: list[int] = []

    def swap_at_the_second_open() -> None:
        opens.append(1)
        if len(opens) == 2:
            source.unlink()
            source.symlink_to(secret)

    _OPEN_HOOKS[str(source)] = swap_at_the_second_open
    try:
        job = run_one(worker, store)
    finally:
        _OPEN_HOOKS.clear()
    assert len(opens) == 1
    assert job.state == "done"
    assert Path(job.output_path).read_bytes() == b"protected the artist's picture"


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_an_original_swapped_before_the_claim_is_refused(worker, store, settings, protect, tmp_path, kind) -> None:
    source = drop(settings, "a.png", b"the artist's picture")
    store.enqueue(source, settings.engine, inbox=settings.inbox)
    source.unlink()
    if kind == "symlink":
        (tmp_path / "elsewhere.png").write_bytes(b"the artist's picture")  # same bytes: only the type is wrong
        source.symlink_to(tmp_path / "elsewhere.png")
    else:
        os.mkfifo(source)  # an open without O_NONBLOCK would wait here for a writer, forever
    job = run_one(worker, store)
    assert job.state == "failed"
    assert job.error == f"{source} is no longer a regular file" + (
        ": a symlink replaced it, and symlinks are not followed" if kind == "symlink" else "")
    assert not settings.export_dir.exists() or not any(settings.export_dir.rglob("*"))
