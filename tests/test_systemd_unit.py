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
from test_daemon_end_to_end import Daemon

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
    folder = tempfile.mkdtemp(prefix="fx-", dir="/tmp")  # a socket path must fit in 108 bytes
    address = os.path.join(folder, "notify")
    pings: list[float] = []
    messages: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(0.2)

        def listen() -> None:
            while not done.is_set():
                try:
                    message = listener.recv(4096).decode()
                except TimeoutError:
                    continue
                messages.append(message)
                if "WATCHDOG=1" in message.split("\n"):
                    pings.append(time.monotonic())

        done = threading.Event()
        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        daemon = Daemon(tmp_path, tiny_model, NOTIFY_SOCKET=address, WATCHDOG_USEC=str(int(watchdog_seconds * 1e6)))
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
            done.set()
            thread.join()
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.kill()
            daemon.store.close()
            shutil.rmtree(folder)
