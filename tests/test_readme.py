"""The README is documentation people copy from: keep its commands true."""

from __future__ import annotations

import re
from pathlib import Path

from fixative.daemon.cli import build_parser
from fixative.daemon.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _subcommands() -> set[str]:
    parser = build_parser()
    (commands,) = [action for action in parser._actions if action.dest == "command"]
    return set(commands.choices)


def test_every_fixative_command_in_the_readme_exists() -> None:
    # Only code spans count: in prose "fixative is..." is not a command.
    fenced = re.findall(r"```sh\n(.*?)```", README, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", README, flags=re.S))
    code = "\n".join(fenced + inline)
    mentioned = set(re.findall(r"fixative ([a-z][a-z-]+)", code))
    assert {"run", "protect", "status", "demo", "doctor", "model"} <= mentioned
    assert mentioned <= _subcommands()


def test_ci_runs_the_readme_test_command() -> None:
    (test_command,) = [line for line in README.splitlines() if "pytest" in line and line.startswith("python3 -m venv")]
    ci = (ROOT / ".ci" / "run").read_text()
    for step in test_command.split(" && "):
        core = step.split("pip install ")[-1] if "pip install" in step else step
        assert core.strip() in ci, f"README test step not in .ci/run: {step}"


def test_environment_variables_in_the_readme_name_real_settings() -> None:
    for variable in re.findall(r"FIXATIVE_([A-Z_]+[A-Z])", README):
        if variable == "CONFIG":
            continue
        top, _, nested = variable.lower().partition("__")
        assert top in Settings.model_fields, variable
        if nested:
            assert nested in Settings.model_fields[top].annotation.model_fields, variable


def test_sources_cite_only_what_ships_with_them() -> None:
    """A citation of a notes file that is not in the repository (a REFERENCE notes file was one) sends readers nowhere."""
    shipped = [path for folder in ("engine", "daemon", "bench", "tests") for path in (ROOT / folder).rglob("*.py")]
    shipped += [ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "config.example.toml"]
    for path in shipped:
        for cited in re.findall(r"\b([A-Za-z][\w/.-]*\.md)\b", path.read_text()):
            assert (ROOT / cited).exists() or (path.parent / cited).exists(), f"{path.relative_to(ROOT)} cites {cited}"
