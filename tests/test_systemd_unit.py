"""The systemd unit: it must agree with the code, and `systemd-analyze --user verify` must accept it."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.lock import EXIT_ALREADY_RUNNING
from daemon.settings import EX_CONFIG

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "fixative.service"


def test_unit_agrees_with_the_code() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecStart"] == "%h/.local/bin/fixative run"
    assert set(service["RestartPreventExitStatus"].split()) == {str(EX_CONFIG), str(EXIT_ALREADY_RUNNING)}
    assert service["Restart"] == "on-failure"
    for hiding in ("ProtectHome", "PrivateDevices", "DevicePolicy", "ProtectSystem"):
        assert hiding not in service  # the GPU (/dev/nvidia*) and the home folder must stay visible


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify insists that ExecStart exists; ~/.local/bin/fixative is not installed in a test run.
    unit = tmp_path / "fixative.service"
    unit.write_text(UNIT.read_text().replace("%h/.local/bin/fixative", sys.executable))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)  # --user needs a runtime folder, which CI containers lack
    done = subprocess.run(["systemd-analyze", "--user", "verify", str(unit)], capture_output=True, text=True,
                          env={"XDG_RUNTIME_DIR": str(runtime), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    # It exits 0 on many mistakes (an unknown key, a bad value) and only warns on stderr.
    assert (done.returncode, done.stderr) == (0, "")
