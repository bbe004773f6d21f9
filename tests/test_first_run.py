"""A first run on a fresh machine: ``fixative init``, ``doctor``'s config line, and ``run`` without the model.

Real subprocesses of the real command line, in a fresh HOME whose XDG folders
and Hugging Face cache point into tmp_path.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_terminal
from fixative.daemon.doctor import _config_source
from fixative.daemon.settings import EX_CONFIG, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def env(home: Path, tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "XDG_", "HF_", "JOURNAL_"))}
    return {**clean, "HOME": str(home), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def fixative(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fixative.daemon.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_init_writes_the_example_where_the_loader_reads_and_replaces_nothing(
    env: dict[str, str], home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = home / ".config" / "fixative" / "config.toml"
    done = fixative(env, "init")
    assert done.returncode == 0, done.stderr
    assert config.read_text() == (REPO / "daemon" / "config.example.toml").read_text()
    assert str(config) in done.stdout and "fixative.service" in done.stdout
    unit = Path(done.stdout.split("copy ")[1].split(" to ")[0])
    assert unit.read_text() == (REPO / "systemd" / "fixative.service").read_text()

    # The loader, in the same fresh HOME, reads it (its values are the defaults).
    for name in [name for name in os.environ if name.startswith(("FIXATIVE_", "XDG_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    assert load_settings() == Settings()

    config.write_text('[engine]\nsteps = 7\n')  # the artist's edits
    again = fixative(env, "init")
    assert again.returncode == 1
    assert again.stderr.strip().startswith(f"fixative: {config} already exists, and init replaces nothing")
    assert config.read_text() == '[engine]\nsteps = 7\n'

    # XDG_CONFIG_HOME moves it, for init as for the loader.
    elsewhere = home / "xdg"
    moved = fixative({**env, "XDG_CONFIG_HOME": str(elsewhere)}, "init")
    assert moved.returncode == 0, moved.stderr
    assert (elsewhere / "fixative" / "config.toml").is_file()


def test_doctor_names_the_config_file_it_read_or_says_it_uses_the_defaults(
    env: dict[str, str], home: Path, tmp_path: Path
) -> None:
    config = tmp_path / "mine.toml"
    config.write_text(f'inbox = "{tmp_path / "in"}"\n')
    done = fixative({**env, "FIXATIVE_ENGINE__STEPS": "5"}, "--config", str(config), "doctor")
    assert f"ok    config: read {config}, with FIXATIVE_ENGINE__STEPS from the environment" in done.stdout.splitlines()

    level, line = _config_source(home / ".config" / "fixative" / "config.toml")
    assert line.startswith(f"config: no file at {home / '.config' / 'fixative' / 'config.toml'}, so the defaults")


def test_run_without_the_model_says_so_in_plain_text_and_creates_no_folder(env: dict[str, str], home: Path) -> None:
    done = fixative({**env, "FIXATIVE_ENGINE__MODEL": "someone/not-downloaded"}, "run")
    assert done.returncode == EX_CONFIG
    [line] = done.stderr.splitlines()
    assert line.startswith("fixative: model 'someone/not-downloaded' is not on this machine.")
    assert "`fixative model pull someone/not-downloaded`" in line
    assert list(home.iterdir()) == []  # no ~/ToProtect, no ~/.local/state/fixative


LOG_A_LINE = """
import structlog
from fixative.daemon.logs import configure_logging
configure_logging()
structlog.get_logger().info("run.engine_started", engine="cpu", pid=42)
"""


def test_logs_on_a_terminal_are_readable_lines_even_with_journal_stream_set(env: dict[str, str]) -> None:
    """A terminal opened by a systemd user service inherits JOURNAL_STREAM; its stderr is still the terminal."""
    controller, terminal = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", LOG_A_LINE], stderr=terminal, cwd=REPO,
                             env={**env, "JOURNAL_STREAM": "8:12345"})
    os.close(terminal)
    seen = read_terminal(controller)
    assert child.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", seen.decode())  # the colours
    assert "run.engine_started" in text and "engine=cpu" in text and not text.lstrip().startswith("{")

    piped = subprocess.run([sys.executable, "-c", LOG_A_LINE], capture_output=True, text=True, cwd=REPO, env=env)
    assert piped.stderr.startswith('{"engine": "cpu"')  # a pipe or the journal: one JSON object a line
