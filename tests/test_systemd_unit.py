"""The systemd unit: it must agree with the code, and `systemd-analyze --user verify` must accept it."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fixative.daemon.lock import EXIT_ALREADY_RUNNING
from fixative.daemon.settings import EX_CONFIG
from fixative.daemon.liveness import STALLED_AFTER_SECONDS, engine_name
from test_daemon_end_to_end import Daemon, png_bytes
from test_status_cli import HOSTILE

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "fixative.service"


def unit_service(path: Path = UNIT) -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(path)
    return unit["Service"]


def test_unit_agrees_with_the_code() -> None:
    service = unit_service()
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecStart"] == "%h/.local/bin/fixative run"
    assert set(service["RestartPreventExitStatus"].split()) == {str(EX_CONFIG), str(EXIT_ALREADY_RUNNING)}
    assert service["Restart"] == "on-failure"
    for hiding in ("ProtectHome", "PrivateDevices", "DevicePolicy", "ProtectSystem"):
        assert hiding not in service  # the GPU (/dev/nvidia*) and the home folder must stay visible


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    verify(UNIT, tmp_path)


def verify(unit: Path, tmp_path: Path) -> None:
    """``systemd-analyze --user verify`` must accept ``unit`` without a word."""
    # verify insists that ExecStart exists; ~/.local/bin/fixative is not installed in a test run.
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("%h/.local/bin/fixative", sys.executable))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)  # --user needs a runtime folder, which CI containers lack
    done = subprocess.run(["systemd-analyze", "--user", "verify", str(copy)], capture_output=True, text=True,
                          env={"XDG_RUNTIME_DIR": str(runtime), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    # It exits 0 on many mistakes (an unknown key, a bad value) and only warns on stderr.
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("name, command, kind", [("fixative-engine", "engine", "notify"), ("fixative-watch", "watch", "exec")])
def test_the_units_for_several_machines_agree_with_the_code(tmp_path: Path, name: str, command: str, kind: str) -> None:
    service = unit_service(UNIT.with_name(f"{name}.service"))
    assert (service["ExecStart"], service["Type"]) == (f"%h/.local/bin/fixative {command}", kind)
    assert set(service["RestartPreventExitStatus"].split()) == {str(EX_CONFIG), str(EXIT_ALREADY_RUNNING)}
    if kind == "notify":  # `fixative engine` pings only while its loop moves, as `run` does
        assert float(service["WatchdogSec"]) == STALLED_AFTER_SECONDS
    if shutil.which("systemd-analyze"):
        verify(UNIT.with_name(f"{name}.service"), tmp_path)


def test_the_watchdog_is_the_stall_limit() -> None:
    # One limit: status calls the engine STALLED when systemd restarts it, not 15 minutes later.
    assert float(unit_service()["WatchdogSec"]) == STALLED_AFTER_SECONDS


class FakeSystemd:
    """A notify socket that keeps every datagram ``fixative run`` sends, as systemd would receive them."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="fx-", dir="/tmp")  # a socket path must fit in 108 bytes
        self.address = os.path.join(self.folder, "notify")
        self.messages: list[str] = []
        self.pings: list[float] = []
        self.done = threading.Event()

    def __enter__(self) -> FakeSystemd:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.listener.bind(self.address)
        self.listener.settimeout(0.2)
        self.thread = threading.Thread(target=self.listen, daemon=True)
        self.thread.start()
        return self

    def listen(self) -> None:
        while not self.done.is_set():
            try:
                message = self.listener.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(message)
            if "WATCHDOG=1" in message.split("\n"):
                self.pings.append(time.monotonic())

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.listener.close()
        shutil.rmtree(self.folder)


def test_a_hung_engine_is_restarted_alone_and_the_watchdog_keeps_the_healthy_one(tmp_path: Path,
                                                                                 tiny_model: Path) -> None:
    """`fixative run` with two engines under a fake systemd: one hangs.

    The supervisor kills and restarts the hung one once it has not moved for the
    stall limit (WatchdogSec, shortened here), and keeps pinging the watchdog
    meanwhile: a restart of the whole service would take the healthy engine down
    too. Pings for time alone would hide the hang; here the hung engine is gone
    by the time the limit has passed.
    """
    watchdog_seconds = 8.0
    with FakeSystemd() as systemd:
        pings, messages = systemd.pings, systemd.messages
        daemon = Daemon(tmp_path, tiny_model, NOTIFY_SOCKET=systemd.address,
                        WATCHDOG_USEC=str(int(watchdog_seconds * 1e6)))
        daemon.config.write_text(daemon.config.read_text() + 'devices = ["cpu", "cpu"]\n')  # [engine] is the last table
        hung, healthy = engine_name("cpu"), engine_name("cpu#2")
        try:
            daemon.start()
            beats = {name: daemon.wait_for(lambda name=name: (beat := daemon.beat(name))
                                           and beat["status"].startswith("idle") and beat, f"{name} to be ready")
                     for name in (hung, healthy)}
            daemon.wait_for(lambda: len(pings) >= 2, "watchdog pings while the engines idle")
            os.kill(beats[hung]["pid"], signal.SIGSTOP)  # hung: no step, no heartbeat
            hung_at = time.monotonic()
            daemon.wait_for(lambda: (beat := daemon.beat(hung)) and beat["pid"] != beats[hung]["pid"]
                            and beat["status"].startswith("idle"), "the hung engine to be restarted")
            assert time.monotonic() - hung_at > watchdog_seconds  # not before the stall limit
            assert daemon.beat(healthy)["pid"] == beats[healthy]["pid"]  # the healthy one was left alone
            # systemd fires WatchdogSec after the last ping: no gap that long, the hang included.
            gaps = [later - earlier for earlier, later in zip(pings, pings[1:]) if later > hung_at]
            assert gaps and max(gaps) < watchdog_seconds, (gaps, messages[-5:])
            assert "run.engine_stalled" in daemon.log.read_text()
            # READY once, when the first engine had loaded; not again for the restarted one.
            assert sum("READY=1" in message.split("\n") for message in messages) == 1
            assert daemon.stop() == 0
        finally:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.kill()
            daemon.store.close()


def test_a_file_name_cannot_add_assignments_to_the_datagrams_systemd_reads(tmp_path: Path, tiny_model: Path) -> None:
    """sd_notify's fields are lines: a newline in a name would let the file set WATCHDOG=trigger or MAINPID."""
    with FakeSystemd() as systemd:
        # 40 steps: the job must still be running when `fixative run` reads the engine's beat (every second).
        daemon = Daemon(tmp_path, tiny_model, NOTIFY_SOCKET=systemd.address, FIXATIVE_ENGINE__STEPS="40")
        try:
            daemon.start()
            (daemon.inbox / HOSTILE).write_bytes(png_bytes(3))
            daemon.wait_for(lambda: any("STATUS=protecting" in message for message in systemd.messages),
                            "a STATUS line naming the file")
            daemon.wait_for(lambda: daemon.finished(1), "the image")
            assert daemon.stop() == 0
        finally:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.kill()
            daemon.store.close()
    lines = [line for message in systemd.messages for line in message.split("\n")]
    assert {line.split("=")[0] for line in lines} <= {"READY", "STATUS", "WATCHDOG", "STOPPING"}, lines
    assert not any("\x1b" in line for line in lines)
    assert any(line.startswith(r"STATUS=protecting a\nWATCHDOG=trigger\nMAINPID=1\n\x1b[2J.png") for line in lines)
