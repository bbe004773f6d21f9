"""A full state disk: the daemon waits, says why, and resumes by itself. A real small file system, really filled."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from fixative.daemon.liveness import engine_name
from test_daemon_end_to_end import Daemon, png_bytes


@pytest.fixture
def small_state_disk(tmp_path: Path):
    """A 16 MiB tmpfs where the daemon's state folder goes (mounting needs root, as in CI's container).

    Not 4 MiB: SQLite checkpoints its WAL only at 1000 pages (4 MiB) and keeps the
    file at that size, so the heartbeats written while an engine starts slowly on a
    loaded machine can fill a 4 MiB disk before the test does. That is the likely
    cause of the ENOSPC seen twice when opening the filler in full runs under load.
    """
    state = tmp_path / "state"
    state.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(state)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield state
    subprocess.run(["umount", "-l", str(state)], check=True)


def fill(folder: Path) -> Path:
    """Write a file until the disk refuses more; returns it."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_a_full_state_disk_pauses_the_daemon_until_there_is_space(small_state_disk: Path, tmp_path: Path,
                                                                  tiny_model: Path) -> None:
    daemon = Daemon(tmp_path, tiny_model)
    try:
        daemon.start()
        daemon.wait_for(lambda: (beat := daemon.beat(engine_name("cpu"))) and beat["status"].startswith("idle"),
                        "the engine to be ready")
        filler = fill(small_state_disk)
        (daemon.inbox / "a.png").write_bytes(png_bytes(1))

        waiting = daemon.wait_for(lambda: daemon.status()["waiting"], "status to say why it waits", timeout=60)
        assert "disk is full" in waiting and str(small_state_disk) in waiting
        assert daemon.status()["up"] is False
        daemon.wait_for(lambda: "watcher.state_disk_full" in daemon.log.read_text(), "the watcher to log the wait")
        assert daemon.process.poll() is None  # `fixative run` waits rather than exiting 1
        (tmp_path / "by-hand.png").write_bytes(png_bytes(2))  # on another disk: only the job table is full
        by_hand = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "enqueue", str(tmp_path / "by-hand.png")],
                                 env=daemon.env, cwd=daemon.root, capture_output=True, text=True, timeout=60)
        assert by_hand.returncode == 1 and "Traceback" not in by_hand.stderr
        assert by_hand.stderr.startswith("fixative: the state folder's disk is full"), by_hand.stderr

        filler.unlink()
        daemon.wait_for(lambda: daemon.finished(1), "the file to be protected once there is space", timeout=120)
        assert daemon.outputs() == ["a.png"]
        daemon.wait_for(lambda: daemon.status()["up"], "status to say up again")
        assert daemon.stop() == 0
        log = daemon.log.read_text()
        assert "watcher.state_disk_resumed" in log and "Traceback" not in log, log[-3000:]
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        daemon.store.close()
