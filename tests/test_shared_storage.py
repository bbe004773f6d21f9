"""``fixative doctor`` and ``status`` with a PostgreSQL job table: reachable, which schema, and shared folders.

"Machines" here are the same code under another host name, against one real
PostgreSQL database and real folders; a folder a machine does not share is a
marker file it cannot see.
"""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest

import fixative.daemon.store
from fixative.daemon.doctor import FAIL, OK, WARN, store_checks
from fixative.daemon.settings import ConfigError, Settings, load_settings
from fixative.daemon.status import build_report, render
from fixative.daemon.store import JobStore, open_store
from fixative.daemon.store_postgres import MIGRATIONS as POSTGRESQL_MIGRATIONS
from fixative.daemon.store_sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from fixative.engine.options import EngineOptions


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
