"""Settings: TOML file, FIXATIVE_* environment, one clear line per error, exit 78."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from fixative.daemon.settings import EX_CONFIG, ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh home with no fixative variables, so the developer's own settings never leak in."""
    for name in list(os.environ):
        if name.startswith(("FIXATIVE_", "XDG_")):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_live_in_the_home_folder(clean_environment: Path) -> None:
    settings = load_settings()  # no ~/.config/fixative/config.toml: fine, defaults
    home = clean_environment
    assert settings.inbox == home / "ToProtect"
    assert settings.export_dir == home / "Protected"
    assert settings.db_path == home / ".local/state/fixative/jobs.db"
    assert settings.archive_dir == home / "ToProtect-originals"
    assert settings.after == "keep" and settings.engine.mode == "sds"


def test_toml_file_then_environment_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", 'inbox = "~/Art"\n[engine]\nsteps = 7\nmodel = "/models/sd15"\n')
    settings = load_settings(config)
    assert settings.inbox.name == "Art" and settings.engine.steps == 7

    # Nested variables override one key of a table and keep the file's others.
    monkeypatch.setenv("FIXATIVE_ENGINE__STEPS", "50")
    monkeypatch.setenv("FIXATIVE_WORKER__MAX_ATTEMPTS", "5")
    settings = load_settings(config)
    assert (settings.engine.steps, settings.engine.model, settings.worker.max_attempts) == (50, "/models/sd15", 5)

    assert load_settings(config, inbox=tmp_path / "given").inbox == tmp_path / "given"


def test_default_file_and_fixative_config_variable(clean_environment: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    default = clean_environment / ".config/fixative/config.toml"
    default.parent.mkdir(parents=True)
    write(default, "[engine]\nsteps = 11\n")
    assert load_settings().engine.steps == 11
    monkeypatch.setenv("FIXATIVE_CONFIG", str(write(tmp_path / "other.toml", "[engine]\nsteps = 12\n")))
    assert load_settings().engine.steps == 12


def test_a_named_file_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "missing.toml")
    monkeypatch.setenv("FIXATIVE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings()


def test_every_problem_gets_one_line_naming_its_key_and_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", '[engine]\nsteps = 0\nmode = "magic"\nstpes = 3\n[worker]\nheartbeat_seconds = 600\n')
    monkeypatch.setenv("FIXATIVE_WATCHER__POLLING", "perhaps")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert sorted(caught.value.lines) == sorted([
        "FIXATIVE_WATCHER__POLLING: watcher.polling: should be a valid boolean, unable to interpret input (got 'perhaps')",
        f"{config}: engine.mode: should be 'advdm', 'mist', 'sds' or 'encoder' (got 'magic')",
        f"{config}: engine.steps: must be ≥ 1 (got 0)",
        f"{config}: engine.stpes: unknown setting (did you mean engine.steps?)",
        f"{config}: worker.heartbeat_seconds: must be at most half of lease_seconds (got 600 and 300)",
    ])


def test_a_bad_file_value_and_a_bad_variable_for_the_same_key_both_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The variable wins over the file, so pydantic sees only its value; the file's is wrong all the same."""
    config = write(tmp_path / "c.toml", '[engine]\nstrength = "stronk"\n')
    monkeypatch.setenv("FIXATIVE_ENGINE__STRENGTH", "abc")
    monkeypatch.setenv("fixative_worker__max_attempts", "0")  # read case-insensitively, named as it is spelt
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert caught.value.lines == [
        "fixative_worker__max_attempts: worker.max_attempts: must be ≥ 1 (got '0')",
        "FIXATIVE_ENGINE__STRENGTH: engine.strength: must be a number of levels or one of subtle, balanced, strong "
        "(got 'abc')",
        f"{config}: engine.strength: must be a number of levels or one of subtle, balanced, strong (got 'stronk'); "
        "FIXATIVE_ENGINE__STRENGTH overrides it for now",
    ]


def test_broken_toml_does_not_hide_the_environment_s_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", "inbox = \n")
    monkeypatch.setenv("FIXATIVE_ENGINE__MODE", "magic")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    first, second = caught.value.lines
    assert first.startswith(f"{config}: not valid TOML: ")
    assert second == "FIXATIVE_ENGINE__MODE: engine.mode: should be 'advdm', 'mist', 'sds' or 'encoder' (got 'magic')"


def test_a_value_given_in_code_is_named_by_its_key_alone(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, engine={"steps": 0})
    assert caught.value.lines == ["engine.steps: must be ≥ 1 (got 0)"]


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path / "c.toml", "inbox = \n"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"inbox": "~/Art", "export_dir": "~/Art/protected"}, "export_dir .* is inside the inbox"),
        ({"inbox": "~/Protected/in"}, "inbox .* is inside export_dir"),
        ({"after": "archive", "archive_dir": "~/ToProtect/done"}, "archive_dir: must not be inside inbox"),
        ({"after": "archive", "archive_dir": "~/Protected/originals"}, "archive_dir: must not be inside export_dir"),
    ],
)
def test_folders_that_would_feed_the_daemon_its_own_files(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(**overrides)


def _table_keys(text: str) -> dict[str, set[str]]:
    """Keys per table in a TOML text, counting commented-out ``# key = value`` lines."""
    keys: dict[str, set[str]] = {"": set()}
    table = ""
    for line in text.splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line.strip()):
            table = header.group(1)
            keys[table] = set()
        elif assignment := re.match(r"#? ?([a-z_]+) = ", line):
            keys[table].add(assignment.group(1))
    return keys


def test_config_example_documents_every_setting_with_its_default() -> None:
    example = REPO / "config.example.toml"
    documented = _table_keys(example.read_text())
    assert documented[""] == set(Settings.model_fields) - {
        name for name, f in Settings.model_fields.items() if isinstance(f.default, BaseModel)
    }
    for name, field in Settings.model_fields.items():
        if isinstance(field.default, BaseModel):
            assert documented.get(name) == set(type(field.default).model_fields), f"[{name}] in config.example.toml"
    # Its values are the defaults, so copying it changes nothing until edited.
    assert load_settings(example) == Settings()


def test_cli_exits_78_and_names_the_key(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "[engine]\nsteps = 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIXATIVE_")}
    for argv in (["--config", str(config), "status"], ["--config", str(tmp_path / "missing.toml"), "list"]):
        done = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", *argv], capture_output=True, text=True,
                              cwd=REPO, env=env)
        assert done.returncode == EX_CONFIG, done.stderr
        assert done.stdout == ""
    assert f"fixative: config: {config}: engine.steps: must be ≥ 1 (got 0)" in subprocess.run(
        [sys.executable, "-m", "fixative.daemon.cli", "--config", str(config), "status"],
        capture_output=True, text=True, cwd=REPO, env=env,
    ).stderr
