"""The job table: the only thing the watcher and the engine share.

One SQLite file (``state_dir/jobs.db``) through sqlite-utils. The rules that keep
it from losing or repeating work, each borrowed from a queue that got it wrong
or right:

* A job is never deleted when it is taken. huey deletes on dequeue, so a crash
  loses the job; here a claim only sets a lease (owner + expiry). If the lease
  runs out (engine killed, machine crashed), the next claim queues it again.
* ``attempts`` counts claims, not failures, and is incremented at claim time, so
  an image that kills the engine outright still ends as "failed" after
  ``max_attempts`` instead of looping (goqite's receive limit, apalis's orphans).
* Read-then-write runs in ``BEGIN IMMEDIATE``. sqlite-utils' ``atomic()`` opens a
  deferred BEGIN, and a deferred read that upgrades to a write in WAL mode fails
  with SQLITE_BUSY at once, whatever the busy timeout.
* Every update from the engine is guarded on ``owner``, so an engine that lost
  its lease cannot overwrite the job that another claim now holds.
* One row per (content sha256, settings fingerprint): the same bytes with the
  same settings are protected once. A copy under another name gets a "skipped"
  row that points at the first job (``duplicate_of``) and shares its output.
* A row carries the engine options it was queued with, and the engine protects
  with those, not with whatever the config file says when the job is claimed:
  the fingerprint on the row must describe the output it leads to.
* A path has one current job: queuing new content or new settings for a path
  marks its older unfinished or failed jobs "superseded". They are history,
  not failures, so ``fixative status`` and ``retry --failed`` leave them alone.

Timestamps are unix seconds (floats) everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from fixative.engine.options import EngineOptions

STATES = ("queued", "running", "done", "failed", "skipped", "superseded")


class StateDiskFull(Exception):
    """The job table cannot be written: the state folder's disk (or quota) is full.

    Not the image's fault and not a crash: the watcher and the engine wait and
    try again (``daemon.state_disk``), and nothing is lost meanwhile.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        super().__init__(f"the state folder's disk is full ({folder})")

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
]


@dataclass
class Job:
    id: int
    source_path: str
    relative_path: str
    sha256: str | None
    fingerprint: str | None
    state: str
    attempts: int
    owner: str | None
    lease_expires: float | None
    not_before: float | None
    progress_step: int | None
    progress_total: int | None
    output_path: str | None
    error: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    duplicate_of: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    options: dict[str, Any] | None = None  # the EngineOptions it was queued with, as JSON
    archived_to: str | None = None
    output_sha256: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        return cls(**{**row, "metrics": json.loads(row["metrics"]) if row["metrics"] else {},
                      "options": json.loads(row["options"]) if row["options"] else None})


def _disk_full(error: BaseException) -> bool:
    # SQLITE_FULL; sqlite_errorcode exists from Python 3.11, the message in every version.
    return isinstance(error, sqlite3.OperationalError) and (
        getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "database or disk is full" in str(error))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # streamed: artwork can be hundreds of MB
            digest.update(chunk)
    return digest.hexdigest()


class JobStore:
    """The job table. Safe to share between threads; open one per process."""

    def __init__(self, db_path: Path, *, max_attempts: int = 3):
        self.path = Path(db_path)
        self.max_attempts = max_attempts
        self.path.parent.mkdir(parents=True, exist_ok=True)
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

    def close(self) -> None:
        self.db.close()

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A transaction that takes the write lock up front (see the module docstring)."""
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

    def _migrate(self) -> None:
        with self._write():  # two processes starting together must not both migrate
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                # sqlite-utils 4.x runs a script statement by statement inside an
                # open transaction (sqlite3's executescript would COMMIT first).
                self.db.executescript(script)
                self.db.execute(f"PRAGMA user_version = {number}")

    def _rows(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query(sql, params))

    def _job(self, sql: str, params: tuple | dict = ()) -> Job | None:
        rows = self._rows(sql, params)
        return Job.from_row(rows[0]) if rows else None

    def _update(self, sql: str, params: dict[str, Any]) -> bool:
        """Run one UPDATE; True if it changed a row (i.e. its guard held)."""
        with self._write():
            return self.db.execute(sql, {"now": time.time(), **params}).rowcount > 0

    def get(self, job_id: int) -> Job | None:
        return self._job("SELECT * FROM jobs WHERE id = ?", (job_id,))

    # -- the watcher's side -----------------------------------------------

    def enqueue(self, path: Path, options: EngineOptions, *, inbox: Path | None = None) -> Job:
        """Queue ``path`` for protection with ``options``; idempotent.

        The watcher rescans the inbox and calls this for every file it sees, so
        a path whose content is already known with these settings returns its
        job unchanged. A failed one stays failed until ``fixative retry``. Other
        paths with known content get a "skipped" row pointing at the first job.
        The new job supersedes the path's older unfinished ones.
        """
        path = Path(path).absolute()
        sha256 = file_sha256(path)  # outside the transaction: hashing a big file is slow
        fingerprint = options.fingerprint()
        if inbox is not None and Path(inbox).absolute() in path.parents:
            relative = path.relative_to(Path(inbox).absolute()).as_posix()
        else:
            relative = path.name
        with self._write():
            same = self._job(
                "SELECT * FROM jobs WHERE source_path = ? AND sha256 = ? AND fingerprint = ? ORDER BY id LIMIT 1",
                (str(path), sha256, fingerprint),
            )
            if same is not None and not self._came_back(same):
                return same
            now = time.time()
            if same is not None:
                job_id = same.id
                self._queue_again(same, now)
            else:
                first = self._job(
                    "SELECT * FROM jobs WHERE sha256 = ? AND fingerprint = ? AND duplicate_of IS NULL",
                    (sha256, fingerprint),
                )
                row: dict[str, Any] = {
                    "source_path": str(path),
                    "relative_path": relative,
                    "sha256": sha256,
                    "fingerprint": fingerprint,
                    "options": options.model_dump_json(),
                    "state": "queued",
                    "created_at": now,
                    "updated_at": now,
                }
                if first is not None:
                    row.update(state="skipped", duplicate_of=first.id, output_path=first.output_path,
                               finished_at=now)
                job_id = self.db["jobs"].insert(row).last_pk
            for older in self._rows(
                """SELECT id FROM jobs WHERE source_path = ? AND id != ? AND sha256 IS NOT NULL
                   AND state IN ('queued', 'running', 'failed')""",
                (str(path), job_id),
            ):
                self._supersede(older["id"], f"superseded by #{job_id}: the file's content or the settings "
                                             f"changed before it was done", now)
            return self.get(job_id)

    def _came_back(self, job: Job) -> bool:
        """Whether the path moved on to other content or settings, and came back to ``job``'s.

        Undo in an editor, or a settings change reverted. A superseded job was
        never done; a done one may have had its output replaced since by the
        path's later job. Either way this content has no current output.
        """
        if job.state == "superseded":
            return True
        return job.state == "done" and bool(self._rows(
            "SELECT 1 FROM jobs WHERE source_path = ? AND id > ? AND state = 'done' AND duplicate_of IS NULL",
            (job.source_path, job.id),
        ))

    def _queue_again(self, job: Job, now: float) -> None:
        """Make ``job`` current again (see :meth:`_came_back`); its output name is chosen afresh."""
        if job.duplicate_of is not None:  # its content is another path's job now (see _supersede)
            self.db.execute(
                """UPDATE jobs SET state = 'skipped', error = NULL, finished_at = :now, updated_at = :now,
                          output_path = (SELECT output_path FROM jobs WHERE id = :primary)
                   WHERE id = :id""",
                {"id": job.id, "primary": job.duplicate_of, "now": now},
            )
        else:
            self.db.execute(
                """UPDATE jobs SET state = 'queued', attempts = 0, error = NULL, not_before = NULL,
                          output_path = NULL, output_sha256 = NULL, finished_at = NULL, updated_at = :now
                   WHERE id = :id""",
                {"id": job.id, "now": now},
            )

    def _supersede(self, job_id: int, reason: str, now: float) -> None:
        """Retire a job whose path has moved on; inside a write transaction.

        Copies of its content under other names were skipped as duplicates of
        it. They still need protecting, so the first of them takes the job over.
        """
        self.db.execute(
            """UPDATE jobs SET state = 'superseded', error = :reason, owner = NULL, lease_expires = NULL,
                      progress_step = NULL, progress_total = NULL, finished_at = :now, updated_at = :now
               WHERE id = :id""",
            {"id": job_id, "reason": reason, "now": now},
        )
        heir = self._rows("SELECT id FROM jobs WHERE duplicate_of = ? ORDER BY id LIMIT 1", (job_id,))
        if heir:
            params = {"id": job_id, "heir": heir[0]["id"], "now": now}
            # In this order: the retired job leaves the one-per-content index before the heir joins it.
            self.db.execute("UPDATE jobs SET duplicate_of = :heir WHERE duplicate_of = :id OR id = :id", params)
            self.db.execute(
                """UPDATE jobs SET state = 'queued', duplicate_of = NULL, output_path = NULL,
                          finished_at = NULL, updated_at = :now
                   WHERE id = :heir""",
                params,
            )

    def record_refusal(self, path: Path, reason: str) -> Job:
        """Record a path the watcher will not touch (symlink, FIFO, outside the inbox).

        A "failed" row with no sha256, so the artist sees why in ``fixative
        status``. Repeated rescans find the same refusal instead of adding rows.
        """
        path = Path(path).absolute()
        with self._write():
            known = self._job(
                "SELECT * FROM jobs WHERE source_path = ? AND sha256 IS NULL AND error = ?", (str(path), reason)
            )
            if known is not None:
                return known
            now = time.time()
            row = {
                "source_path": str(path),
                "relative_path": path.name,
                "state": "failed",
                "error": reason,
                "created_at": now,
                "updated_at": now,
                "finished_at": now,
            }
            return self.get(self.db["jobs"].insert(row).last_pk)

    # -- the engine's side ------------------------------------------------

    def claim(self, owner: str, lease_seconds: float) -> Job | None:
        """Take the oldest queued job for ``owner`` for ``lease_seconds``, or return None."""
        now = time.time()
        params = {"now": now, "owner": owner, "expires": now + lease_seconds, "max": self.max_attempts}
        with self._write():
            # The engine that held these stopped heartbeating: it was killed or
            # the machine went down. Its attempt was counted when it claimed.
            self.db.execute(
                """UPDATE jobs SET state = 'queued', owner = NULL, lease_expires = NULL, updated_at = :now,
                          error = 'lease expired: the engine stopped while working on it'
                   WHERE state = 'running' AND lease_expires < :now""",
                params,
            )
            # Out of attempts: fail with the last reason rather than try forever.
            self.db.execute(
                """UPDATE jobs SET state = 'failed', finished_at = :now, updated_at = :now,
                          error = 'gave up after ' || attempts || ' attempts: ' || COALESCE(error, 'no reason recorded')
                   WHERE state = 'queued' AND attempts >= :max""",
                params,
            )
            rows = list(
                self.db.query(
                    """UPDATE jobs SET state = 'running', owner = :owner, lease_expires = :expires,
                              attempts = attempts + 1, started_at = :now, updated_at = :now,
                              progress_step = NULL, progress_total = NULL
                       WHERE id = (SELECT id FROM jobs
                                   WHERE state = 'queued' AND (not_before IS NULL OR not_before <= :now)
                                   ORDER BY id LIMIT 1)
                       RETURNING *""",
                    params,
                )
            )
        return Job.from_row(rows[0]) if rows else None

    def heartbeat(
        self, job_id: int, owner: str, lease_seconds: float, step: int | None = None, total: int | None = None
    ) -> bool:
        """Extend the lease and record progress. False: the job is no longer ours, stop working on it."""
        return self._update(
            """UPDATE jobs SET lease_expires = :now + :lease, updated_at = :now,
                      progress_step = COALESCE(:step, progress_step), progress_total = COALESCE(:total, progress_total)
               WHERE id = :id AND owner = :owner AND state = 'running'""",
            {"id": job_id, "owner": owner, "lease": lease_seconds, "step": step, "total": total},
        )

    def finish(self, job_id: int, owner: str, output_path: Path | str, metrics: dict[str, Any]) -> bool:
        """Mark the job done. False if another claim took it meanwhile (then it is theirs)."""
        with self._write():
            done = self.db.execute(
                """UPDATE jobs SET state = 'done', output_path = :output, metrics = :metrics, error = NULL,
                          owner = NULL, lease_expires = NULL, finished_at = :now, updated_at = :now
                   WHERE id = :id AND owner = :owner AND state = 'running'""",
                {"id": job_id, "owner": owner, "output": str(output_path), "metrics": json.dumps(metrics),
                 "now": time.time()},
            ).rowcount
            if done:  # copies skipped as duplicates while this ran now point at the output too
                self.db.execute("UPDATE jobs SET output_path = ? WHERE duplicate_of = ?", (str(output_path), job_id))
        return bool(done)

    def fail(
        self, job_id: int, owner: str, error: str, *, permanent: bool, retry_after_seconds: float = 0
    ) -> bool:
        """Record a failure. Permanent: failed for good. Transient: queued again after the backoff.

        A transient failure on the last attempt becomes "failed" at the next
        claim, with this error as its reason.
        """
        params = {"id": job_id, "owner": owner, "error": error, "retry_at": time.time() + retry_after_seconds}
        if permanent:
            sql = """UPDATE jobs SET state = 'failed', error = :error, owner = NULL, lease_expires = NULL,
                            finished_at = :now, updated_at = :now
                     WHERE id = :id AND owner = :owner AND state = 'running'"""
        else:
            sql = """UPDATE jobs SET state = 'queued', error = :error, owner = NULL, lease_expires = NULL,
                            not_before = :retry_at, updated_at = :now
                     WHERE id = :id AND owner = :owner AND state = 'running'"""
        return self._update(sql, params)

    def release(self, job_id: int, owner: str, error: str | None = None) -> bool:
        """Give a job back without counting the attempt.

        For the engine being asked to stop, and for failures that are the
        machine's fault rather than the image's (export folder unwritable, disk
        full): those must not use up the image's attempts. ``error`` says why.
        """
        return self._update(
            """UPDATE jobs SET state = 'queued', owner = NULL, lease_expires = NULL, attempts = attempts - 1,
                      progress_step = NULL, progress_total = NULL, error = :error, updated_at = :now
               WHERE id = :id AND owner = :owner AND state = 'running'""",
            {"id": job_id, "owner": owner, "error": error},
        )

    def supersede(self, job_id: int, owner: str, reason: str) -> bool:
        """Retire a claimed job whose source changed since it was queued: not a failure.

        The watcher queues the new content once it settles, and that job is the current one.
        """
        with self._write():
            if not self._rows("SELECT 1 FROM jobs WHERE id = ? AND owner = ? AND state = 'running'", (job_id, owner)):
                return False
            self._supersede(job_id, reason, time.time())
            return True

    def release_owner(self, owner: str, reason: str) -> bool:
        """Queue again the job ``owner`` held, now that its process is known to be dead; True if it held one.

        ``fixative run`` calls this as soon as its engine child dies, instead of
        letting the job look "running" for the rest of its lease. The attempt
        stays counted, as for an expired lease: an image that kills the engine
        must still end as failed after ``max_attempts``.
        """
        return self._update(
            """UPDATE jobs SET state = 'queued', owner = NULL, lease_expires = NULL, progress_step = NULL,
                      progress_total = NULL, error = :error, updated_at = :now
               WHERE owner = :owner AND state = 'running'""",
            {"owner": owner, "error": reason},
        )

    def plan_output(self, job_id: int, owner: str, output_path: Path | str, output_sha256: str) -> bool:
        """Record where the output will be written, and what it will hold, before writing it.

        If the engine dies between writing the file and :meth:`finish`, the
        next attempt finds its own file here and replaces it, instead of
        taking it for someone else's and writing a second copy beside it.
        """
        return self._update(
            """UPDATE jobs SET output_path = :output, output_sha256 = :sha256, updated_at = :now
               WHERE id = :id AND owner = :owner AND state = 'running'""",
            {"id": job_id, "owner": owner, "output": str(output_path), "sha256": output_sha256},
        )

    def output_holders(self, output_path: Path | str, job_id: int) -> list[Job]:
        """The other jobs that wrote, or planned to write, ``output_path``.

        A copy skipped as a duplicate counts while it is its path's current
        job: that output is its protected copy too, so an edit of the original
        must not replace it.
        """
        rows = self._rows(
            """SELECT * FROM jobs AS j WHERE output_path = ? AND id != ?
               AND (duplicate_of IS NULL OR id = (SELECT MAX(id) FROM jobs WHERE source_path = j.source_path))""",
            (str(output_path), job_id),
        )
        return [Job.from_row(r) for r in rows]

    def record_archive(self, job_id: int, archived_to: Path | str | None) -> None:
        """Record where the original was moved (None: the move failed after all)."""
        self._update("UPDATE jobs SET archived_to = :to, updated_at = :now WHERE id = :id",
                     {"id": job_id, "to": None if archived_to is None else str(archived_to)})

    # -- the CLI's side ---------------------------------------------------

    def retry(self, job_id: int | None = None, *, all_failed: bool = False) -> int:
        """Queue failed jobs again with fresh attempts; returns how many.

        Refusals (no sha256) are not retried: there is nothing safe to process.
        The watcher records the path afresh once it becomes a regular file.
        """
        if (job_id is None) == (not all_failed):
            raise ValueError("give either a job id or all_failed=True")
        where = "state = 'failed' AND sha256 IS NOT NULL" + ("" if all_failed else " AND id = :id")
        with self._write():
            return self.db.execute(
                f"""UPDATE jobs SET state = 'queued', attempts = 0, error = NULL, not_before = NULL,
                           finished_at = NULL, updated_at = :now
                    WHERE {where}""",
                {"id": job_id, "now": time.time()},
            ).rowcount

    def beat(self, process: str, status: str = "", *, progress_at: float | None = None) -> None:
        """Record that ``process`` ("watcher" or "engine") is alive; ``fixative status`` reads it.

        ``progress_at``: when its main loop last moved, if that is not now (the
        engine beats from a side thread, so it passes its last step's time).
        """
        now = time.time()
        with self._write():
            self.db["processes"].upsert(
                {"name": process, "pid": os.getpid(), "status": status, "beat_at": now,
                 "progress_at": now if progress_at is None else progress_at},
                pk="name",
            )

    def processes(self) -> dict[str, dict[str, Any]]:
        """``{name: {pid, status, beat_at, progress_at, age_seconds, progress_age_seconds}}`` for every process that ever beat."""
        now = time.time()
        return {
            row["name"]: {
                **{k: row[k] for k in ("pid", "status", "beat_at")},
                "progress_at": row["progress_at"] or row["beat_at"],
                "age_seconds": now - row["beat_at"],
                "progress_age_seconds": now - (row["progress_at"] or row["beat_at"]),
            }
            for row in self._rows("SELECT * FROM processes")
        }

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        counts.update({r["state"]: r["n"] for r in self._rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")})
        return counts

    def running(self) -> Job | None:
        """The job being protected now (the latest claimed, should an expired lease linger)."""
        return self._job("SELECT * FROM jobs WHERE state = 'running' ORDER BY started_at DESC LIMIT 1")

    def failures(self, limit: int = 10) -> list[Job]:
        """The latest failures: failed jobs, and queued ones whose last attempt failed and that will be retried."""
        rows = self._rows(
            """SELECT * FROM jobs WHERE state = 'failed' OR (state = 'queued' AND error IS NOT NULL)
               ORDER BY updated_at DESC, id DESC LIMIT ?""",
            (limit,),
        )
        return [Job.from_row(r) for r in rows]

    def jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        """The newest jobs first, optionally only those in ``state``."""
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        rows = self._rows(
            "SELECT * FROM jobs WHERE (:state IS NULL OR state = :state) ORDER BY id DESC LIMIT :limit",
            {"state": state, "limit": limit},
        )
        return [Job.from_row(r) for r in rows]

    def throughput(self, hours: float = 24) -> dict[str, Any]:
        """What finished in the last ``hours``: counts per final state and mean seconds per done image."""
        since = time.time() - hours * 3600
        row = self._rows(
            """SELECT SUM(state = 'done') AS done, SUM(state = 'failed') AS failed, SUM(state = 'skipped') AS skipped,
                      AVG(CASE WHEN state = 'done' THEN finished_at - started_at END) AS mean_seconds
               FROM jobs WHERE finished_at >= ?""",
            (since,),
        )[0]
        return {
            "hours": hours,
            "done": row["done"] or 0,
            "failed": row["failed"] or 0,
            "skipped": row["skipped"] or 0,
            "mean_seconds": row["mean_seconds"],
        }
