"""sd_notify over a real datagram socket, and the log format choice (JSON off a TTY, stdlib routed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fixative.daemon.notify import notify, watchdog_interval

REPO = Path(__file__).resolve().parents[1]


def test_notify_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_one_datagram(abstract: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        if abstract:  # what systemd itself uses: "@name" means a leading NUL byte
            name = f"fixative-test-{uuid.uuid4().hex}"
            listener.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            listener.bind(str(tmp_path / "notify"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert notify("READY=1", "STATUS=idle · 0 queued")
        assert listener.recv(4096).decode() == "READY=1\nSTATUS=idle · 0 queued"


def test_notify_never_raises_when_systemd_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify("WATCHDOG=1") is False


def test_notify_never_blocks_on_a_full_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:  # bound, never read
        listener.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        sent = [notify(f"STATUS=line {n}") for n in range(5000)]
    assert sent[0] and not sent[-1]


def test_watchdog_interval_is_half_of_watchdogsec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "600000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 300
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None


def test_logs_are_json_lines_off_a_terminal_including_library_loggers() -> None:
    code = """
import logging, structlog
from fixative.daemon.logs import configure_logging
configure_logging()
structlog.get_logger().info("job.done", job_id=3, psnr=39.5)
logging.getLogger("diffusers.models").warning("library says %s", "hi")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    ours, library = (json.loads(line) for line in done.stderr.splitlines())
    assert (ours["event"], ours["job_id"], ours["level"]) == ("job.done", 3, "info")
    assert (library["event"], library["logger"], library["level"]) == ("library says hi", "diffusers.models", "warning")


def test_a_field_cannot_add_lines_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file name in a STATUS, newline and all: systemd reads one assignment a line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert notify("STATUS=protecting a\nMAINPID=1\n\x1b[2J.png")
        assert listener.recv(4096).decode() == r"STATUS=protecting a\nMAINPID=1\n\x1b[2J.png"
