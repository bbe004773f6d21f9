"""The job table: dedupe, leases, attempts, owner guards.

Every test that takes the ``store`` fixture runs twice: on a real SQLite file
and on a real PostgreSQL database (tests/postgres.py). The few that are about
SQLite itself (WAL, its migrations) say so in their name.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module
import os
import re
import socket
import stat
import time
import tomllib
from pathlib import Path

import pytest

from fixative.daemon.store import STATES, JobStore, StoreUnavailable
from fixative.daemon.store_sqlite import MIGRATIONS
from fixative.engine.options import EngineOptions

OPTIONS = EngineOptions()


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    (folder / "sub").mkdir(parents=True)
    return folder


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if request.param == "sqlite":
        location = tmp_path / "state" / "jobs.db"
    else:
        location = request.getfixturevalue("postgres_url")
    store = JobStore(location, max_attempts=3)
    yield store
    store.close()


def drop(inbox: Path, name: str, content: bytes = b"pixels") -> Path:
    path = inbox / name
    path.write_bytes(content)
    return path


def test_schema_is_versioned(store: JobStore) -> None:
    again = JobStore(store.location)  # a second process opening the same table
    assert again.backend.schema_version() == len(import_module(type(store.backend).__module__).MIGRATIONS)


def test_sqlite_is_in_wal_mode(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    assert store.backend.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_postgresql_machines_starting_together_migrate_once(postgres_url: str) -> None:
    from fixative.daemon.store_postgres import MIGRATIONS as POSTGRESQL_MIGRATIONS

    with ThreadPoolExecutor(4) as pool:  # four machines' first claim, at once, on an empty database
        stores = list(pool.map(lambda _: JobStore(postgres_url), range(4)))
        assert list(pool.map(lambda store: store.claim("engine", 60), stores)) == [None] * 4
    recorded = stores[0].backend.rows("SELECT version, applied_at FROM fixative_schema ORDER BY version", {})
    assert [row["version"] for row in recorded] == list(range(1, len(POSTGRESQL_MIGRATIONS) + 1))
    assert all(abs(row["applied_at"] - time.time()) < 60 for row in recorded)


def test_a_postgresql_disk_full_is_waited_out_like_a_lost_server(postgres_url: str, inbox: Path) -> None:
    store = JobStore(postgres_url)
    with pytest.raises(StoreUnavailable, match="could not extend file"):
        # The server's own error, SQLSTATE 53100, as a full disk raises it.
        store.backend.execute("DO $$ BEGIN RAISE 'could not extend file' USING ERRCODE = '53100'; END $$", {})
    assert store.enqueue(drop(inbox, "a.png"), OPTIONS).state == "queued"  # and then it goes on


def test_enqueue_is_idempotent_per_path(store: JobStore, inbox: Path) -> None:
    path = drop(inbox, "sub/a.png")
    first = store.enqueue(path, OPTIONS, inbox=inbox)
    assert first.state == "queued" and first.relative_path == "sub/a.png"
    assert store.enqueue(path, OPTIONS, inbox=inbox).id == first.id  # the watcher's rescan
    assert store.counts()["queued"] == 1


def test_renamed_copy_is_skipped_and_shares_the_output(store: JobStore, inbox: Path) -> None:
    original = store.enqueue(drop(inbox, "a.png"), OPTIONS, inbox=inbox)
    copy = store.enqueue(drop(inbox, "copy of a.png"), OPTIONS, inbox=inbox)
    assert copy.state == "skipped" and copy.duplicate_of == original.id
    assert store.enqueue(inbox / "copy of a.png", OPTIONS, inbox=inbox).id == copy.id  # no second skipped row

    job = store.claim("engine-1", 60)
    assert store.finish(job.id, "engine-1", "/export/a.png", {"psnr": 40.0})
    assert store.get(copy.id).output_path == "/export/a.png"
    assert store.enqueue(drop(inbox, "third.png"), OPTIONS).output_path == "/export/a.png"


def test_changed_content_or_settings_make_new_jobs_that_supersede_the_old(store: JobStore, inbox: Path) -> None:
    path = drop(inbox, "a.png", b"v1")
    first = store.enqueue(path, OPTIONS)
    other_settings = store.enqueue(path, EngineOptions(steps=5))
    assert other_settings.state == "queued" and other_settings.options["steps"] == 5
    drop(inbox, "a.png", b"v2")
    latest = store.enqueue(path, OPTIONS)
    assert latest.id not in (first.id, other_settings.id)
    # One current job per path; the stale ones are history, not failures, and not retried.
    assert store.counts() == dict.fromkeys(STATES, 0) | {"queued": 1, "superseded": 2}
    assert store.get(first.id).error.startswith(f"superseded by #{other_settings.id}")
    assert store.failures() == [] and store.retry(all_failed=True) == 0
    assert store.enqueue(path, OPTIONS).id == latest.id  # rescans stay idempotent


def test_a_superseded_jobs_copies_take_it_over(store: JobStore, inbox: Path) -> None:
    a = store.enqueue(drop(inbox, "a.png", b"same"), OPTIONS)
    copy = store.enqueue(drop(inbox, "copy.png", b"same"), OPTIONS)
    other = store.enqueue(drop(inbox, "other copy.png", b"same"), OPTIONS)
    assert (copy.state, other.state) == ("skipped", "skipped")
    store.enqueue(drop(inbox, "a.png", b"edited"), OPTIONS)  # a.png changed before it was protected
    # Nobody else would protect copy.png's content now.
    copy, other = store.get(copy.id), store.get(other.id)
    assert (copy.state, copy.duplicate_of) == ("queued", None)
    assert (other.state, other.duplicate_of) == ("skipped", copy.id)
    assert (store.get(a.id).state, store.get(a.id).duplicate_of) == ("superseded", copy.id)


def test_content_that_comes_back_is_queued_again(store: JobStore, inbox: Path) -> None:
    path = drop(inbox, "a.png", b"v1")
    v1 = store.enqueue(path, OPTIONS)
    drop(inbox, "a.png", b"v2")
    store.enqueue(path, OPTIONS)
    drop(inbox, "a.png", b"v1")  # undo in the editor, before v1 was protected
    assert store.enqueue(path, OPTIONS).id == v1.id
    assert store.get(v1.id).state == "queued" and store.counts()["superseded"] == 1

    # Done, then replaced by v2's output, then back: v1 needs its output again.
    store.finish(store.claim("e1", 60).id, "e1", "/export/a.png", {})
    drop(inbox, "a.png", b"v2")
    v2 = store.enqueue(path, OPTIONS)
    store.finish(store.claim("e2", 60).id, "e2", "/export/a.png", {})
    drop(inbox, "a.png", b"v1")
    assert store.enqueue(path, OPTIONS).id == v1.id and store.get(v1.id).state == "queued"
    assert store.get(v2.id).state == "done"  # its history stays


def test_an_old_sqlite_database_is_migrated_with_its_jobs(tmp_path: Path, inbox: Path) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        old.executescript(script)
        old.execute(f"PRAGMA user_version = {number}")
    old.execute("""INSERT INTO jobs (source_path, relative_path, sha256, fingerprint, state, created_at, updated_at)
                   VALUES ('/inbox/a.png', 'a.png', 'abc', 'fp', 'queued', 1, 1)""")
    old.close()
    store = JobStore(tmp_path / "jobs.db")
    job = store.claim("engine", 60)
    assert (job.source_path, job.options, job.state) == ("/inbox/a.png", None, "running")
    store.supersede(job.id, "engine", "changed")
    assert store.counts()["superseded"] == 1


def test_refusals_are_recorded_once(store: JobStore, inbox: Path) -> None:
    refused = store.record_refusal(inbox / "link.png", "symlink: refused")
    assert refused.state == "failed" and refused.sha256 is None
    assert store.record_refusal(inbox / "link.png", "symlink: refused").id == refused.id
    assert store.failures()[0].error == "symlink: refused"
    assert store.retry(all_failed=True) == 0  # nothing safe to process


def test_claim_finish_and_progress(store: JobStore, inbox: Path) -> None:
    queued = store.enqueue(drop(inbox, "a.png"), OPTIONS)
    job = store.claim("engine-1", 60)
    assert (job.id, job.state, job.attempts, job.owner) == (queued.id, "running", 1, "engine-1")
    assert store.claim("engine-2", 60) is None
    assert store.heartbeat(job.id, "engine-1", 60, step=3, total=10)
    (running,) = store.running_jobs()
    assert (running.progress_step, running.progress_total) == (3, 10)
    assert store.finish(job.id, "engine-1", "/export/a.png", {"gain": 1.4})
    done = store.get(job.id)
    assert done.state == "done" and done.metrics == {"gain": 1.4} and done.owner is None
    assert store.throughput()["done"] == 1


def test_claim_more_takes_queued_jobs_of_the_same_settings_each_with_its_own_lease(store: JobStore, inbox: Path) -> None:
    """[engine] batch_size: the jobs a batch adds to a claim (daemon.worker)."""
    other = OPTIONS.model_copy(update={"steps": 7})
    ids = [store.enqueue(drop(inbox, name, name.encode()), options).id
           for name, options in (("a.png", OPTIONS), ("b.png", other), ("c.png", OPTIONS), ("d.png", OPTIONS),
                                 ("e.png", OPTIONS))]
    backing_off = store.claim("engine", 60)
    store.fail(backing_off.id, "engine", "a transient failure", permanent=False, retry_after_seconds=60)
    more = store.claim_more("engine", 60, OPTIONS.fingerprint(), 5, engine="engine cpu@a")
    # Same settings only (not b), due only (not a, backing off), at most what is queued now (never waits).
    assert [job.id for job in more] == ids[2:]
    assert all((job.state, job.attempts, job.owner, job.engine) == ("running", 1, "engine", "engine cpu@a")
               for job in more)
    assert store.claim_more("engine", 60, OPTIONS.fingerprint(), 5) == []
    assert len(store.running_jobs()) == 3
    first, more = more[0], more[1:]

    # Each lease stands alone: released, renewed and finished one by one.
    assert store.release(more[0].id, "engine") and store.get(more[0].id).attempts == 0
    assert store.heartbeat(more[1].id, "engine", 60, step=1, total=2)
    assert store.finish(more[1].id, "engine", "/export/e.png", {})
    assert store.get(first.id).state == "running"
    # A dead engine's batch comes back whole.
    assert store.release_owner("engine", "the engine died")
    assert {store.get(job_id).state for job_id in (first.id, more[0].id)} == {"queued"}


def test_claim_more_takes_no_more_than_asked_nor_a_job_out_of_attempts(store: JobStore, inbox: Path) -> None:
    for name in ("a.png", "b.png", "c.png", "d.png"):
        store.enqueue(drop(inbox, name, name.encode()), OPTIONS)
    for _ in range(3):  # a fails on its last attempt: queued, until the next claim() fails it for good
        job = store.claim("engine", 60)
        assert store.fail(job.id, "engine", "a transient failure", permanent=False)
    assert (store.get(job.id).state, store.get(job.id).attempts) == ("queued", 3)
    assert [more.relative_path for more in store.claim_more("engine", 60, OPTIONS.fingerprint(), 2)] == ["b.png", "c.png"]
    assert store.claim_more("engine", 60, OPTIONS.fingerprint(), 0) == []
    assert store.counts()["queued"] == 2


def test_expired_lease_is_requeued_and_the_old_owner_is_locked_out(store: JobStore, inbox: Path) -> None:
    store.enqueue(drop(inbox, "a.png"), OPTIONS)
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
    store.enqueue(drop(inbox, "poison.png"), OPTIONS)
    for _ in range(3):
        assert store.claim("engine", lease_seconds=-1) is not None  # engine crashes every time
    assert store.claim("engine", 60) is None
    failed = store.failures()[0]
    assert failed.state == "failed" and failed.attempts == 3
    assert failed.error.startswith("gave up after 3 attempts: lease expired")


def test_transient_failure_retries_after_backoff(store: JobStore, inbox: Path) -> None:
    store.enqueue(drop(inbox, "a.png"), OPTIONS)
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
    a = store.enqueue(drop(inbox, "a.png", b"a"), OPTIONS)
    b = store.enqueue(drop(inbox, "b.png", b"b"), OPTIONS)
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
    store.enqueue(drop(inbox, "a.png"), OPTIONS)
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
    a = store.enqueue(drop(inbox, "a.png", b"a"), OPTIONS)
    b = store.enqueue(drop(inbox, "a.jpg", b"b"), OPTIONS)
    job = store.claim("engine", lease_seconds=-1)
    assert store.plan_output(job.id, "engine", "/export/a.png", "cafe")
    assert [(j.id, j.output_sha256) for j in store.output_holders("/export/a.png", b.id)] == [(a.id, "cafe")]
    assert store.output_holders("/export/a.png", a.id) == []
    again = store.claim("engine", 60)  # the engine died after planning: its retry finds the plan
    assert again.id == a.id and again.output_path == "/export/a.png"


def test_a_dead_engines_job_is_released_with_its_attempt_counted(store: JobStore, inbox: Path) -> None:
    store.enqueue(drop(inbox, "a.png", b"a"), OPTIONS)
    store.enqueue(drop(inbox, "b.png", b"b"), OPTIONS)
    job = store.claim("dead-engine", 300)
    assert not store.release_owner("another-engine", "died")
    assert store.release_owner("dead-engine", "the engine died while working on it (killed by SIGKILL)")
    released = store.get(job.id)
    assert (released.state, released.owner, released.attempts) == ("queued", None, 1)
    assert not store.heartbeat(job.id, "dead-engine", 60)  # locked out, should it still be alive
    assert store.claim("new-engine", 60).id == job.id


@pytest.mark.parametrize("found", ["released", "expired"])
def test_a_dead_engines_batch_costs_an_attempt_only_to_the_group_it_was_protecting(store: JobStore, inbox: Path,
                                                                                   found: str) -> None:
    """Released by ``fixative run``, or found with an expired lease by the next claim, alike."""
    for name in ("a.png", "b.png", "c.png", "d.png"):
        store.enqueue(drop(inbox, name, name.encode()), OPTIONS)
    lease = 300 if found == "released" else -1
    first = store.claim("dead-engine", lease)
    batch = [first, *store.claim_more("dead-engine", lease, first.fingerprint, 2)]
    assert store.start_group([job.id for job in batch[:2]], "dead-engine", lease)  # the third waits for its turn
    if found == "released":
        assert store.release_owner("dead-engine", "the engine died while working on it (killed by SIGKILL)")
    again = store.claim("engine", 60)
    assert [store.get(job.id).attempts for job in batch] == [2, 1, 0]  # a, claimed again now; b; c
    # a and b paid, and are claimed alone from now on; c and d can share a batch.
    assert again.relative_path == "a.png" and again.retried
    assert [job.relative_path for job in store.claim_more("engine", 60, OPTIONS.fingerprint(), 3)] == ["c.png", "d.png"]


def test_a_dead_engines_jobs_all_pay_when_no_group_had_started(store: JobStore, inbox: Path) -> None:
    """One of them may have killed it while it was read or decoded."""
    for name in ("a.png", "b.png"):
        store.enqueue(drop(inbox, name, name.encode()), OPTIONS)
    first = store.claim("dead-engine", 300)
    batch = [first, *store.claim_more("dead-engine", 300, first.fingerprint, 1)]
    assert store.release_owner("dead-engine", "died")
    assert [store.get(job.id).attempts for job in batch] == [1, 1]
    again = store.claim("engine", 60)
    assert again.retried and store.claim_more("engine", 60, again.fingerprint, 1) == []  # alone, as is b after it


def test_a_job_released_with_a_delay_is_passed_by_the_others(store: JobStore, inbox: Path) -> None:
    a = store.enqueue(drop(inbox, "a.png", b"a"), OPTIONS)
    b = store.enqueue(drop(inbox, "b.png", b"b"), OPTIONS)
    assert store.claim("engine", 60).id == a.id
    assert store.release(a.id, "engine", error="cannot write in the export folder", retry_after_seconds=0.3)
    assert store.claim("engine", 60).id == b.id
    assert store.claim("engine", 60) is None
    time.sleep(0.35)
    assert (job := store.claim("engine", 60)).id == a.id and job.attempts == 1


def test_a_job_whose_original_is_gone_hands_over_to_its_copy(store: JobStore, inbox: Path) -> None:
    a = store.enqueue(drop(inbox, "a.png", b"same"), OPTIONS)
    b = store.enqueue(drop(inbox, "b.png", b"same"), OPTIONS)
    lone = store.enqueue(drop(inbox, "c.png", b"other"), OPTIONS)
    assert (b.state, b.duplicate_of) == ("skipped", a.id)
    assert store.claim("engine", 60).id == a.id
    assert store.hand_over(a.id, "another-engine", "a.png is gone") is None  # not its job
    heir = store.hand_over(a.id, "engine", "a.png is gone")
    assert (heir.id, heir.state, heir.duplicate_of) == (b.id, "queued", None)
    retired = store.get(a.id)
    assert retired.state == "superseded" and retired.error == "a.png is gone; its copy b.png (job #2) is protected instead"
    assert store.claim("engine", 60).id == b.id
    assert store.claim("engine", 60).id == lone.id
    assert store.hand_over(lone.id, "engine", "c.png is gone") is None  # no copy: the engine fails it
    assert store.get(lone.id).state == "running"


def test_a_file_renamed_twice_before_it_is_protected_reaches_its_last_name(store: JobStore, inbox: Path) -> None:
    """``mv a.png b.png; mv b.png c.png``: a.png's job passes to b.png, which is gone too, and on to c.png."""
    a = store.enqueue(drop(inbox, "a.png", b"same"), OPTIONS)
    (inbox / "a.png").rename(inbox / "b.png")
    b = store.enqueue(inbox / "b.png", OPTIONS)
    (inbox / "b.png").rename(inbox / "c.png")
    c = store.enqueue(inbox / "c.png", OPTIONS)
    assert (b.duplicate_of, c.duplicate_of) == (a.id, a.id)
    assert store.claim("engine", 60).id == a.id
    assert store.hand_over(a.id, "engine", "a.png is gone").id == b.id
    assert store.claim("engine", 60).id == b.id
    assert store.hand_over(b.id, "engine", "b.png is gone").id == c.id  # not back to a.png's job
    assert store.claim("engine", 60).id == c.id
    assert [store.get(job.id).state for job in (a, b, c)] == ["superseded", "superseded", "running"]


def test_the_clock_skew_is_measured_against_a_postgresql_server(store: JobStore) -> None:
    skew = store.clock_skew()
    if isinstance(store.location, Path):
        assert skew is None  # SQLite: the table is on this machine
    else:
        assert abs(skew) < 1  # the test server runs on this machine's clock


def test_counts_always_name_every_state(store: JobStore) -> None:
    assert store.counts() == dict.fromkeys(STATES, 0)


def test_process_heartbeats(store: JobStore) -> None:
    store.beat("watcher", "watching")
    store.beat("watcher", "scanning")
    processes = store.processes()
    assert list(processes) == ["watcher"]
    assert processes["watcher"]["status"] == "scanning" and processes["watcher"]["age_seconds"] < 5


def test_each_engine_beats_under_its_name_and_marks_the_jobs_it_does(store: JobStore, inbox: Path) -> None:
    """Several engines: status reads each one's row, its job now and its throughput from these."""
    for name in ("a.png", "b.png", "c.png", "d.png"):
        store.enqueue(drop(inbox, name, name.encode()), OPTIONS)
    for engine in ("engine cuda:0@a", "engine cuda:1@b", "engine cuda:0@a"):
        job = store.claim(f"owner of {engine}", 60, engine=engine)
        assert store.finish(job.id, f"owner of {engine}", f"/export/{job.relative_path}", {})
    running = store.claim("owner of the second", 60, engine="engine cuda:1@b")
    assert [job.id for job in store.running_jobs()] == [running.id] and running.engine == "engine cuda:1@b"
    figures = store.throughput_by_engine(24)
    assert {name: row["done"] for name, row in figures.items()} == {"engine cuda:0@a": 2, "engine cuda:1@b": 1}
    assert all(row["mean_seconds"] >= 0 for row in figures.values())

    store.beat("engine cuda:1@b", "idle", device="cuda:1")
    store.beat("watcher", "watching")
    beats = store.processes()
    assert (beats["engine cuda:1@b"]["device"], beats["watcher"]["device"]) == ("cuda:1", None)
    assert beats["engine cuda:1@b"]["host"] == socket.gethostname()


def test_sqlite_migration_4_retires_the_single_engines_row(tmp_path: Path) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:3], start=1):
        old.executescript(script)
        old.execute(f"PRAGMA user_version = {number}")
    for name in ("watcher", "engine"):
        old.execute("INSERT INTO processes (name, pid, status, beat_at) VALUES (?, 1, 'stopped', 1)", (name,))
    old.close()
    store = JobStore(tmp_path / "jobs.db")
    assert list(store.processes()) == ["watcher"]  # engines now beat under names of their own
    store.close()


def _claim_all(location: str, owner: str, start, out) -> None:
    store = JobStore(location)
    start.wait()  # both processes have opened the database: now race
    claimed = []
    while (job := store.claim(owner, 60)) is not None:
        claimed.append(job.id)
        time.sleep(0.002)  # "work", so that the two really interleave
        store.finish(job.id, owner, f"/export/{job.id}.png", {})
    out.put(claimed)


def test_two_processes_never_claim_the_same_job(store: JobStore, inbox: Path) -> None:
    ids = {store.enqueue(drop(inbox, f"{i}.png", str(i).encode()), OPTIONS).id for i in range(60)}
    context = multiprocessing.get_context("spawn")  # nothing shared but the file
    start, out = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_claim_all, args=(str(store.location), f"engine-{n}", start, out)) for n in range(2)]
    for worker in workers:
        worker.start()
    claimed = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    assert all(claimed), "both processes should have won some claims"
    assert sorted(claimed[0] + claimed[1]) == sorted(ids)  # each job exactly once
    assert store.counts()["done"] == 60


def test_sixteen_claimers_with_a_store_each_take_every_job_once(store: JobStore, inbox: Path) -> None:
    # Sixteen engines' worth of concurrent claims and finishes: no job twice, and
    # no deadlock or lock timeout between the claims' sweeps and finishes.
    ids = {store.enqueue(drop(inbox, f"{i}.png", str(i).encode()), OPTIONS).id for i in range(64)}

    def drain(n: int) -> list[int]:
        mine, claimed = JobStore(store.location), []
        while (job := mine.claim(f"engine-{n}", 60)) is not None:
            claimed.append(job.id)
            assert mine.finish(job.id, f"engine-{n}", f"/export/{job.id}.png", {})
        mine.close()
        return claimed

    with ThreadPoolExecutor(16) as pool:
        claimed = [job_id for ids_of_one in pool.map(drain, range(16)) for job_id in ids_of_one]
    assert sorted(claimed) == sorted(ids) and store.counts()["done"] == 64


def test_batches_claimed_at_once_by_sixteen_claimers_hold_every_job_once(store: JobStore, inbox: Path) -> None:
    # claim_more under contention: SKIP LOCKED on PostgreSQL, one writer at a time on SQLite.
    ids = {store.enqueue(drop(inbox, f"{i}.png", str(i).encode()), OPTIONS).id for i in range(64)}

    def drain(n: int) -> list[int]:
        mine, claimed = JobStore(store.location), []
        while (job := mine.claim(f"engine-{n}", 60)) is not None:
            batch = [job, *mine.claim_more(f"engine-{n}", 60, job.fingerprint, 3)]
            claimed += [each.id for each in batch]
            assert all(mine.finish(each.id, f"engine-{n}", f"/export/{each.id}.png", {}) for each in batch)
        mine.close()
        return claimed

    with ThreadPoolExecutor(16) as pool:
        claimed = [job_id for ids_of_one in pool.map(drain, range(16)) for job_id in ids_of_one]
    assert sorted(claimed) == sorted(ids) and store.counts()["done"] == 64


def test_the_sqlite_utils_floor_is_a_version_the_store_works_with() -> None:
    # sqlite-utils 3.x's executescript() COMMITs first (sqlite3's own behaviour), so with
    # 3.38 a fresh JobStore() failed: "cannot commit - no transaction is active". 4.0 and
    # 4.2.1 pass this file; pip must not be allowed to pick a 3.x.
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    floor = next(re.fullmatch(r"sqlite-utils>=(\d+)\.(\d+).*", d) for d in pyproject["project"]["dependencies"]
                 if d.startswith("sqlite-utils"))
    assert floor is not None and int(floor.group(1)) >= 4


def test_a_job_table_from_before_is_made_private_when_opened(tmp_path: Path) -> None:
    """A table an earlier fixative made under umask 022: 0644 in a 0755 folder, until it is next opened."""
    store = JobStore(tmp_path / "state" / "jobs.db")
    store.beat("watcher")
    store.close()
    os.chmod(tmp_path / "state", 0o755)
    os.chmod(tmp_path / "state" / "jobs.db", 0o644)
    JobStore(tmp_path / "state" / "jobs.db").close()
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "jobs.db").stat().st_mode) == 0o600
