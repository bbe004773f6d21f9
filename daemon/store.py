"""The job table: the only thing the watcher and the engine share.

One SQLite file (``state_dir/jobs.db``, ``fixative.daemon.store_sqlite``), or a
PostgreSQL database that engines on several machines share
(``state_db = "postgresql://..."``, ``fixative.daemon.store_postgres``). Every rule and
every statement is here, written once for both; a backend only connects, runs
statements, opens write transactions and migrates. The rules that keep the
table from losing or repeating work, each borrowed from a queue that got it
wrong or right:

* A job is never deleted when it is taken. huey deletes on dequeue, so a crash
  loses the job; here a claim only sets a lease (owner + expiry). If the lease
  runs out (engine killed, machine crashed), the next claim queues it again.
* ``attempts`` counts claims, not failures, and is incremented at claim time, so
  an image that kills the engine outright still ends as "failed" after
  ``max_attempts`` instead of looping (goqite's receive limit, apalis's orphans).
* A dead engine's attempt is counted only for the jobs it was protecting: the
  jobs of a batch still waiting for their group's turn get theirs back
  (:meth:`JobStore._requeue_dead`). A job that has used an attempt is claimed
  alone from then on (:attr:`Job.retried`), so that an image that kills the
  engine fails by itself instead of taking its batch-mates down with it.
* Read-then-write runs in an exclusive write transaction (``_write(exclusive=True)``):
  what it read cannot change before it writes. Claims do not need one: they
  take rows with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so that claimers on
  several machines never wait for each other nor take the same row.
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
  A job whose original is gone (renamed in the inbox) is superseded by its
  copy under the new name, which was recorded as skipped.

Timestamps are unix seconds (floats) everywhere, leases included, on both
backends: every rule reads the same. With several machines their clocks must
agree to well within ``lease_seconds`` (NTP does; ``fixative doctor`` checks).

SQL here is written for both: named parameters (``:name``), no function only
one of them has. Where the two really differ, the backend says so
(``skip_locked``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fixative.daemon.files import file_sha256
from fixative.daemon.text import printable
from fixative.engine.options import EngineOptions

if TYPE_CHECKING:
    from fixative.daemon.settings import Settings

# What counts as a full state disk. SQLite needs a few pages per write; with
# less than this left for this user (statvfs f_bavail), writes are failing or about to.
FULL_BELOW_BYTES = 1 << 20
# Leases compare expiry times written by one machine's clock with another's;
# a skew of a few seconds is harmless against a lease of minutes.
CLOCK_SKEW_WARN_SECONDS = 5.0
LEASE_EXPIRED = "lease expired: the engine stopped while working on it"  # the error of a job queued again for it
STATES = ("queued", "running", "done", "failed", "skipped", "superseded")


class StoreUnavailable(Exception):
    """The job table cannot be read or written for now: not the image's fault, and not a crash.

    The watcher, the engine and ``fixative run`` wait and try again
    (:mod:`fixative.daemon.store_wait`), saying why in the log, and nothing is lost
    meanwhile: what could not be recorded is recorded once the table answers
    (:mod:`fixative.daemon.store_postgres` says why a write whose answer was lost is safe either way).
    """

    remedy = "try again once it answers (the daemon waits for it by itself)"


class StoreRefused(StoreUnavailable):
    """The PostgreSQL job table answers, but refuses what the store asks (a role without the rights it needs)."""

    remedy = ("fix what it says, such as the role's rights on the database (see the README's PostgreSQL steps); "
              "the daemon tries again by itself meanwhile")


class StateDiskFull(StoreUnavailable):
    """The SQLite job table cannot be written: the state folder's disk (or quota) is full."""

    remedy = "free some space and try again"

    def __init__(self, folder: Path):
        self.folder = folder
        super().__init__(f"the state folder's disk is full ({folder})")


class Backend(Protocol):
    """What differs between SQLite and PostgreSQL; see ``fixative.daemon.store_sqlite`` and ``fixative.daemon.store_postgres``."""

    skip_locked: str  # appended to a claim's SELECT: rows another claimer holds are passed over

    def describe(self) -> str: ...  # for status and doctor: the path, or the URL without its password
    def write(self, exclusive: bool = False) -> AbstractContextManager[None]: ...
    def rows(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]: ...
    def execute(self, sql: str, params: dict[str, Any]) -> int: ...
    def schema_version(self) -> int: ...  # brought up to date when the backend first connects
    def server_time(self) -> float | None: ...  # the database server's clock; None: the table is on this machine
    def close(self) -> None: ...


def is_postgresql(location: Path | str) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def open_store(settings: Settings) -> JobStore:
    """The job table that ``settings`` name: ``state_db``, or the SQLite file in ``state_dir``."""
    return JobStore(settings.state_db or settings.db_path, max_attempts=settings.worker.max_attempts)


def describe_store(settings: Settings) -> str:
    """Where the job table is, for people: the SQLite file, or the PostgreSQL URL without its password."""
    if settings.state_db:
        from fixative.daemon.store_postgres import redact

        return redact(settings.state_db)
    return str(settings.db_path)


def store_exists(settings: Settings) -> bool:
    """Whether there is a job table to read, without creating one (for status and list)."""
    return bool(settings.state_db) or settings.db_path.exists()


def free_bytes(state_dir: Path) -> int:
    folder = state_dir
    while not folder.exists():  # not created yet: the disk it will be on
        folder = folder.parent
    return shutil.disk_usage(folder).free


def skew_problem(skew: float | None) -> str | None:
    """What a clock ``skew`` (:meth:`JobStore.clock_skew`) means for the leases, for people; None if nothing."""
    if skew is None or abs(skew) < CLOCK_SKEW_WARN_SECONDS:
        return None
    return (f"this machine's clock is {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} the database "
            "server's; leases are expiry times, so every machine's clock must agree "
            "(enable NTP: timedatectl set-ntp true)")


def looks_full(settings: Settings) -> bool:
    """Whether the SQLite job table's disk is full. A PostgreSQL job table is not on it (``state_db``)."""
    return not settings.state_db and free_bytes(settings.state_dir) < FULL_BELOW_BYTES


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
    engine: str | None = None  # the engine that claimed it last (processes.name)

    @property
    def retried(self) -> bool:
        """A claimed job that used an attempt before (its engine died, or it failed): it is protected alone."""
        return self.attempts > 1

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        return cls(**{**row, "metrics": json.loads(row["metrics"]) if row["metrics"] else {},
                      "options": json.loads(row["options"]) if row["options"] else None})


class JobStore:
    """The job table. Safe to share between threads; open one per process."""

    def __init__(self, location: Path | str, *, max_attempts: int = 3):
        """``location``: a SQLite file, or a ``postgresql://`` URL."""
        self.location = location
        self.max_attempts = max_attempts
        # Imported here: psycopg only for a PostgreSQL URL (it is an optional extra).
        if is_postgresql(location):
            from fixative.daemon.store_postgres import PostgreSQLBackend

            self.backend: Backend = PostgreSQLBackend(str(location))
        else:
            from fixative.daemon.store_sqlite import SQLiteBackend

            self.backend = SQLiteBackend(Path(location))

    def describe(self) -> str:
        return self.backend.describe()

    def close(self) -> None:
        self.backend.close()

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _write(self, *, exclusive: bool = False) -> Iterator[None]:
        """A write transaction; ``exclusive`` for read-then-write (see the module docstring)."""
        with self.backend.write(exclusive):
            yield

    def _rows(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.backend.rows(sql, params or {})

    def _job(self, sql: str, params: dict[str, Any]) -> Job | None:
        rows = self._rows(sql, params)
        return Job.from_row(rows[0]) if rows else None

    def _execute(self, sql: str, params: dict[str, Any]) -> int:
        return self.backend.execute(sql, params)

    def _update(self, sql: str, params: dict[str, Any]) -> bool:
        """Run one guarded UPDATE on its own; True if it changed a row (i.e. its guard held)."""
        with self._write():
            return self._execute(sql, {"now": time.time(), **params}) > 0

    def _insert_job(self, row: dict[str, Any]) -> int:
        columns = ", ".join(row)
        values = ", ".join(f":{name}" for name in row)
        return self._rows(f"INSERT INTO jobs ({columns}) VALUES ({values}) RETURNING id", row)[0]["id"]

    def get(self, job_id: int) -> Job | None:
        return self._job("SELECT * FROM jobs WHERE id = :id", {"id": job_id})

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
        with self._write(exclusive=True):
            same = self._job(
                """SELECT * FROM jobs WHERE source_path = :path AND sha256 = :sha256 AND fingerprint = :fingerprint
                   ORDER BY id LIMIT 1""",
                {"path": str(path), "sha256": sha256, "fingerprint": fingerprint},
            )
            if same is not None and not self._came_back(same):
                return same
            now = time.time()
            if same is not None:
                job_id = same.id
                self._queue_again(same, now)
            else:
                first = self._job(
                    "SELECT * FROM jobs WHERE sha256 = :sha256 AND fingerprint = :fingerprint AND duplicate_of IS NULL",
                    {"sha256": sha256, "fingerprint": fingerprint},
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
                job_id = self._insert_job(row)
            for older in self._rows(
                """SELECT id FROM jobs WHERE source_path = :path AND id != :id AND sha256 IS NOT NULL
                   AND state IN ('queued', 'running', 'failed')""",
                {"path": str(path), "id": job_id},
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
            "SELECT 1 FROM jobs WHERE source_path = :path AND id > :id AND state = 'done' AND duplicate_of IS NULL",
            {"path": job.source_path, "id": job.id},
        ))

    def _queue_again(self, job: Job, now: float) -> None:
        """Make ``job`` current again (see :meth:`_came_back`); its output name is chosen afresh."""
        if job.duplicate_of is not None:  # its content is another path's job now (see _supersede)
            self._execute(
                """UPDATE jobs SET state = 'skipped', error = NULL, finished_at = :now, updated_at = :now,
                          output_path = (SELECT output_path FROM jobs WHERE id = :primary)
                   WHERE id = :id""",
                {"id": job.id, "primary": job.duplicate_of, "now": now},
            )
        else:
            self._execute(
                """UPDATE jobs SET state = 'queued', attempts = 0, error = NULL, not_before = NULL,
                          output_path = NULL, output_sha256 = NULL, finished_at = NULL, updated_at = :now
                   WHERE id = :id""",
                {"id": job.id, "now": now},
            )

    def _supersede(self, job_id: int, reason: str, now: float) -> bool:
        """Retire a job whose path has moved on, unless it ended meanwhile; inside an exclusive write transaction.

        Copies of its content under other names were skipped as duplicates of
        it. They still need protecting, so the first of them takes the job over.
        """
        # The state guard: on PostgreSQL an engine's finish() may commit between
        # our read of this row and this write (claims and finishes do not wait for
        # the exclusive lock), and a done job must stay done.
        if not self._execute(
            """UPDATE jobs SET state = 'superseded', error = :reason, owner = NULL, lease_expires = NULL,
                      progress_step = NULL, progress_total = NULL, finished_at = :now, updated_at = :now
               WHERE id = :id AND state IN ('queued', 'running', 'failed')""",
            {"id": job_id, "reason": reason, "now": now},
        ):
            return False
        heir = self._heir(job_id)
        if heir is not None:
            params = {"id": job_id, "heir": heir.id, "now": now}
            # In this order: the retired job leaves the one-per-content index before the heir joins it.
            self._execute("UPDATE jobs SET duplicate_of = :heir WHERE duplicate_of = :id OR id = :id", params)
            self._execute(
                """UPDATE jobs SET state = 'queued', duplicate_of = NULL, output_path = NULL,
                          finished_at = NULL, updated_at = :now
                   WHERE id = :heir""",
                params,
            )
        return True

    def _heir(self, job_id: int) -> Job | None:
        """The copy that takes a retired job over: the first path recorded as a skipped copy of its content.

        Skipped only: the jobs an heir took over point at it as well (``_supersede``),
        and one of those taking it back would pass the job to and fro forever.
        """
        return self._job("SELECT * FROM jobs WHERE duplicate_of = :id AND state = 'skipped' ORDER BY id LIMIT 1",
                         {"id": job_id})

    def record_refusal(self, path: Path, reason: str) -> Job:
        """Record a path the watcher will not touch (symlink, FIFO, outside the inbox).

        A "failed" row with no sha256, so the artist sees why in ``fixative
        status``. Repeated rescans find the same refusal instead of adding rows.
        """
        path = Path(path).absolute()
        with self._write(exclusive=True):
            known = self._job(
                "SELECT * FROM jobs WHERE source_path = :path AND sha256 IS NULL AND error = :reason",
                {"path": str(path), "reason": reason},
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
            return self.get(self._insert_job(row))

    # -- the engine's side ------------------------------------------------

    def claim(self, owner: str, lease_seconds: float, engine: str | None = None) -> Job | None:
        """Take the oldest queued job for ``owner`` for ``lease_seconds``, or return None.

        ``engine``: the claiming engine's name, kept on the job (who did it).
        """
        now = time.time()
        params = {"now": now, "owner": owner, "expires": now + lease_seconds, "max": self.max_attempts,
                  "engine": engine}
        # Each statement takes its rows with `skip_locked` (FOR UPDATE SKIP LOCKED on
        # PostgreSQL): a row that another claimer is sweeping or claiming right now
        # is theirs, so claimers on several machines never wait for one another,
        # never deadlock, and never take the same job. SQLite's BEGIN IMMEDIATE
        # lets one claimer in at a time instead.
        skip_locked = self.backend.skip_locked
        with self._write():
            # The engine that held these stopped heartbeating: it was killed or
            # the machine went down.
            self._requeue_dead("state = 'running' AND lease_expires < :now",
                               {**params, "error": LEASE_EXPIRED})
            # Out of attempts: fail with the last reason rather than try forever.
            self._execute(
                f"""UPDATE jobs SET state = 'failed', finished_at = :now, updated_at = :now,
                           error = 'gave up after ' || attempts || ' attempts: ' || COALESCE(error, 'no reason recorded')
                    WHERE id IN (SELECT id FROM jobs WHERE state = 'queued' AND attempts >= :max{skip_locked})""",
                params,
            )
            jobs = self._take("", 1, params)
        return jobs[0] if jobs else None

    def claim_more(self, owner: str, lease_seconds: float, fingerprint: str, limit: int,
                   engine: str | None = None) -> list[Job]:
        """Take up to ``limit`` more queued jobs with ``fingerprint`` for ``owner``, oldest first, each with its own lease.

        For an engine that protects several images as one batch (``[engine]
        batch_size``) once :meth:`claim` gave it one that is not :attr:`Job.retried`:
        the same settings, so one model and one set of options serve them all.
        It takes what is queued now, possibly nothing: a batch is never waited for. Each job's attempt
        is counted as in :meth:`claim`, and every rule of a lease applies to
        each alone (heartbeat, release, release_owner, expiry).
        """
        if limit < 1:
            return []
        now = time.time()
        params = {"now": now, "owner": owner, "expires": now + lease_seconds, "engine": engine,
                  "fingerprint": fingerprint}
        with self._write():
            # Only jobs that never used an attempt: one that did is claimed alone (Job.retried). That also
            # leaves a job whose last attempt failed since claim()'s sweep for the next sweep to fail.
            return self._take("AND fingerprint = :fingerprint AND attempts = 0", limit, params)

    def _take(self, where: str, limit: int, params: dict[str, Any]) -> list[Job]:
        """Lease the oldest ``limit`` queued jobs that are due and match ``where``; inside a write transaction."""
        rows = self._rows(
            f"""UPDATE jobs SET state = 'running', owner = :owner, engine = :engine, lease_expires = :expires,
                       attempts = attempts + 1, started_at = :now, updated_at = :now,
                       progress_step = NULL, progress_total = NULL
                WHERE id IN (SELECT id FROM jobs
                             WHERE state = 'queued' AND (not_before IS NULL OR not_before <= :now) {where}
                             ORDER BY id LIMIT :limit{self.backend.skip_locked})
                RETURNING *""",
            {**params, "limit": limit},
        )
        return sorted((Job.from_row(row) for row in rows), key=lambda job: job.id)

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

    def start_group(self, job_ids: list[int], owner: str, lease_seconds: float) -> bool:
        """Record step 0 for a group about to be protected, all of its jobs in one transaction.

        That progress is what tells the running group from the waiting jobs
        should the engine die (:meth:`_requeue_dead`). Written one job at a
        time, a kill between two writes would count the group's first job
        and refund the rest, as if they had only been waiting. True if every
        job is still ours.
        """
        with self._write():
            changed = sum(
                self._execute(
                    """UPDATE jobs SET lease_expires = :now + :lease, updated_at = :now, progress_step = 0
                       WHERE id = :id AND owner = :owner AND state = 'running'""",
                    {"id": job_id, "owner": owner, "lease": lease_seconds, "now": time.time()},
                )
                for job_id in job_ids
            )
        return changed == len(job_ids)

    def finish(self, job_id: int, owner: str, output_path: Path | str, metrics: dict[str, Any]) -> bool:
        """Mark the job done. False if another claim took it meanwhile (then it is theirs)."""
        # Exclusive, though guarded: it updates the job and then its copies, and
        # enqueue() may be updating the same rows the other way round (on
        # PostgreSQL, two such transactions could otherwise deadlock).
        with self._write(exclusive=True):
            done = self._execute(
                """UPDATE jobs SET state = 'done', output_path = :output, metrics = :metrics, error = NULL,
                          owner = NULL, lease_expires = NULL, finished_at = :now, updated_at = :now
                   WHERE id = :id AND owner = :owner AND state = 'running'""",
                {"id": job_id, "owner": owner, "output": str(output_path), "metrics": json.dumps(metrics),
                 "now": time.time()},
            )
            if done:  # copies skipped as duplicates while this ran now point at the output too
                self._execute("UPDATE jobs SET output_path = :output WHERE duplicate_of = :id",
                              {"output": str(output_path), "id": job_id})
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

    def release(self, job_id: int, owner: str, error: str | None = None, *, retry_after_seconds: float = 0) -> bool:
        """Give a job back without counting the attempt.

        For the engine being asked to stop, and for failures that are the
        machine's fault rather than the image's (export folder unwritable, disk
        full): those must not use up the image's attempts. ``error`` says why.
        ``retry_after_seconds``: not claimed again before then, so that the
        other jobs pass it meanwhile (the fault may be this job's alone: its
        subfolder unwritable).
        """
        return self._update(
            """UPDATE jobs SET state = 'queued', owner = NULL, lease_expires = NULL, attempts = attempts - 1,
                      progress_step = NULL, progress_total = NULL, error = :error, not_before = :retry_at,
                      updated_at = :now
               WHERE id = :id AND owner = :owner AND state = 'running'""",
            {"id": job_id, "owner": owner, "error": error, "retry_at": time.time() + retry_after_seconds},
        )

    def supersede(self, job_id: int, owner: str, reason: str) -> bool:
        """Retire a claimed job whose source changed since it was queued: not a failure.

        The watcher queues the new content once it settles, and that job is the current one.
        """
        with self._write(exclusive=True):
            return self._holds(job_id, owner) and self._supersede(job_id, reason, time.time())

    def hand_over(self, job_id: int, owner: str, reason: str) -> Job | None:
        """Retire a claimed job whose original is gone, for a copy of it under another name; that copy, queued now.

        ``mv a.png b.png`` in the inbox before a.png's job ran: the watcher
        recorded b.png as a skipped copy of the job, and b.png is the file
        left to protect. None when the job has no copy (or is no longer ours).
        ``reason``: why the original is gone.
        """
        with self._write(exclusive=True):
            heir = self._heir(job_id)
            if heir is None or not self._holds(job_id, owner):
                return None
            self._supersede(job_id, f"{reason}; its copy {heir.relative_path} (job #{heir.id}) is protected instead",
                            time.time())
            return self.get(heir.id)

    def _holds(self, job_id: int, owner: str) -> bool:
        return bool(self._rows("SELECT 1 FROM jobs WHERE id = :id AND owner = :owner AND state = 'running'",
                               {"id": job_id, "owner": owner}))

    def release_owner(self, owner: str, reason: str) -> bool:
        """Queue again the jobs ``owner`` held, now that its process is known to be dead; True if it held any.

        ``fixative run`` calls this as soon as its engine child dies, instead of
        letting the jobs look "running" for the rest of their leases. The
        attempts are counted as for an expired lease (:meth:`_requeue_dead`).
        """
        with self._write():
            return self._requeue_dead("owner = :owner AND state = 'running'",
                                      {"owner": owner, "error": reason, "now": time.time()}) > 0

    def _requeue_dead(self, held: str, params: dict[str, Any]) -> int:
        """Queue again the running jobs that ``held`` selects, whose engine is dead; inside a write transaction.

        Their attempt stays counted (an image that kills the engine must end as
        failed after ``max_attempts``), but only for what the engine was doing
        when it died: the group being protected, whose progress the engine
        recorded before its first step, or every job if no group had started
        (one may have died decoding). The jobs of the batch still waiting for
        their group's turn get theirs back. ``params``: ``now`` and ``error``.
        """
        skip_locked = self.backend.skip_locked
        # Two statements: the second clears the progress that the first one reads.
        self._execute(
            f"""UPDATE jobs SET attempts = attempts - 1
                WHERE id IN (SELECT id FROM jobs WHERE {held} AND progress_step IS NULL{skip_locked})
                AND EXISTS (SELECT 1 FROM jobs AS protecting WHERE protecting.owner = jobs.owner
                            AND protecting.state = 'running' AND protecting.progress_step IS NOT NULL)""",
            params,
        )
        return self._execute(
            f"""UPDATE jobs SET state = 'queued', owner = NULL, lease_expires = NULL, progress_step = NULL,
                       progress_total = NULL, error = :error, updated_at = :now
                WHERE id IN (SELECT id FROM jobs WHERE {held}{skip_locked})""",
            params,
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
            """SELECT * FROM jobs AS j WHERE output_path = :output AND id != :id
               AND (duplicate_of IS NULL OR id = (SELECT MAX(id) FROM jobs WHERE source_path = j.source_path))""",
            {"output": str(output_path), "id": job_id},
        )
        return [Job.from_row(r) for r in rows]

    def clock_skew(self) -> float | None:
        """How far the database server's clock is ahead of this machine's, in seconds; None: the table is local."""
        before = time.time()
        server = self.backend.server_time()
        return None if server is None else server - (before + time.time()) / 2

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
            return self._execute(
                f"""UPDATE jobs SET state = 'queued', attempts = 0, error = NULL, not_before = NULL,
                           finished_at = NULL, updated_at = :now
                    WHERE {where}""",
                {"id": job_id, "now": time.time()},
            )

    def beat(self, process: str, status: str = "", *, progress_at: float | None = None,
             device: str | None = None) -> None:
        """Record that ``process`` ("watcher", or an engine's name) is alive; ``fixative status`` reads it.

        ``progress_at``: when its main loop last moved, if that is not now (the
        engine beats from a side thread, so it passes its last step's time).
        ``device``: an engine's device. ``status`` is recorded escaped (``fixative.daemon.text``):
        it names files and folders, and status and systemd's STATUS show it as it is.
        """
        now = time.time()
        with self._write():
            self._execute(
                """INSERT INTO processes (name, pid, status, beat_at, progress_at, host, device)
                   VALUES (:name, :pid, :status, :now, :progress_at, :host, :device)
                   ON CONFLICT (name) DO UPDATE SET pid = excluded.pid, status = excluded.status,
                          beat_at = excluded.beat_at, progress_at = excluded.progress_at,
                          host = excluded.host, device = excluded.device""",
                {"name": process, "pid": os.getpid(), "status": printable(status), "now": now,
                 "progress_at": now if progress_at is None else progress_at,
                 "host": socket.gethostname(), "device": device},
            )

    def processes(self) -> dict[str, dict[str, Any]]:
        """``{name: {pid, status, beat_at, progress_at, host, device, age_seconds, progress_age_seconds}}``
        for every process that ever beat; engines are those with a device."""
        now = time.time()
        return {
            row["name"]: {
                **{k: row[k] for k in ("pid", "status", "beat_at", "host", "device")},
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

    def running_jobs(self) -> list[Job]:
        """Every job being protected now, the latest claimed first: one per engine at work."""
        rows = self._rows("SELECT * FROM jobs WHERE state = 'running' ORDER BY started_at DESC", {})
        return [Job.from_row(r) for r in rows]

    def failures(self, limit: int = 10) -> list[Job]:
        """The latest failures: failed jobs, and queued ones whose last attempt failed and that will be retried."""
        rows = self._rows(
            """SELECT * FROM jobs WHERE state = 'failed' OR (state = 'queued' AND error IS NOT NULL)
               ORDER BY updated_at DESC, id DESC LIMIT :limit""",
            {"limit": limit},
        )
        return [Job.from_row(r) for r in rows]

    def jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        """The newest jobs first, optionally only those in ``state``."""
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        # Not `:state IS NULL OR state = :state`: PostgreSQL cannot tell the type of a NULL parameter there.
        where = "" if state is None else "WHERE state = :state"
        rows = self._rows(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT :limit", {"state": state, "limit": limit})
        return [Job.from_row(r) for r in rows]

    def throughput(self, hours: float = 24) -> dict[str, Any]:
        """What finished in the last ``hours``: counts per final state and mean seconds per done image."""
        since = time.time() - hours * 3600
        row = self._rows(
            """SELECT COUNT(*) FILTER (WHERE state = 'done') AS done, COUNT(*) FILTER (WHERE state = 'failed') AS failed,
                      COUNT(*) FILTER (WHERE state = 'skipped') AS skipped,
                      AVG(CASE WHEN state = 'done' THEN finished_at - started_at END) AS mean_seconds
               FROM jobs WHERE finished_at >= :since""",
            {"since": since},
        )[0]
        return {
            "hours": hours,
            "done": row["done"],
            "failed": row["failed"],
            "skipped": row["skipped"],
            "mean_seconds": row["mean_seconds"],
        }

    def throughput_by_engine(self, hours: float = 24) -> dict[str, dict[str, Any]]:
        """``{engine: {done, mean_seconds}}``: the images each engine protected in the last ``hours``."""
        rows = self._rows(
            """SELECT engine, COUNT(*) AS done, AVG(finished_at - started_at) AS mean_seconds
               FROM jobs WHERE state = 'done' AND finished_at >= :since AND engine IS NOT NULL GROUP BY engine""",
            {"since": time.time() - hours * 3600},
        )
        return {row["engine"]: {"done": row["done"], "mean_seconds": row["mean_seconds"]} for row in rows}
