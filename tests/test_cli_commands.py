"""``fixative enqueue``, ``list`` and ``retry`` as real subprocesses on a real job table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fixative.daemon.cli import build_parser
from fixative.daemon.store import JobStore
from fixative.engine.options import EngineOptions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "XDG_"))}
    (tmp_path / "inbox" / "sub").mkdir(parents=True)
    return {**clean, "HOME": str(tmp_path), "FIXATIVE_INBOX": str(tmp_path / "inbox"),
            "FIXATIVE_STATE_DIR": str(tmp_path / "state")}


def fixative(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fixative.daemon.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)


def test_enqueue_validates_like_the_watcher(env: dict[str, str], tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "sub" / "a.png").write_bytes(b"a")
    (tmp_path / "copy.png").write_bytes(b"a")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "link.png").symlink_to(tmp_path / "copy.png")
    os.mkfifo(tmp_path / "pipe.png")

    done = fixative(env, "enqueue", str(inbox / "sub" / "a.png"), str(tmp_path / "copy.png"),
                    str(tmp_path / "notes.txt"), str(tmp_path / "link.png"), str(tmp_path / "pipe.png"))
    assert done.returncode == 1  # some were refused; the others are queued anyway
    assert "#1 queued" in done.stdout and "#2 skipped" in done.stdout and "same content as #1" in done.stdout
    for reason in ("not an image extension", "symlink", "not a regular file"):
        assert reason in done.stderr
    jobs = json.loads(fixative(env, "list", "--json").stdout)
    assert [(j["id"], j["state"], j["relative_path"]) for j in jobs] == [(2, "skipped", "copy.png"),
                                                                       (1, "queued", "sub/a.png")]


def test_retry_one_or_all_failed(env: dict[str, str], tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state" / "jobs.db")
    for name in ("a.png", "b.png"):
        (tmp_path / "inbox" / name).write_bytes(name.encode())
        store.enqueue(tmp_path / "inbox" / name, EngineOptions())
        job = store.claim("engine", 60)
        store.fail(job.id, "engine", "export folder unwritable", permanent=True)

    assert fixative(env, "retry", "1").returncode == 0
    assert fixative(env, "retry", "1").returncode == 1  # no longer failed
    assert "queued again: 1 job(s)" in fixative(env, "retry", "--failed").stdout
    assert store.counts()["failed"] == 0
    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args(["retry"])  # an id or --failed is required
    assert usage.value.code == 2


def test_list_says_when_there_are_no_jobs(env: dict[str, str], tmp_path: Path) -> None:
    assert fixative(env, "list").stdout == "no jobs yet\n"  # before the daemon ever ran
    store = JobStore(tmp_path / "state" / "jobs.db")
    (tmp_path / "inbox" / "a.png").write_bytes(b"a")
    store.enqueue(tmp_path / "inbox" / "a.png", EngineOptions())
    assert fixative(env, "list", "--state", "failed").stdout == "no failed jobs\n"
    assert json.loads(fixative(env, "list", "--json", "--state", "failed").stdout) == []


def test_a_newline_in_a_file_name_stays_on_its_job_line(env: dict[str, str], tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state" / "jobs.db")
    for name in ("two\nlines.png", "plain.png"):
        (tmp_path / "inbox" / name).write_bytes(name.encode())
        store.enqueue(tmp_path / "inbox" / name, EngineOptions())
    lines = fixative(env, "list").stdout.splitlines()
    assert len(lines) == 2 and lines[1].endswith("two\\nlines.png")
    assert json.loads(fixative(env, "list", "--json").stdout)[1]["source_path"].endswith("two\nlines.png")


def test_a_reader_that_stops_early_is_no_error(env: dict[str, str]) -> None:
    # `fixative status | head -1`: the pipe closes before status has written everything.
    for command in ("status", "list"):
        process = subprocess.Popen([sys.executable, "-m", "fixative.daemon.cli", command], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=60) == 128 + signal.SIGPIPE, stderr
        assert stderr == ""


def imported_by(env: dict[str, str], *argv: str) -> set[str]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "fixative.daemon.cli", *argv], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=60)
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "fixative.daemon.settings" in imported  # the import log is really there
    return {name.split(".")[0] for name in imported}


def test_each_command_imports_only_what_it_needs(env: dict[str, str], tmp_path: Path) -> None:
    # Every call paid for sqlite-utils (which imports numpy) and, once status could say why it
    # waits, for structlog (which imports rich): about 0.3 s of a 0.5 s `fixative --help`.
    for argv in (["--help"], ["protect", "--help"], ["doctor", "--help"]):
        assert imported_by(env, *argv) & {"sqlite_utils", "numpy", "structlog", "rich", "torch"} == set(), argv
    JobStore(tmp_path / "state" / "jobs.db").beat("watcher")
    assert imported_by(env, "status") & {"structlog", "rich", "torch"} == set()
