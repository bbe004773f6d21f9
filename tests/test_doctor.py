"""``fixative doctor``'s folder checks and wording: they must agree with what ``run`` does and the README says."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fixative.daemon.doctor import CPU_SPEED, FAIL, OK, WARN, _engine_checks, _folder_checks
from fixative.daemon.settings import Settings
from fixative.daemon.watcher import WatcherConfigError, run_watcher

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def settings(tmp_path: Path, inbox: Path) -> Settings:
    return Settings(inbox=inbox, export_dir=tmp_path / "export", state_dir=tmp_path / "state")


def inbox_check(settings: Settings) -> tuple[str, str]:
    [check] = [(level, line) for level, line in _folder_checks(settings) if line.startswith("inbox:")]
    return check


def test_an_inbox_whose_parent_is_missing_fails_as_run_does(tmp_path: Path) -> None:
    missing = settings(tmp_path, tmp_path / "unmounted-share" / "ToProtect")
    level, line = inbox_check(missing)
    assert level == FAIL and f"{tmp_path / 'unmounted-share'} does not exist" in line
    with pytest.raises(WatcherConfigError):  # what `fixative run` exits 78 on
        run_watcher(missing, threading.Event())


def test_an_inbox_that_does_not_exist_yet_is_fine_as_run_creates_it(tmp_path: Path) -> None:
    level, line = inbox_check(settings(tmp_path, tmp_path / "ToProtect"))
    assert level == OK and "will be created" in line


def test_the_cpu_speed_agrees_with_the_readme() -> None:
    # bench/README.md: sds at 512x512 on 2 quiet cores, 889 s per image. The README says "about 15 minutes".
    assert "about 15 minutes" in CPU_SPEED and "one 512² image takes about 15 minutes" in " ".join(README.split())
    assert "hour" not in CPU_SPEED


def test_each_engine_device_is_checked(tmp_path: Path) -> None:
    """[engine] devices: doctor checks every device an engine will run on, not only [engine] device."""
    devices = Settings(inbox=tmp_path / "inbox", state_dir=tmp_path / "state", engine={"devices": ["cpu", "cuda:7"]})
    checks = dict((line.split(": ")[0], (level, line)) for level, line in _engine_checks(devices))
    assert checks["device cpu"][0] == WARN and CPU_SPEED in checks["device cpu"][1]
    level, line = checks["device cuda:7"]
    # No GPU here, or fewer than eight: either way the engine on cuda:7 could not start.
    assert level == FAIL and "device 'cuda:7' was asked for, but torch sees" in line
