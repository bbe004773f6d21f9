"""``fixative doctor`` and ``status`` with a PostgreSQL job table: reachable, which schema, and shared folders.

"Machines" here are the same code under another host name, against one real
PostgreSQL database and real folders; a folder a machine does not share is a
marker file it cannot see.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

import fixative.daemon.store
from fixative.daemon.doctor import FAIL, OK, WARN, store_checks
from fixative.daemon.settings import EX_CONFIG, ConfigError, Settings, load_settings
from fixative.daemon.status import build_report, render
from fixative.daemon.store import JobStore, describe_store, open_store
from fixative.daemon.store_postgres import MIGRATIONS as POSTGRESQL_MIGRATIONS, redact
from fixative.daemon.store_sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from fixative.engine.options import EngineOptions

REPO = Path(__file__).resolve().parents[1]


def machine(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: name)


def settings(root: Path, state_db: str | None) -> Settings:
    return Settings(inbox=root / "inbox", export_dir=root / "export", state_dir=root / "state", state_db=state_db)


def checks(settings: Settings) -> dict[str, tuple[str, str]]:
    """{what: (level, line)}, keyed by the line's first word."""
    return {line.split(":")[0]: (level, line) for level, line in store_checks(settings)}


def test_machines_that_share_the_export_folder_see_each_others_markers(tmp_path, postgres_url, monkeypatch) -> None:
    shared = settings(tmp_path, postgres_url)
    machine(monkeypatch, "a")
    level, line = checks(shared)["export_dir"]
    assert level == WARN and "no other machine" in line  # nothing to compare with yet
    assert (tmp_path / "export" / ".fixative-shared-a").is_file()

    machine(monkeypatch, "b")
    assert checks(shared)["export_dir"] == (OK, "export_dir: the same folder as on a")

    # c's export folder is not a's: a's marker is not there (here: removed, as if on another disk).
    (tmp_path / "export" / ".fixative-shared-a").unlink()
    machine(monkeypatch, "c")
    level, line = checks(shared)["export_dir"]
    assert level == FAIL and "a's marker" in line and "not visible here" in line


def test_the_doctor_never_writes_through_a_symlink_planted_as_its_marker(tmp_path, postgres_url, monkeypatch) -> None:
    """Anyone who can write to the shared folder could point the marker at a file this machine's user owns."""
    machine(monkeypatch, "a")
    victim = tmp_path / "notes.txt"
    victim.write_text("the artist's own file")
    (tmp_path / "export").mkdir()
    marker = tmp_path / "export" / ".fixative-shared-a"
    marker.symlink_to(victim)
    level, line = checks(settings(tmp_path, postgres_url))["export_dir"]
    assert level == WARN and "no other machine" in line
    assert victim.read_text() == "the artist's own file"
    assert not marker.is_symlink() and marker.is_file()  # its own marker, in the link's place
    machine(monkeypatch, "b")
    assert checks(settings(tmp_path, postgres_url))["export_dir"] == (OK, "export_dir: the same folder as on a")


def test_the_inbox_is_checked_through_the_queued_images_without_writing_there(tmp_path, postgres_url) -> None:
    config = settings(tmp_path, postgres_url)
    (tmp_path / "inbox").mkdir()
    assert checks(config)["inbox"][0] == OK  # nothing queued: nothing to tell
    store = JobStore(postgres_url)
    for name in ("a.png", "b.png"):
        (tmp_path / "inbox" / name).write_bytes(name.encode())
        store.enqueue(tmp_path / "inbox" / name, EngineOptions(), inbox=tmp_path / "inbox")
    assert checks(config)["inbox"] == (OK, "inbox: the 2 latest queued images are visible here")
    for name in ("a.png", "b.png"):  # as the inbox of a share this machine does not mount
        (tmp_path / "inbox" / name).unlink()
    level, line = checks(config)["inbox"]
    assert level == FAIL and "none of the 2 latest queued images is visible here" in line
    assert list((tmp_path / "inbox").iterdir()) == []  # the doctor wrote nothing there


def test_the_schema_version_is_checked(tmp_path, postgres_url) -> None:
    config = settings(tmp_path, postgres_url)
    level, line = checks(config)["job table"]
    assert level == OK and f"schema version {len(POSTGRESQL_MIGRATIONS)}" in line
    store = open_store(config)
    with store.backend.write():  # a newer fixative on another machine migrated the table
        store.backend.execute("INSERT INTO fixative_schema (version, applied_at) VALUES (99, 0)", {})
    level, line = checks(config)["job table"]
    assert level == FAIL and "schema version 99" in line and "upgrade fixative on this machine" in line


def test_an_unreachable_database_fails_the_doctor_and_status_waits_without_showing_the_password(tmp_path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = settings(tmp_path, f"postgresql://fixative:hunter2@127.0.0.1:{port}/fixative")
    [(level, line)] = store_checks(config)
    assert level == FAIL and "job database is unavailable" in line
    report = build_report(config)
    assert not report["up"] and "job database is unavailable" in report["waiting"]
    shown = [line, render(report), str(report)]
    assert all("hunter2" not in text for text in shown)
    assert f"postgresql://fixative:***@127.0.0.1:{port}/fixative" in report["database"]


def test_a_full_state_disk_is_no_reason_to_wait_when_the_job_table_is_elsewhere(tmp_path, postgres_url,
                                                                                monkeypatch) -> None:
    monkeypatch.setattr(fixative.daemon.store, "FULL_BELOW_BYTES", 1 << 62)  # every disk "full"
    for state_db in (None, postgres_url):
        open_store(settings(tmp_path, state_db)).beat("watcher")
    assert "disk is full" in build_report(settings(tmp_path, None))["waiting"]
    assert build_report(settings(tmp_path, postgres_url))["waiting"] is None


def test_state_db_must_be_a_postgresql_url_and_is_not_echoed(tmp_path) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, state_db="mysql://root:hunter2@db/fixative")
    assert "state_db: must be a postgresql:// URL" in str(error.value) and "hunter2" not in str(error.value)


def test_without_psycopg_a_postgresql_url_is_a_config_error_naming_the_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed: importing it fails
    config = settings(tmp_path, "postgresql://fixative@db/fixative")
    with pytest.raises(ConfigError, match=re.escape("pip install 'fixative[postgresql]'")):
        open_store(config)
    [(level, line)] = store_checks(config)
    assert level == FAIL and "fixative[postgresql]" in line


def test_sqlite_needs_no_database_server(tmp_path) -> None:
    config = settings(tmp_path, None)
    [(level, line)] = store_checks(config)
    assert level == OK and "will be created" in line and not (tmp_path / "state").exists()
    open_store(config).close()
    [(level, line)] = store_checks(config)
    assert level == OK and f"{config.db_path} (schema version {len(SQLITE_MIGRATIONS)})" in line


# Every character a URL treats specially: `#` and `?` that libpq reads raw but a URL parser takes for a
# fragment and a query, `%` and a space that libpq refuses raw, `@` and `/` that end libpq's user part.
HOSTILE_PASSWORD = "s3cr#t?w0rd% @y0ur/5elf"
SHOWN_IF_LEAKED = ("s3cr", "w0rd", "y0ur", "5elf")  # a piece of it in every form, raw or percent-encoded


def cli_env(config: Settings) -> dict[str, str]:
    """The environment of a real ``fixative`` process on ``config``'s folders and job table."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "PG"))}
    return {**env, "HOME": str(config.state_dir.parent), "FIXATIVE_INBOX": str(config.inbox),
            "FIXATIVE_EXPORT_DIR": str(config.export_dir), "FIXATIVE_STATE_DIR": str(config.state_dir),
            "FIXATIVE_STATE_DB": config.state_db}


def cli(config: Settings, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fixative.daemon.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, env=cli_env(config), timeout=300)


def assert_hidden(*texts: str) -> None:
    leaked = [(part, text) for text in texts for part in SHOWN_IF_LEAKED if part in text]
    assert leaked == [], leaked


def test_a_hostile_password_is_never_shown_by_status_list_doctor_or_the_journal(tmp_path, postgres_cluster) -> None:
    """The password as libpq reads it is the one hidden, whatever characters it holds.

    Percent-encoded, the whole hostile password reaches the server, which checks
    it; raw, `#` and `?` are part of the password to libpq, not a fragment.
    """
    port = postgres_cluster.port
    postgres_cluster.role("fx_hostile", HOSTILE_PASSWORD, owns="hostile")
    postgres_cluster.role("fx_raw", "s3cr#t?w0rd", owns="raw")
    (tmp_path / "inbox").mkdir()
    for user, url in (("fx_hostile", f"postgresql://fx_hostile:{quote(HOSTILE_PASSWORD, safe='')}@127.0.0.1:{port}/hostile"),
                      ("fx_raw", f"postgresql://fx_raw:s3cr#t?w0rd@127.0.0.1:{port}/raw")):
        config = settings(tmp_path, url)
        store = open_store(config)  # connects: the server took the password
        (tmp_path / "inbox" / "a.png").write_bytes(b"pixels")
        store.enqueue(tmp_path / "inbox" / "a.png", EngineOptions(), inbox=tmp_path / "inbox")
        store.beat("watcher", "watching")
        store.close()
        shown = f"postgresql://{user}:***@127.0.0.1:{port}/{user.removeprefix('fx_')}"
        report = cli(config, "status", "--json")
        assert json.loads(report.stdout)["database"] == shown, report.stderr
        status, listed, doctor = cli(config, "status"), cli(config, "list"), cli(config, "doctor")
        assert listed.returncode == 0 and "a.png" in listed.stdout, listed.stderr
        assert f"job table: {shown} (schema version" in doctor.stdout, doctor.stdout
        assert_hidden(*(done.stdout + done.stderr for done in (report, status, listed, doctor)))

    # The same URLs, with the server away: status waits, and the journal says why.
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        away = s.getsockname()[1]
    config = settings(tmp_path, f"postgresql://fx_raw:s3cr#t?w0rd@127.0.0.1:{away}/raw")
    status = cli(config, "status")
    assert status.returncode == 3 and "WAITING (the job database is unavailable (postgresql://fx_raw:***@" in status.stdout
    watcher = subprocess.Popen([sys.executable, "-m", "fixative.daemon.cli", "watch"], cwd=REPO, text=True,
                               stderr=subprocess.PIPE, env=cli_env(config))
    journal = []
    for line in watcher.stderr:  # JSON lines: stderr is no terminal
        journal.append(line)
        if '"watcher.store_unavailable"' in line:
            break
    watcher.send_signal(signal.SIGTERM)
    journal += watcher.stderr.readlines()
    assert watcher.wait(timeout=60) == 0
    assert any("the job database is unavailable (postgresql://fx_raw:***@" in line for line in journal), journal
    assert_hidden(status.stdout, *journal)
    # A libpq key=value string is hidden the same way.
    hidden = redact("host=127.0.0.1 user=fx password='s3cr#t w0rd'")
    assert "password=***" in hidden and "host=127.0.0.1" in hidden
    assert_hidden(hidden)


@pytest.mark.parametrize("raw", [HOSTILE_PASSWORD, "s3cr@y0ur5elf", "s3cr/y0ur5elf"],
                         ids=["percent-and-space", "at-sign", "slash"])
def test_a_url_that_libpq_cannot_read_or_would_misread_is_refused_without_showing_it(tmp_path, postgres_cluster,
                                                                                     raw: str) -> None:
    """libpq refuses a raw `%` or space, and ends the user part at a raw `@` or `/`.

    Misread, the rest of the password would be taken for the host, the port or
    the database, and echoed in error messages (`could not translate host name`).
    """
    config = settings(tmp_path, f"postgresql://fx:{raw}@127.0.0.1:{postgres_cluster.port}/fixative")
    for argv in (("status",), ("status", "--json"), ("list",)):
        done = cli(config, *argv)
        assert done.returncode == EX_CONFIG, (argv, done.stdout, done.stderr)
        assert "fixative: config: state_db: libpq cannot read this URL" in done.stderr
        assert "Traceback" not in done.stderr
        assert_hidden(done.stdout, done.stderr)
    [(level, line)] = store_checks(config)
    assert level == FAIL and line.startswith("state_db: libpq cannot read this URL")
    assert_hidden(line, describe_store(config))


def test_a_role_the_database_refuses_gets_a_clear_message_not_a_traceback(tmp_path, postgres_cluster) -> None:
    """A database its role does not own: fixative cannot create its tables there (PostgreSQL 15 on)."""
    postgres_cluster.role("fx_guest", HOSTILE_PASSWORD)
    config = settings(tmp_path, f"postgresql://fx_guest:{quote(HOSTILE_PASSWORD, safe='')}@127.0.0.1:"
                                f"{postgres_cluster.port}/{postgres_cluster.database().rsplit('/', 1)[1]}")
    status, listed = cli(config, "status"), cli(config, "list")
    assert status.returncode == 3 and "permission denied for schema public" in status.stdout, status.stderr
    assert listed.returncode == 1 and "permission denied for schema public" in listed.stderr
    assert "Traceback" not in status.stderr + listed.stderr
    [(level, line)] = store_checks(config)
    assert level == FAIL and "permission denied for schema public" in line
    assert_hidden(status.stdout, status.stderr, listed.stderr, line)
