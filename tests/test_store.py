"""The job table, on real SQLite files: dedupe, leases, attempts, owner guards."""

from __future__ import annotations

import multiprocessing
import re
import time
import tomllib
from pathlib import Path

import pytest

from daemon.store import MIGRATIONS, STATES, JobStore


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    (folder / "sub").mkdir(parents=True)
    return folder


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "state" / "jobs.db", max_attempts=3)


def drop(inbox: Path, name: str, content: bytes = b"pixels") -> Path:
    path = inbox / name
    path.write_bytes(content)
    return path


def test_schema_is_versioned_and_wal(store: JobStore, tmp_path: Path) -> None:
    again = JobStore(store.path)  # a second process opening the same file
    assert again.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_enqueue_is_idempotent_per_path(store: JobStore, inbox: Path) -> None:
    path = drop(inbox, "sub/a.png")
    first = store.enqueue(path, "fp", inbox=inbox)
    assert first.state == "queued" and first.relative_path == "sub/a.png"
    assert store.enqueue(path, "fp", inbox=inbox).id == first.id  # the watcher's rescan
    assert store.counts()["queued"] == 1


def test_renamed_copy_is_skipped_and_shares_the_output(store: JobStore, inbox: Path) -> None:
    original = store.enqueue(drop(inbox, "a.png"), "fp", inbox=inbox)
    copy = store.enqueue(drop(inbox, "copy of a.png"), "fp", inbox=inbox)
    assert copy.state == "skipped" and copy.duplicate_of == original.id
    assert store.enqueue(inbox / "copy of a.png", "fp", inbox=inbox).id == copy.id  # no second skipped row

    job = store.claim("engine-1", 60)
    assert store.finish(job.id, "engine-1", "/export/a.png", {"psnr": 40.0})
    assert store.get(copy.id).output_path == "/export/a.png"
    assert store.enqueue(drop(inbox, "third.png"), "fp").output_path == "/export/a.png"


def test_changed_content_or_settings_make_new_jobs(store: JobStore, inbox: Path) -> None:
    path = drop(inbox, "a.png", b"v1")
    first = store.enqueue(path, "fp")
    assert store.enqueue(path, "other-settings").state == "queued"
    drop(inbox, "a.png", b"v2")
    assert store.enqueue(path, "fp").id != first.id
    assert store.counts()["queued"] == 3


def test_refusals_are_recorded_once(store: JobStore, inbox: Path) -> None:
    refused = store.record_refusal(inbox / "link.png", "symlink: refused")
    assert refused.state == "failed" and refused.sha256 is None
    assert store.record_refusal(inbox / "link.png", "symlink: refused").id == refused.id
    assert store.failures()[0].error == "symlink: refused"
    assert store.retry(all_failed=True) == 0  # nothing safe to process


def test_claim_finish_and_progress(store: JobStore, inbox: Path) -> None:
    queued = store.enqueue(drop(inbox, "a.png"), "fp")
    job = store.claim("engine-1", 60)
    assert (job.id, job.state, job.attempts, job.owner) == (queued.id, "running", 1, "engine-1")
    assert store.claim("engine-2", 60) is None
    assert store.heartbeat(job.id, "engine-1", 60, step=3, total=10)
    assert (store.running().progress_step, store.running().progress_total) == (3, 10)
    assert store.finish(job.id, "engine-1", "/export/a.png", {"gain": 1.4})
    done = store.get(job.id)
    assert done.state == "done" and done.metrics == {"gain": 1.4} and done.owner is None
    assert store.throughput()["done"] == 1


def test_expired_lease_is_requeued_and_the_old_owner_is_locked_out(store: JobStore, inbox: Path) -> None:
    store.enqueue(drop(inbox, "a.png"), "fp")
    lost = store.claim("killed-engine", lease_seconds=-1)  # already expired: the engine died
    job = store.claim("new-engine", 60)
    assert job.id == lost.id and job.attempts == 2
    # The old engine wakes up: none of its writes may land.
    assert not store.heartbeat(lost.id, "killed-engine", 60)
    assert not store.finish(lost.id, "killed-engine", "/export/stale.png", {})
    assert not store.fail(lost.id, "killed-engine", "late", permanent=True)
    assert store.get(job.id).owner == "new-engine"
    assert store.finish(job.id, "new-engine", "/export/a.png", {})


def test_poison_job_fails_after_max_attempts(store: JobStore, inbox: Path) -> None:
    store.enqueue(drop(inbox, "poison.png"), "fp")
    for _ in range(3):
        assert store.claim("engine", lease_seconds=-1) is not None  # engine crashes every time
    assert store.claim("engine", 60) is None
    failed = store.failures()[0]
    assert failed.state == "failed" and failed.attempts == 3
    assert failed.error.startswith("gave up after 3 attempts: lease expired")


def test_transient_failure_retries_after_backoff(store: JobStore, inbox: Path) -> None:
    store.enqueue(drop(inbox, "a.png"), "fp")
    job = store.claim("engine", 60)
    assert store.fail(job.id, "engine", "CUDA out of memory", permanent=False, retry_after_seconds=0.3)
    assert store.get(job.id).state == "queued"
    assert store.claim("engine", 60) is None  # still backing off
    time.sleep(0.35)
    again = store.claim("engine", 60)
    assert again.id == job.id and again.attempts == 2
    assert store.fail(again.id, "engine", "disk full", permanent=False)
    assert store.claim("engine", 60).attempts == 3
    assert store.fail(again.id, "engine", "disk full", permanent=False)
    assert store.claim("engine", 60) is None
    assert store.get(job.id).error == "gave up after 3 attempts: disk full"


def test_permanent_failure_and_retry(store: JobStore, inbox: Path) -> None:
    a = store.enqueue(drop(inbox, "a.png", b"a"), "fp")
    b = store.enqueue(drop(inbox, "b.png", b"b"), "fp")
    for _ in range(2):
        job = store.claim("engine", 60)
        assert store.fail(job.id, "engine", "not an image", permanent=True)
    assert store.counts()["failed"] == 2
    assert store.retry(a.id) == 1
    assert store.get(a.id).state == "queued" and store.get(a.id).attempts == 0
    assert store.retry(a.id) == 0  # not failed any more
    assert store.retry(all_failed=True) == 1
    assert store.get(b.id).state == "queued"


def test_release_does_not_count_the_attempt(store: JobStore, inbox: Path) -> None:
    store.enqueue(drop(inbox, "a.png"), "fp")
    job = store.claim("engine", 60)
    assert store.release(job.id, "engine")
    assert store.get(job.id).attempts == 0
    assert store.failures() == []  # asked to stop: not a failure
    job = store.claim("engine", 60)
    assert job.attempts == 1
    # The machine's fault (export folder unwritable): shown as a failure that will be retried.
    assert store.release(job.id, "engine", error="cannot write to /export: Permission denied")
    assert [(j.state, j.attempts, j.error) for j in store.failures()] == [
        ("queued", 0, "cannot write to /export: Permission denied")]


def test_planned_output_is_reserved_for_its_job(store: JobStore, inbox: Path) -> None:
    a = store.enqueue(drop(inbox, "a.png", b"a"), "fp")
    b = store.enqueue(drop(inbox, "a.jpg", b"b"), "fp")
    job = store.claim("engine", lease_seconds=-1)
    assert store.plan_output(job.id, "engine", "/export/a.png")
    assert store.output_taken("/export/a.png", b.id) and not store.output_taken("/export/a.png", a.id)
    again = store.claim("engine", 60)  # the engine died after planning: its retry finds the plan
    assert again.id == a.id and again.output_path == "/export/a.png"


def test_counts_always_name_every_state(store: JobStore) -> None:
    assert store.counts() == dict.fromkeys(STATES, 0)


def test_process_heartbeats(store: JobStore) -> None:
    store.beat("watcher", "watching")
    store.beat("watcher", "scanning")
    processes = store.processes()
    assert list(processes) == ["watcher"]
    assert processes["watcher"]["status"] == "scanning" and processes["watcher"]["age_seconds"] < 5


def _claim_all(db_path: str, owner: str, start, out) -> None:
    store = JobStore(Path(db_path))
    start.wait()  # both processes have opened the database: now race
    claimed = []
    while (job := store.claim(owner, 60)) is not None:
        claimed.append(job.id)
        time.sleep(0.002)  # "work", so that the two really interleave
        store.finish(job.id, owner, f"/export/{job.id}.png", {})
    out.put(claimed)


def test_two_processes_never_claim_the_same_job(store: JobStore, inbox: Path) -> None:
    ids = {store.enqueue(drop(inbox, f"{i}.png", str(i).encode()), "fp").id for i in range(60)}
    context = multiprocessing.get_context("spawn")  # nothing shared but the file
    start, out = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_claim_all, args=(str(store.path), f"engine-{n}", start, out)) for n in range(2)]
    for worker in workers:
        worker.start()
    claimed = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    assert all(claimed), "both processes should have won some claims"
    assert sorted(claimed[0] + claimed[1]) == sorted(ids)  # each job exactly once
    assert store.counts()["done"] == 60


def test_the_sqlite_utils_floor_is_a_version_the_store_works_with() -> None:
    # sqlite-utils 3.x's executescript() COMMITs first (sqlite3's own behaviour), so with
    # 3.38 a fresh JobStore() failed: "cannot commit - no transaction is active". 4.0 and
    # 4.2.1 pass this file; pip must not be allowed to pick a 3.x.
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    floor = next(re.fullmatch(r"sqlite-utils>=(\d+)\.(\d+).*", d) for d in pyproject["project"]["dependencies"]
                 if d.startswith("sqlite-utils"))
    assert floor is not None and int(floor.group(1)) >= 4
