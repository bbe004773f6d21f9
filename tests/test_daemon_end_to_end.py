"""The daemon end to end, as an artist meets it: files copied into the inbox of a running ``fixative run``.

Everything is real: ``fixative run`` as a subprocess (its watcher thread with a
real inotify observer, its engine child on the tiny model), the SQLite job
table, ``fixative status --json`` as a subprocess, SIGTERM to stop. The tests
wait on the job table directly (cheap), and ask ``status --json`` only for
what they check in it.

What other files cover already, and is not repeated here: the watcher's rules
against a real observer in-process (tests/test_watcher.py: a 200-file burst,
a watcher restart with arrivals in between, junk, polling), kill -9 of the
engine under ``fixative run`` (tests/test_worker_process.py), each failure
kind of the worker (tests/test_worker.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from conftest import painting
from fixative.daemon.settings import EX_CONFIG
from fixative.daemon.liveness import watcher_name
from fixative.daemon.store import JobStore

REPO = Path(__file__).resolve().parents[1]
STEPS = 5


class Daemon:
    """A ``fixative run`` in a folder of its own: inbox, export, state, config."""

    def __init__(self, root: Path, model: Path | str, **extra_env: str):
        self.root = root
        self.inbox, self.export = root / "inbox", root / "export"
        self.config = root / "config.toml"
        self.config.write_text(f"""
inbox = "{self.inbox}"
export_dir = "{self.export}"
state_dir = "{root / 'state'}"
[watcher]
stability_seconds = 0.5
[worker]
lease_seconds = 5
heartbeat_seconds = 0.5
retry_backoff_seconds = 1
[engine]
model = "{model}"
steps = {STEPS}
device = "cpu"
""")
        self.inbox.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "NOTIFY_", "WATCHDOG_"))}
        # OMP_NUM_THREADS=1: the tiny model gains nothing from threads, and on a
        # busy CI machine waiting OpenMP threads make each step 10-50x slower.
        self.env = {**env, "HOME": str(root), "FIXATIVE_CONFIG": str(self.config), "OMP_NUM_THREADS": "1",
                    "HF_HUB_OFFLINE": "1", **extra_env}
        self.store = JobStore(root / "state" / "jobs.db")
        self.process: subprocess.Popen | None = None
        self.log = root / "daemon.log"

    def start(self, *, wait: bool = True) -> Daemon:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "fixative.daemon.cli", "run"], env=self.env, cwd=REPO,
                                            stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_for(lambda: self.beat(watcher_name()), "the watcher to beat")
        return self

    def stop(self) -> int:
        """SIGTERM, as ``systemctl --user stop`` sends; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=120)
        finally:
            self.process.kill()

    def beat(self, name: str) -> dict | None:
        beat = self.store.processes().get(name)
        return beat if beat and beat["pid"] and beat["status"] != "stopped" else None

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = 180) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if result := condition():
                return result
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"fixative run exited ({self.process.returncode}) while waiting for {what}:\n"
                                     + self.log.read_text()[-3000:])
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n" + self.log.read_text()[-3000:])

    def finished(self, count: int) -> bool:
        counts = self.store.counts()
        return counts["done"] + counts["failed"] + counts["skipped"] >= count and not counts["queued"] + counts["running"]

    def status(self) -> dict:
        done = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "status", "--json"], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout)

    def outputs(self) -> list[str]:
        """Every file under the export folder, hidden ones (temp files) included."""
        return sorted(p.relative_to(self.export).as_posix() for p in self.export.rglob("*") if p.is_file())

    def jobs_for(self, relative: str) -> list:
        return [job for job in self.store.jobs(limit=1000) if job.source_path == str(self.inbox / relative)]


@pytest.fixture
def daemon(tmp_path: Path, tiny_model: Path):
    daemon = Daemon(tmp_path, tiny_model)
    yield daemon
    if daemon.process is not None and daemon.process.poll() is None:
        daemon.process.kill()
        daemon.process.wait()
    daemon.store.close()


def png_bytes(seed: int, height: int = 256, width: int = 272) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(painting(height, width, seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dropped_files_come_out_protected_and_bad_ones_are_reported(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    inbox = daemon.inbox
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # Copied in as a file manager does, into the inbox and a new nested subfolder.
    (elsewhere / "a.png").write_bytes(png_bytes(1))
    shutil.copy2(elsewhere / "a.png", inbox / "a.png")
    (inbox / "series" / "2024").mkdir(parents=True)
    (inbox / "series" / "2024" / "b.png").write_bytes(png_bytes(2, 300, 256))

    # A slow copy (SMB, a scanner): five chunks with pauses shorter than the stability delay.
    slow = png_bytes(3)
    with open(inbox / "slow.png", "wb") as f:
        for i in range(0, len(slow), len(slow) // 5 + 1):
            f.write(slow[i : i + len(slow) // 5 + 1])
            f.flush()
            time.sleep(0.3)

    # A browser download: written under a temporary name, then renamed.
    (inbox / "c.png.part").write_bytes(png_bytes(4))
    time.sleep(1.0)  # twice the stability delay: the .part file is settled, and must still be ignored
    (inbox / "c.png.part").rename(inbox / "c.png")

    # Bad inputs, then a good file after them: the daemon must keep going.
    (inbox / "notes.png").write_text("these are my notes, not a painting")
    (inbox / "truncated.png").write_bytes(png_bytes(5)[:3000])
    (inbox / "empty.png").write_bytes(b"")
    (elsewhere / "secret.png").write_bytes(png_bytes(6))
    (inbox / "escape.png").symlink_to(elsewhere / "secret.png")
    os.mkfifo(inbox / "pipe.png")
    daemon.wait_for(lambda: daemon.finished(9), "the first files and the bad inputs to end")
    (inbox / "after.png").write_bytes(png_bytes(7))

    good = ["a.png", "series/2024/b.png", "slow.png", "c.png", "after.png"]
    bad = {"notes.png": "not an image file", "truncated.png": "damaged or incomplete", "empty.png": "empty (0 bytes)",
           "escape.png": "symlink", "pipe.png": "FIFO"}
    originals = {name: sha(inbox / name) for name in good}
    daemon.wait_for(lambda: daemon.finished(len(good) + len(bad)), "every file to end")

    # One job per file, none for the temporary name; the slow file queued once, complete.
    for name in good + list(bad):
        assert len(daemon.jobs_for(name)) == 1, name
    assert daemon.jobs_for("c.png.part") == []
    assert daemon.jobs_for("slow.png")[0].sha256 == hashlib.sha256(slow).hexdigest()

    report = daemon.status()
    assert report["up"] is True
    assert report["counts"] == {"queued": 0, "running": 0, "done": 5, "failed": 5, "skipped": 0, "superseded": 0}
    done = {Path(d["path"]).relative_to(inbox).as_posix(): d for d in report["latest_done"]}
    assert sorted(done) == sorted(good)
    for name, entry in done.items():
        assert entry["output"] == str((daemon.export / name).with_suffix(".png"))
        metrics = entry["metrics"]
        assert metrics["steps"] == STEPS and 25 < metrics["psnr"] < 60
        assert 0 < metrics["max_delta"] <= metrics["strength"]
        assert metrics["protection_gain"] > 0 and "ssim" in metrics
        # What survives the common ways a platform serves an upload (engine.publishing).
        assert set(metrics["survival"]) == {"jpeg85", "jpeg75", "half+jpeg75"}
        assert all(served["protection_gain"] > 0 for served in metrics["survival"].values())
    text = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "status"], env=daemon.env, cwd=REPO,
                          capture_output=True, text=True, timeout=60).stdout
    assert "survives: jpeg85 " in text and " · half+jpeg75 " in text
    failures = {Path(f["path"]).name: f for f in report["failures"]}
    assert sorted(failures) == sorted(bad)
    for name, reason in bad.items():
        assert failures[name]["state"] == "failed" and reason in failures[name]["error"], failures[name]

    assert daemon.stop() == 0
    assert daemon.outputs() == sorted(good)  # mirrored, one each, no temp files left
    for name in good:
        assert sha(inbox / name) == originals[name]  # originals untouched
        with Image.open(inbox / name) as original, Image.open(daemon.export / name) as protected:
            assert protected.size == original.size
    assert (elsewhere / "secret.png").read_bytes() == png_bytes(6)
    assert not any(p.name == "secret.png" for p in daemon.export.rglob("*"))


def test_a_restarted_daemon_does_new_arrivals_and_never_redoes_old_ones(daemon: Daemon) -> None:
    (daemon.inbox / "before.png").write_bytes(png_bytes(11))
    daemon.start()
    daemon.wait_for(lambda: daemon.store.counts()["done"] == 1, "the first image")
    first = daemon.jobs_for("before.png")[0]
    output_stamp = Path(first.output_path).stat().st_mtime_ns
    assert daemon.stop() == 0

    # While it is down: new files, a copy of a done one under another name, a new subfolder.
    (daemon.inbox / "while-down.png").write_bytes(png_bytes(12))
    (daemon.inbox / "later").mkdir()
    (daemon.inbox / "later" / "deep.png").write_bytes(png_bytes(13))
    shutil.copy(daemon.inbox / "before.png", daemon.inbox / "before-copy.png")

    daemon.start()
    daemon.wait_for(lambda: daemon.finished(4), "the startup scan's files")
    assert daemon.stop() == 0

    jobs = {Path(job.source_path).relative_to(daemon.inbox).as_posix(): job for job in daemon.store.jobs()}
    assert {name: job.state for name, job in jobs.items()} == {
        "before.png": "done", "while-down.png": "done", "later/deep.png": "done", "before-copy.png": "skipped"}
    assert jobs["before-copy.png"].duplicate_of == first.id
    assert daemon.store.get(first.id).attempts == 1  # not protected a second time
    assert Path(first.output_path).stat().st_mtime_ns == output_stamp
    assert daemon.outputs() == ["before.png", "later/deep.png", "while-down.png"]


def test_a_settings_change_re_protects_each_image_into_its_own_name(daemon: Daemon) -> None:
    (daemon.inbox / "sub").mkdir()
    for seed, name in enumerate(("a.png", "sub/b.png")):
        (daemon.inbox / name).write_bytes(png_bytes(40 + seed))
    daemon.start()
    daemon.wait_for(lambda: daemon.store.counts()["done"] == 2, "the first protection")
    assert daemon.stop() == 0

    daemon.config.write_text(daemon.config.read_text().replace(f"steps = {STEPS}", f"steps = {STEPS + 1}"))
    daemon.start()
    daemon.wait_for(lambda: daemon.store.counts()["done"] == 4, "the protection with the new settings")
    assert daemon.stop() == 0

    # The current protected copy under the same name, not a pile of -2, -3; the history stays.
    assert daemon.outputs() == ["a.png", "sub/b.png"]
    for name in ("a.png", "sub/b.png"):
        old, new = sorted(daemon.jobs_for(name), key=lambda job: job.id)
        assert old.output_path == new.output_path == str(daemon.export / name)
        assert (old.metrics["steps"], new.metrics["steps"]) == (STEPS, STEPS + 1)
        assert hashlib.sha256((daemon.export / name).read_bytes()).hexdigest() == new.output_sha256


def test_a_file_that_changes_after_it_was_queued_is_queued_again_not_failed(daemon: Daemon) -> None:
    daemon.start()
    # A slow copy that pauses longer than the settle time (0.5 s): each pause queues what is there so far.
    content = png_bytes(51)
    third = len(content) // 3 + 1
    with open(daemon.inbox / "slow.png", "wb") as f:
        for i in range(0, len(content), third):
            f.write(content[i : i + third])
            f.flush()
            time.sleep(2.0)

    def protected() -> bool:
        jobs = daemon.jobs_for("slow.png")
        return any(job.state == "done" for job in jobs) and not any(j.state in ("queued", "running") for j in jobs)

    daemon.wait_for(protected, "the complete file's protection")
    jobs = daemon.jobs_for("slow.png")
    current = [job for job in jobs if job.sha256 == hashlib.sha256(content).hexdigest()]
    assert [job.state for job in current] == ["done"]
    stale = [job for job in jobs if job not in current]
    assert stale and {job.state for job in stale} == {"superseded"}, [(j.state, j.error) for j in stale]
    # Superseded by the watcher's next job for the path, or by the engine finding the file changed.
    assert all("superseded by #" in job.error or "changed after it was queued" in job.error for job in stale)

    report = daemon.status()
    assert report["failures"] == [] and report["counts"]["failed"] == 0
    retry = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "retry", "--failed"], env=daemon.env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert "queued again: 0 job(s)" in retry.stdout
    assert daemon.stop() == 0
    assert daemon.outputs() == ["slow.png"]


def test_a_file_renamed_before_it_is_protected_is_protected_under_its_new_name(daemon: Daemon, tmp_path: Path) -> None:
    """``mv a.png b.png`` while a.png waits in the queue: b.png is recorded as a skipped copy of a.png's job, and
    that job, finding a.png gone, hands over to it. Moved away before its copy arrives (the engine got there first),
    the job fails as gone, and ``fixative retry`` then protects the copy."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fixative.daemon.cli", *args], env=daemon.env, cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=True)

    inbox, elsewhere = daemon.inbox, tmp_path / "elsewhere"
    elsewhere.mkdir()
    (inbox / "a.png").write_bytes(png_bytes(61))
    cli("enqueue", str(inbox / "a.png"))
    (inbox / "a.png").rename(inbox / "b.png")
    cli("enqueue", str(inbox / "b.png"))  # what the watcher records for the new name
    (inbox / "c.png").write_bytes(png_bytes(62))
    cli("enqueue", str(inbox / "c.png"))
    (inbox / "c.png").rename(elsewhere / "c.png")  # out of the inbox before its engine came
    daemon.start()
    daemon.wait_for(lambda: daemon.finished(2), "the jobs to end")  # a.png's superseded: not counted
    [a], [b], [c] = (daemon.jobs_for(name) for name in ("a.png", "b.png", "c.png"))
    assert (b.state, b.output_path) == ("done", str(daemon.export / "b.png")), (a.state, a.error, b.state)
    assert a.state == "superseded" and "a.png is gone" in a.error and "its copy b.png" in a.error
    assert c.state == "failed" and "c.png is gone" in c.error

    (elsewhere / "c.png").rename(inbox / "d.png")  # moved back under another name: a copy of the failed job
    [d] = daemon.wait_for(lambda: daemon.jobs_for("d.png"), "the watcher to record d.png")
    assert (d.state, d.duplicate_of) == ("skipped", c.id)
    assert "queued again: 1 job(s)" in cli("retry", "--failed").stdout
    daemon.wait_for(lambda: daemon.jobs_for("d.png")[0].state == "done", "d.png protected")
    assert daemon.store.get(c.id).state == "superseded" and daemon.status()["failures"] == []
    assert daemon.stop() == 0
    assert daemon.outputs() == ["b.png", "d.png"]


def _make_unwritable(export: Path) -> tuple[Callable[[], None], str]:
    """Make the export folder unwritable for real; returns the fix and the reason the engine should give.

    chmod 0o500 is what a user would meet, but root (as in this project's CI
    container) has CAP_DAC_OVERRIDE and writes anyway. So probe, and where the
    chmod does not hold, put a regular FILE where the folder should be: every
    mkdir and open under it then fails with ENOTDIR/EEXIST, for root too. A
    read-only bind mount would be closer, but needs mount privileges that a
    container rarely has.
    """
    export.mkdir()
    export.chmod(0o500)
    try:
        (export / "probe").touch()
    except PermissionError:
        return (lambda: export.chmod(0o755)), "Permission denied"
    (export / "probe").unlink()
    export.rmdir()
    export.write_text("not a folder: the export folder is blocked by this file")
    return export.unlink, "a file is in the way where a folder should be"


def test_an_unwritable_export_folder_holds_the_job_with_a_reason_until_fixed(daemon: Daemon) -> None:
    fix, reason = _make_unwritable(daemon.export)
    daemon.start()
    (daemon.inbox / "sub").mkdir()
    original = png_bytes(21)
    (daemon.inbox / "sub" / "a.png").write_bytes(original)

    def held() -> dict | None:
        failures = daemon.status()["failures"] if daemon.store.failures() else []
        return failures[0] if failures else None

    failure = daemon.wait_for(held, "the export folder's failure to show in status")
    assert failure["path"] == str(daemon.inbox / "sub" / "a.png")
    assert failure["state"] == "queued"  # not failed for good: it will be retried
    assert "cannot write in the export folder" in failure["error"]
    assert reason in failure["error"]
    assert str(daemon.export) in failure["error"]
    text = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "status"], env=daemon.env, cwd=REPO,
                          capture_output=True, text=True, timeout=60).stdout
    assert "cannot write in the export folder" in text
    time.sleep(2)  # a few more tries while it is broken...
    job = daemon.jobs_for("sub/a.png")[0]
    assert job.state == "queued" and job.attempts == 0  # ...which do not use up the image's attempts

    fix()  # the artist frees the folder; the engine resumes by itself
    daemon.wait_for(lambda: daemon.store.counts()["done"] == 1, "the job once the folder is fixed", timeout=120)
    assert daemon.status()["failures"] == []
    assert daemon.stop() == 0
    assert daemon.outputs() == ["sub/a.png"]
    assert (daemon.inbox / "sub" / "a.png").read_bytes() == original


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[engine]\nsteps = 0\n", "engine.steps: must be ≥ 1 (got 0)"),
        ("[watcher]\nstabilty_seconds = 2\n", "watcher.stabilty_seconds: unknown setting (did you mean "
                                              "watcher.stability_seconds?)"),
        ('export_dir = "INBOX/protected"\n', "inside the inbox"),
        ("[worker]\nlease_seconds = 10\nheartbeat_seconds = 8\n", "worker.heartbeat_seconds: must be at most half"),
    ],
)
def test_run_and_watch_exit_78_naming_the_key(tmp_path: Path, config: str, message: str) -> None:
    inbox = tmp_path / "inbox"
    file = tmp_path / "config.toml"
    file.write_text(f'inbox = "{inbox}"\nstate_dir = "{tmp_path / "state"}"\n' + config.replace("INBOX", str(inbox)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIXATIVE_")} | {"HOME": str(tmp_path)}
    for command in ("run", "watch"):
        done = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "--config", str(file), command], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == EX_CONFIG, done.stderr
        assert done.stderr.startswith("fixative: config: ") and message in done.stderr
    assert not (tmp_path / "state").exists()  # nothing started


def test_run_exits_78_when_the_model_is_missing_and_says_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    daemon = Daemon(tmp_path, missing)
    daemon.inbox.rmdir()
    daemon.start(wait=False)  # run finds the model missing before it starts the watcher or an engine
    assert daemon.process.wait(timeout=120) == EX_CONFIG  # not restarted in a loop: the unit stops on 78
    assert daemon.log.read_text() == f"fixative: model path {missing} does not exist\n"
    assert not daemon.inbox.exists() and daemon.store.processes() == {}

    # An engine started alone (or on a machine where the model went away) says so too, and stops.
    engine = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "engine"], env=daemon.env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert engine.returncode == EX_CONFIG
    assert f"model path {missing} does not exist" in engine.stderr and "engine.cannot_load_model" in engine.stderr
    daemon.store.close()
