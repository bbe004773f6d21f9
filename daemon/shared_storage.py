"""``fixative doctor``'s checks of the job table, and of the folders that machines sharing it must share.

With a PostgreSQL job table, engines on other machines protect images that
this machine's watcher queued, and write where this machine's settings say.
The table holds absolute paths, so the inbox, ``export_dir`` and
``archive_dir`` must be the same folders on every machine, at the same paths.
Guessing from the file system type cannot tell (two machines can each mount
an NFS share of their own); these checks look:

* export and archive folders: each machine's doctor writes a marker file there
  holding a random token, and records its path and token in the table
  (``folder_markers``); every doctor then reads the other machines' markers.
  A marker that is missing, or that holds another token, is a folder that
  machine does not share with this one.
* the inbox: nothing is ever written there (the watcher would queue it).
  Instead, the latest queued images, whichever machine's watcher queued them,
  must be visible here at the paths in the table: that is what an engine
  here will open.
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

from fixative.daemon.doctor import FAIL, OK, WARN
from fixative.daemon.settings import ConfigError, Settings
from fixative.daemon.store import JobStore, StoreUnavailable, describe_store, open_store, store_exists

MARKER_PREFIX = ".fixative-shared-"  # hidden: sync clients and galleries skip it
# Leases compare expiry times written by one machine's clock with another's;
# a skew of a few seconds is harmless against a lease of minutes.
CLOCK_SKEW_WARN_SECONDS = 5.0
QUEUED_TO_CHECK = 10


def store_checks(settings: Settings) -> list[tuple[str, str]]:
    """The job table: reachable, its schema one this fixative knows; with PostgreSQL, the clocks and shared folders."""
    where = describe_store(settings)
    if not store_exists(settings):
        return [(OK, f"job table: {where} does not exist yet; it will be created")]
    try:
        store = open_store(settings)
    except ConfigError as error:  # psycopg missing
        return [(FAIL, line) for line in error.lines]
    try:
        results = [_schema(store)]
        if settings.state_db:
            results.append(_clock(store, settings.worker.lease_seconds))
            for key in ("export_dir", "archive_dir") if settings.after == "archive" else ("export_dir",):
                results.append(_marker_check(store, key, getattr(settings, key)))
            results.append(_inbox_check(store, settings.inbox))
        return results
    except StoreUnavailable as error:
        return [(FAIL, f"job table: {error}")]
    finally:
        store.close()


def _schema(store: JobStore) -> tuple[str, str]:
    from importlib import import_module

    known = len(import_module(type(store.backend).__module__).MIGRATIONS)
    version = store.backend.schema_version()
    if version > known:  # another machine runs a newer fixative, which migrated the table
        return FAIL, (f"job table: {store.describe()} has schema version {version}, but this fixative knows "
                      f"only {known}: upgrade fixative on this machine")
    return OK, f"job table: {store.describe()} (schema version {version})"


def _clock(store: JobStore, lease_seconds: float) -> tuple[str, str]:
    before = time.time()
    server = store.backend.rows("SELECT EXTRACT(EPOCH FROM clock_timestamp()) AS now", {})[0]["now"]
    skew = float(server) - (before + time.time()) / 2
    if abs(skew) < CLOCK_SKEW_WARN_SECONDS:
        return OK, f"clock: within {CLOCK_SKEW_WARN_SECONDS:.0f} s of the database server's"
    level = FAIL if abs(skew) > lease_seconds / 2 else WARN
    return level, (f"clock: {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} the database server's; "
                   "leases are expiry times, so every machine's clock must agree (enable NTP: timedatectl set-ntp true)")


def _marker_check(store: JobStore, key: str, folder: Path) -> tuple[str, str]:
    machine = socket.gethostname()
    marker, token = folder / f"{MARKER_PREFIX}{machine}", uuid.uuid4().hex
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError as error:
        return FAIL, f"{key}: cannot write the shared-folder marker {marker} ({error.strerror})"
    with store.backend.write():
        store.backend.execute(
            """INSERT INTO folder_markers (machine, folder, path, token, written_at)
               VALUES (:machine, :folder, :path, :token, :now)
               ON CONFLICT (machine, folder) DO UPDATE SET path = excluded.path, token = excluded.token,
                      written_at = excluded.written_at""",
            {"machine": machine, "folder": key, "path": str(marker), "token": token, "now": time.time()},
        )
    others = store.backend.rows("SELECT machine, path, token FROM folder_markers WHERE folder = :folder AND "
                                "machine != :machine ORDER BY machine", {"folder": key, "machine": machine})
    if not others:
        return WARN, (f"{key}: no other machine has run `fixative doctor` with this state_db yet, so nothing "
                      "shows that it sees this folder; run it on every machine, then here again")
    unseen = [other for other in others if _read(Path(other["path"])) != other["token"]]
    if unseen:
        other = unseen[0]
        return FAIL, (f"{key}: {other['machine']}'s marker {other['path']} is not visible here; {key} must be "
                      "on storage every machine sees, mounted at the same path (or that machine's doctor "
                      "ran since with another folder: run it again there)")
    elsewhere = sorted({str(Path(other["path"]).parent) for other in others} - {str(folder)})
    if elsewhere:
        return WARN, f"{key}: shared, but other machines use {', '.join(elsewhere)}, this one {folder}"
    return OK, f"{key}: the same folder as on {', '.join(other['machine'] for other in others)}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _inbox_check(store: JobStore, inbox: Path) -> tuple[str, str]:
    queued = store.jobs("queued", limit=QUEUED_TO_CHECK)
    if not queued:
        return OK, "inbox: no queued image to check that this machine sees it (checked again when there is one)"
    missing = [job.source_path for job in queued if not Path(job.source_path).is_file()]
    if len(missing) == len(queued):
        return FAIL, (f"inbox: none of the {len(queued)} latest queued images is visible here (such as {missing[0]}); "
                      f"an engine here could not read them: the inbox must be on storage every machine sees, "
                      "mounted at the same path")
    if missing:
        return WARN, (f"inbox: {len(missing)} of the {len(queued)} latest queued images are not visible here "
                      f"(such as {missing[0]}): deleted since, or on storage this machine does not see")
    return OK, f"inbox: the {len(queued)} latest queued images are visible here"
