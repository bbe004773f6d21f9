"""The job table in one SQLite file (``state_dir/jobs.db``), through sqlite-utils.

What SQLite needs that PostgreSQL does not (``fixative.daemon.store_postgres``); the
rules themselves, and every statement they run, are in ``fixative.daemon.store``.

* Every write transaction is ``BEGIN IMMEDIATE``. sqlite-utils' ``atomic()``
  opens a deferred BEGIN, and a deferred read that upgrades to a write in WAL
  mode fails with SQLITE_BUSY at once, whatever the busy timeout. Taking the
  write lock up front also serialises every writer, which is what makes the
  store's read-then-write transactions safe here.
* WAL mode, so that readers (``fixative status``) never block the writers.
* A full disk (SQLITE_FULL) is :class:`~fixative.daemon.store.StateDiskFull`: the
  daemon waits for space instead of crashing.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fixative.daemon.files import make_private_file, make_private_folder
from fixative.daemon.store import StateDiskFull

# Each entry upgrades the schema by one version; PRAGMA user_version records how
# many have run. Append, never edit: databases in the field have run the old ones.
MIGRATIONS = [
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        source_path TEXT NOT NULL,
        relative_path TEXT NOT NULL,      -- where the output goes under export_dir
        sha256 TEXT,                      -- NULL for a refused path (symlink, FIFO...)
        fingerprint TEXT,                 -- EngineOptions.fingerprint()
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'skipped')),
        attempts INTEGER NOT NULL DEFAULT 0,
        owner TEXT,
        lease_expires REAL,
        not_before REAL,                  -- retry backoff: not claimed before this time
        progress_step INTEGER,
        progress_total INTEGER,
        output_path TEXT,                 -- planned while running, written once done
        error TEXT,
        metrics TEXT,                     -- JSON object
        duplicate_of INTEGER REFERENCES jobs(id),
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE UNIQUE INDEX jobs_one_per_content ON jobs (sha256, fingerprint)
        WHERE duplicate_of IS NULL AND sha256 IS NOT NULL;
    CREATE INDEX jobs_by_state ON jobs (state, id);
    CREATE INDEX jobs_by_source ON jobs (source_path);
    CREATE TABLE processes (
        name TEXT PRIMARY KEY,            -- "watcher" or "engine"
        pid INTEGER NOT NULL,
        status TEXT NOT NULL,
        beat_at REAL NOT NULL
    );
    """,
    # A beat says the process is alive; progress_at says its loop still moves.
    # A step hung in a GPU driver keeps the first fresh and lets the second age.
    """
    ALTER TABLE processes ADD COLUMN progress_at REAL;
    """,
    # "superseded": the path got newer content or settings before this job
    # finished. SQLite cannot alter a CHECK constraint, so the table is rebuilt
    # (sqlite.org/lang_altertable.html, "other kinds of table schema changes").
    # options: the EngineOptions JSON the job was queued with (NULL on rows
    # from before this version: those are protected with the current settings).
    # archived_to: where `after = "archive"` moved the original, so a new file
    # that later arrives under the same name never replaces this one's output.
    # output_sha256: what this job wrote (recorded before writing), so a later
    # job of the same source can tell its own earlier output from a file the
    # artist has since edited.
    """
    CREATE TABLE jobs_new (
        id INTEGER PRIMARY KEY,
        source_path TEXT NOT NULL,
        relative_path TEXT NOT NULL,
        sha256 TEXT,
        fingerprint TEXT,
        state TEXT NOT NULL
            CHECK (state IN ('queued', 'running', 'done', 'failed', 'skipped', 'superseded')),
        attempts INTEGER NOT NULL DEFAULT 0,
        owner TEXT,
        lease_expires REAL,
        not_before REAL,
        progress_step INTEGER,
        progress_total INTEGER,
        output_path TEXT,
        error TEXT,
        metrics TEXT,
        duplicate_of INTEGER REFERENCES jobs(id),
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        options TEXT,
        archived_to TEXT,
        output_sha256 TEXT
    );
    INSERT INTO jobs_new (id, source_path, relative_path, sha256, fingerprint, state, attempts, owner,
                          lease_expires, not_before, progress_step, progress_total, output_path, error,
                          metrics, duplicate_of, created_at, updated_at, started_at, finished_at)
        SELECT id, source_path, relative_path, sha256, fingerprint, state, attempts, owner,
               lease_expires, not_before, progress_step, progress_total, output_path, error,
               metrics, duplicate_of, created_at, updated_at, started_at, finished_at FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_new RENAME TO jobs;
    CREATE UNIQUE INDEX jobs_one_per_content ON jobs (sha256, fingerprint)
        WHERE duplicate_of IS NULL AND sha256 IS NOT NULL;
    CREATE INDEX jobs_by_state ON jobs (state, id);
    CREATE INDEX jobs_by_source ON jobs (source_path);
    CREATE INDEX jobs_by_output ON jobs (output_path);
    """,
    # Several engines, one per device, on one machine or several sharing the table.
    # Each beats under a name of its own ("engine cuda:1@host"), with its host and
    # device, and marks the jobs it claims (jobs.engine: who holds it, and once
    # done, who did it), so that status shows each engine's job and throughput.
    # The single engine's row, named "engine", has no successor.
    """
    ALTER TABLE processes ADD COLUMN host TEXT;
    ALTER TABLE processes ADD COLUMN device TEXT;
    ALTER TABLE jobs ADD COLUMN engine TEXT;
    DELETE FROM processes WHERE name = 'engine';
    """,
]


class SQLiteBackend:
    """One connection to one SQLite file, shared by the threads of one process."""

    # BEGIN IMMEDIATE already keeps every other writer out of a write transaction.
    skip_locked = ""

    def __init__(self, path: Path):
        self.path = Path(path)
        # Every file name and error is in it: the owner's alone, whatever the umask.
        # SQLite gives the -wal and -shm files it creates the table's own mode.
        make_private_folder(self.path.parent)
        make_private_file(self.path)
        for journal in ("-wal", "-shm"):  # those a fixative left readable before it kept the table private
            make_private_file(self.path.with_name(self.path.name + journal), create=False)
        # isolation_level=None: the sqlite3 module must not open transactions
        # behind our back; we open BEGIN IMMEDIATE ourselves. timeout=30 is the
        # busy timeout that lets the watcher and the engine wait for each other.
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        # Imported here, not at the top: sqlite-utils imports numpy (0.1-0.3 s), and
        # `fixative --help`, protect and doctor need STATES but never open the table.
        from sqlite_utils import Database

        self.db = Database(conn)
        # The engine's heartbeat thread shares this connection with its main loop.
        self._lock = threading.RLock()
        self.db.enable_wal()  # readers (fixative status) never block the writers
        self._migrate()

    def describe(self) -> str:
        return str(self.path)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def write(self, exclusive: bool = False) -> Iterator[None]:
        """A write transaction; always exclusive here (see the module docstring)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException as error:
                # Also after a failed COMMIT: on a full disk it leaves the
                # transaction open, holding the write lock against every other process.
                self.db.rollback()
                if _disk_full(error):
                    raise StateDiskFull(self.path.parent) from error
                raise

    def rows(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query(sql, params))

    def execute(self, sql: str, params: dict[str, Any]) -> int:
        """Run one statement; returns how many rows it changed."""
        with self._lock:
            return self.db.execute(sql, params).rowcount

    def _migrate(self) -> None:
        with self.write():  # two processes starting together must not both migrate
            version = self.schema_version()
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                # sqlite-utils 4.x runs a script statement by statement inside an
                # open transaction (sqlite3's executescript would COMMIT first).
                self.db.executescript(script)
                self.db.execute(f"PRAGMA user_version = {number}")

    def schema_version(self) -> int:
        with self._lock:
            return self.db.execute("PRAGMA user_version").fetchone()[0]

    def server_time(self) -> None:
        return None  # the file is on this machine: its clock is the engine's


def _disk_full(error: BaseException) -> bool:
    # SQLITE_FULL; sqlite_errorcode exists from Python 3.11, the message in every version.
    return isinstance(error, sqlite3.OperationalError) and (
        getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "database or disk is full" in str(error))
