"""``[engine] batch_size``: an engine claims several queued jobs and protects them as a batch.

Real SQLite, the real tiny model, and a real ``fixative engine`` / ``fixative
run`` subprocess for the stories that a process tells: batches claimed and
recorded, failures kept to their job, a kill -9 mid-batch. Out of memory is the
one thing injected (in-process), see its test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fixative.engine.protect
from fixative.daemon.settings import Settings, load_settings
from fixative.daemon.liveness import engine_name
from fixative.daemon.store import JobStore
from fixative.daemon.worker import Worker
from fixative.engine.errors import OutOfMemory
from test_daemon_end_to_end import REPO, Daemon, png_bytes
from test_worker_process import wait_for

ENGINE = engine_name("cpu")
WIDE = (256, 320)  # another working size than png_bytes' 256 x 272, so never in one batch with it


def enqueue(store: JobStore, inbox: Path, name: str, content: bytes, options) -> int:
    path = inbox / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return store.enqueue(path, options, inbox=inbox).id


def test_an_engine_protects_same_size_same_settings_jobs_in_batches_and_each_failure_stays_its_own(
        tmp_path, tiny_model) -> None:
    """One `fixative engine` run, its queue in claim order (oldest first, batches of up to 3):

    1-6: six same-size images, the same settings: two batches of 3.
    7-10: 7, 8 (wide) and 10 share settings, 9 has others (its seed): 7 and 10 run
          as a batch of 2, 8 alone (another size), 9 alone (other settings).
    11-13: one batch's claim: 11 is no image, 12's export folder has a file in its
           way; only those fail, each for good with its own reason, before any
           GPU time, and 13 is done. 12 is done once the file is moved and the
           job retried.
    """
    daemon = Daemon(tmp_path, tiny_model, FIXATIVE_ENGINE__BATCH_SIZE="3")  # its config; `fixative engine` alone
    root, inbox, export, store = tmp_path, daemon.inbox, daemon.export, daemon.store
    options = load_settings(daemon.config).engine.model_copy(update={"steps": 2})
    other = options.model_copy(update={"seed": 1})
    same = [enqueue(store, inbox, f"{n}.png", png_bytes(n), options) for n in range(1, 7)]
    mixed = [enqueue(store, inbox, "7.png", png_bytes(7), options),
             enqueue(store, inbox, "8.png", png_bytes(8, *WIDE), options),
             enqueue(store, inbox, "9.png", png_bytes(9), other),
             enqueue(store, inbox, "10.png", png_bytes(10), options)]
    export.mkdir()
    (export / "blocked").write_text("a file where the folder blocked/ should be")
    bad, blocked, good = (enqueue(store, inbox, "11.png", b"not an image", options),
                          enqueue(store, inbox, "blocked/12.png", png_bytes(12), options),
                          enqueue(store, inbox, "13.png", png_bytes(13), options))

    with open(root / "engine.log", "wb") as log:
        engine = subprocess.Popen([sys.executable, "-m", "fixative.daemon.cli", "engine"], env=daemon.env, cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        ids = [*same, *mixed, bad, blocked, good]
        wait_for(lambda: all(store.get(job_id).state in ("done", "failed") for job_id in ids), "the 13 jobs to end")
        held_back = store.get(blocked)
        assert (held_back.state, held_back.progress_step) == ("failed", None)
        assert f"the file {export / 'blocked'} is in the way" in held_back.error
        (export / "blocked").unlink()  # what its reason says: move the file, then retry
        assert store.retry(blocked) == 1
        wait_for(lambda: store.get(blocked).state == "done", "the unblocked job")
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=60) == 0
    finally:
        engine.kill()

    jobs = {job.id: job for job in store.jobs(limit=100)}
    batch = {job_id: jobs[job_id].metrics.get("batch") for job_id in jobs}
    assert [batch[job_id] for job_id in same] == [3] * 6  # two batches of 3
    assert [batch[job_id] for job_id in mixed] == [2, 1, 1, 2]  # never across sizes nor settings
    assert batch[good] == 1 and batch[blocked] == 1
    assert "not an image" in jobs[bad].error and jobs[bad].state == "failed"
    # Each done once, in one file of its own, on its first attempt.
    done = [job for job in jobs.values() if job.state == "done"]
    assert len(done) == 12 and all(job.attempts == 1 for job in done)
    assert sorted(Path(job.output_path).relative_to(export).as_posix() for job in done) == sorted(
        p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file())
    assert jobs[blocked].output_path == str(export / "blocked" / "12.png")
    logged = [json.loads(line) for line in (root / "engine.log").read_text().splitlines() if line.startswith("{")]
    assert sorted(e["job_id"] for e in logged if e["event"] == "job.done") == sorted(job.id for job in done)
    store.close()


def test_kill_9_mid_batch_puts_every_job_of_the_batch_back_and_status_shows_each(tmp_path, tiny_model) -> None:
    """`fixative run`, batch_size 3: two same-size jobs run as a group while a wide one waits its turn.

    The waiting job's lease is renewed too (5 s leases, watched for longer),
    status lists all three as running on the engine, and after kill -9 of the
    engine all three are queued again at once (the supervisor's release_owner),
    the fourth never claimed. Only the group that was running pays the attempt.
    """
    # Steps enough that the batch is still running when killed, and would not finish on a SIGTERM either.
    daemon = Daemon(tmp_path, tiny_model, FIXATIVE_ENGINE__STEPS="5000", FIXATIVE_ENGINE__BATCH_SIZE="3")
    try:
        options = load_settings(daemon.config).engine.model_copy(update={"steps": 5000})  # what the watcher queues
        ids = [enqueue(daemon.store, daemon.inbox, "a.png", png_bytes(1), options),
               enqueue(daemon.store, daemon.inbox, "b.png", png_bytes(2), options),
               enqueue(daemon.store, daemon.inbox, "wide.png", png_bytes(3, *WIDE), options),
               enqueue(daemon.store, daemon.inbox, "d.png", png_bytes(4), options)]
        daemon.start()
        daemon.wait_for(lambda: any(job.progress_step for job in daemon.store.running_jobs()), "the batch mid-way")
        claimed = sorted(job.id for job in daemon.store.running_jobs())
        assert claimed == ids[:3]
        time.sleep(6)  # more than a lease: only the pulse's renewals keep the waiting job ours
        running = daemon.store.running_jobs()
        assert sorted(job.id for job in running) == ids[:3] and all(job.lease_expires > time.time() for job in running)
        assert {job.id: job.progress_step is not None for job in running} == {ids[0]: True, ids[1]: True, ids[2]: False}

        (engine,) = daemon.status()["engines"]
        assert engine["name"] == ENGINE and sorted(job["id"] for job in engine["batch"]) == ids[:3]
        text = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "status"], env=daemon.env, cwd=REPO,
                              capture_output=True, text=True, timeout=60).stdout
        assert [line.split()[1] for line in text.splitlines() if line.startswith("now: ")] == ["a.png", "b.png",
                                                                                               "wide.png"]

        os.kill(daemon.beat(ENGINE)["pid"], signal.SIGKILL)
        daemon.wait_for(lambda: all(daemon.store.get(job_id).state == "queued" for job_id in ids), "the batch back",
                        timeout=5)
        assert [daemon.store.get(job_id).attempts for job_id in ids] == [1, 1, 0, 0]  # none lost, none done twice
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        daemon.store.close()


def test_an_image_that_kills_the_engine_fails_alone_and_its_batch_mates_are_protected(tmp_path, tiny_model) -> None:
    """`fixative run`, batch_size 4, its engine killed (kill -9) whenever job 1 is being protected, 3 times.

    The first claim takes jobs 1-4: 1-3 (one size) run as a group while 4
    (wide) waits for its turn, so the first kill costs 1-3 an attempt and not
    4. From then on 1-3 are each claimed alone: the next kills cost job 1
    only, which fails after its 3 attempts, and 2 and 3 are protected alone
    on their second attempt; 4 and 5 on their first.
    """
    daemon = Daemon(tmp_path, tiny_model, FIXATIVE_ENGINE__STEPS="200", FIXATIVE_ENGINE__BATCH_SIZE="4")
    try:
        options = load_settings(daemon.config).engine.model_copy(update={"steps": 200})  # what the watcher queues
        ids = [enqueue(daemon.store, daemon.inbox, "1.png", png_bytes(1), options),
               enqueue(daemon.store, daemon.inbox, "2.png", png_bytes(2), options),
               enqueue(daemon.store, daemon.inbox, "3.png", png_bytes(3), options),
               enqueue(daemon.store, daemon.inbox, "wide.png", png_bytes(4, *WIDE), options),
               enqueue(daemon.store, daemon.inbox, "5.png", png_bytes(5), options)]
        daemon.start()
        killed: list[int] = []

        def protecting_job_1() -> int | None:
            """The pid of the engine protecting job 1 now: a live child of `fixative run` not killed yet."""
            beat, job = daemon.beat(ENGINE), daemon.store.get(ids[0])
            if beat is None or beat["pid"] in killed or job.state != "running" or job.progress_step is None:
                return None
            return beat["pid"] if _parent(beat["pid"]) == daemon.process.pid else None

        for kill in range(3):
            killed.append(daemon.wait_for(protecting_job_1, f"job 1 protected, time {kill + 1}", timeout=120))
            os.kill(killed[-1], signal.SIGKILL)
            if kill == 0:
                daemon.wait_for(lambda: all(daemon.store.get(job_id).state == "queued" for job_id in ids),
                                "the batch back", timeout=10)
                assert [daemon.store.get(job_id).attempts for job_id in ids] == [1, 1, 1, 0, 0]
        daemon.wait_for(lambda: daemon.finished(len(ids)), "every job to end", timeout=240)
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
    jobs = [daemon.store.get(job_id) for job_id in ids]
    daemon.store.close()
    assert (jobs[0].state, jobs[0].attempts) == ("failed", 3)
    assert jobs[0].error.startswith("gave up after 3 attempts: the engine died while working on it (killed by SIGKILL)")
    assert [(job.state, job.attempts, job.metrics.get("batch")) for job in jobs[1:]] == [
        ("done", 2, 1), ("done", 2, 1), ("done", 1, 1), ("done", 1, 1)]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


@pytest.fixture
def engine(tmp_path: Path, tiny_model: Path) -> Worker:
    """An in-process engine on the real tiny model and a real SQLite table, batch_size 3."""
    (tmp_path / "inbox").mkdir()
    settings = Settings(inbox=tmp_path / "inbox", export_dir=tmp_path / "export", state_dir=tmp_path / "state",
                        engine={"model": str(tiny_model), "steps": 2, "device": "cpu", "batch_size": 3})
    store = JobStore(settings.db_path)
    engine = Worker(settings, store, threading.Event())
    engine.rest = lambda seconds, status: None  # no real pauses in tests
    yield engine
    store.close()


def test_a_batch_out_of_memory_is_protected_one_image_at_a_time_without_using_an_attempt(engine, monkeypatch) -> None:
    """Injected: no real allocation fails on cue here.

    A real OOM needs a batch that does not fit while each image does: on this
    shared CPU that means exhausting the machine's memory (other agents' work
    dies with it), and its threshold moves with everything else running.
    tests/test_large_images.py covers a real OOM's conversion to OutOfMemory.
    """
    real = fixative.engine.protect.protect_batch
    sizes: list[int] = []

    def no_room_for_two(sources, *args, **kwargs):
        sizes.append(len(sources))
        if len(sources) > 1:
            raise OutOfMemory(f"out of memory protecting a batch of {len(sources)}")
        return real(sources, *args, **kwargs)

    monkeypatch.setattr(fixative.engine.protect, "protect_batch", no_room_for_two)
    store, inbox = engine.store, engine.settings.inbox
    ids = [enqueue(store, inbox, f"{n}.png", png_bytes(n), engine.settings.engine) for n in range(3)]
    engine.claim_and_handle()
    assert sizes == [3, 1, 1, 1]  # in the same cycle
    jobs = [store.get(job_id) for job_id in ids]
    assert [(job.state, job.attempts, job.metrics["batch"]) for job in jobs] == [("done", 1, 1)] * 3


def test_a_stop_releases_the_waiting_groups_at_once_and_the_running_group_finishes(engine, monkeypatch) -> None:
    """SIGTERM mid-batch: the group near its end finishes (FINISH_ON_STOP_SECONDS), the group not started is released."""
    real = fixative.engine.protect.protect_batch

    def stop_during_the_first_group(sources, model, options, progress=None):
        def progress_then_stop(step, total, loss):
            engine.stop.set()  # SIGTERM arrives during the first step
            progress(step, total, loss)

        return real(sources, model, options, progress_then_stop)

    monkeypatch.setattr(fixative.engine.protect, "protect_batch", stop_during_the_first_group)
    store, inbox = engine.store, engine.settings.inbox
    first = [enqueue(store, inbox, f"{n}.png", png_bytes(n), engine.settings.engine) for n in range(2)]
    waiting = enqueue(store, inbox, "wide.png", png_bytes(2, *WIDE), engine.settings.engine)
    engine.claim_and_handle()
    done = [store.get(job_id) for job_id in first]
    released = store.get(waiting)
    assert [(job.state, job.metrics["batch"]) for job in done] == [("done", 2)] * 2
    assert (released.state, released.attempts, released.error) == ("queued", 0, None)
    assert released.updated_at < min(job.finished_at for job in done)  # released before its batch ended
