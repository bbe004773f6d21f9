"""``fixative doctor``: check the machine before the artist trusts the daemon with their work.

Everything that needs torch runs in a child Python (:func:`probe`), so a broken
CUDA install shows up as a failed check instead of crashing the doctor, and the
doctor itself stays as light as ``fixative status``. Nothing is downloaded:
the model check uses the engine's own local-only resolution.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fixative.daemon.files import write_atomically
from fixative.daemon.settings import ConfigError, Settings
from fixative.daemon.store import (CLOCK_SKEW_WARN_SECONDS, JobStore, StoreUnavailable, describe_store, open_store,
                                   skew_problem, store_exists)
from fixative.daemon.text import printable

OK, WARN, FAIL = "ok", "WARN", "FAIL"
INOTIFY_SYSCTL = "fs.inotify.max_user_watches"
LOW_DISK_BYTES = 1 << 30  # a few protected PNGs of large artwork, with room to spare
PROBE_TIMEOUT_SECONDS = 300  # the first CUDA initialisation can take minutes
# The README's words, from bench/README.md's quiet full-scale run (sds, 512x512, 2 cores: 889 s).
CPU_SPEED = "one 512x512 image takes about 15 minutes on 2 cores (bench/README.md)"


def run_checks(settings: Settings, config_file: Path) -> list[tuple[str, str]]:
    """Every check as (level, one line for the artist); ``config_file`` is the file the settings were read from."""
    results = [(OK, f"python {sys.version.split()[0]} ({sys.executable})"), _config_source(config_file)]
    results += _engine_checks(settings)
    results += _folder_checks(settings)
    results += store_checks(settings)
    results += _inotify_checks(settings)
    return results


def _config_source(config_file: Path) -> tuple[str, str]:
    """Which file the settings came from, or that there is none, and the FIXATIVE_* variables over it."""
    variables = sorted(name for name in os.environ if name.upper().startswith("FIXATIVE_")
                       and name.upper()[len("FIXATIVE_"):].split("__")[0].lower() in Settings.model_fields)
    over = f", with {', '.join(variables)} from the environment" if variables else ""
    if config_file.is_file():
        return OK, f"config: read {config_file}{over}"
    return OK, f"config: no file at {config_file}, so the defaults{over} (`fixative init` writes one to edit)"


def _engine_checks(settings: Settings) -> list[tuple[str, str]]:
    try:
        child = subprocess.run(
            [sys.executable, "-c", "from fixative.daemon.doctor import probe; probe()", settings.engine.model_dump_json(),
             json.dumps(settings.devices)],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        return [(FAIL, f"importing torch took over {PROBE_TIMEOUT_SECONDS} s; the GPU driver may be hung")]
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        return [(FAIL, f"the engine cannot start in this Python: {last}")]
    found = json.loads(child.stdout)
    results = [(OK, f"torch {found['torch']}")]
    for device, seen in found["devices"].items():  # one engine per device under `fixative run`
        key = "device" if len(found["devices"]) == 1 else f"device {device}"
        if "error" in seen:
            results.append((FAIL, f"{key}: {seen['error']}"))
        elif seen["type"] == "cpu":
            results.append((WARN, f"{key}: cpu. It works, but {CPU_SPEED}; a CUDA GPU is far faster (6.5-10 s on an H200)"))
        else:
            results.append((OK, f"{key}: {seen['type']} {seen.get('name', '')}".rstrip()))
    for name, seen in found["models"].items():  # every member of an ensemble, or the one model
        if "error" in seen:
            results.append((FAIL, f"model: {seen['error']}"))
        else:
            results.append((OK, f"model: {name} on disk at {seen['path']}"))
    return results


def probe() -> None:
    """Run in a child Python: report torch, each device (argv[2]) and each model's location as JSON on stdout."""
    import torch

    from fixative.engine.errors import EngineError
    from fixative.engine.model import pick_device, pick_dtypes
    from fixative.engine.model_files import resolve_model_folder
    from fixative.engine.options import EngineOptions

    options = EngineOptions.model_validate_json(sys.argv[1])
    found: dict[str, Any] = {"torch": torch.__version__, "devices": {}}
    for name in json.loads(sys.argv[2]):
        seen = found["devices"][name] = {}
        try:
            device = pick_device(name)
            pick_dtypes(options.dtype, device)
            seen["type"] = device.type
            if device.type == "cuda":
                props = torch.cuda.get_device_properties(device)
                seen["name"] = f"({props.name}, {props.total_memory / 2**30:.0f} GiB)"
        except EngineError as error:
            seen["error"] = str(error)
    found["models"] = {}
    for name in options.members:
        try:
            found["models"][name] = {"path": str(resolve_model_folder(name))}
        except EngineError as error:
            found["models"][name] = {"error": str(error)}
    print(json.dumps(found))


def _folder_checks(settings: Settings) -> list[tuple[str, str]]:
    results = [(OK, "export_dir is outside the inbox")]  # settings refuse to load otherwise
    folders = {"inbox": settings.inbox, "export_dir": settings.export_dir, "state_dir": settings.state_dir}
    if settings.after == "archive":
        folders["archive_dir"] = settings.archive_dir
    for key, folder in folders.items():
        results.append(_writable(key, folder, parents=key != "inbox"))
    free = shutil.disk_usage(_existing_parent(settings.export_dir)).free
    if free < LOW_DISK_BYTES:
        results.append((WARN, f"export_dir: only {free / 2**20:.0f} MiB free on {settings.export_dir}"))
    return results


def _writable(key: str, folder: Path, *, parents: bool = True) -> tuple[str, str]:
    """``parents``: whether the daemon creates missing parent folders too, not just ``folder``."""
    if not folder.exists():
        if not parents and not folder.parent.is_dir():
            # The watcher creates the inbox but not its parents (an unmounted share
            # must not be papered over with a new tree): `fixative run` exits 78 on it.
            return FAIL, (f"{key}: {folder} cannot be created: {folder.parent} does not exist "
                          "(an unmounted share? a typo?)")
        parent = _existing_parent(folder)
        if os.access(parent, os.W_OK | os.X_OK):
            return OK, f"{key}: {folder} does not exist yet; it will be created"
        return FAIL, f"{key}: {folder} does not exist, and {parent} is not writable to create it"
    if not folder.is_dir():
        return FAIL, f"{key}: {folder} is not a folder"
    try:  # a real file: os.access() is wrong on some network and FUSE file systems
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fixative-doctor-"):
            pass
    except OSError as error:
        return FAIL, f"{key}: cannot write in {folder} ({error.strerror})"
    return OK, f"{key}: {folder} is writable"


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _inotify_checks(settings: Settings) -> list[tuple[str, str]]:
    limit_file = Path("/proc/sys/fs/inotify/max_user_watches")
    if settings.watcher.polling:
        return [(OK, "watcher: polling (no inotify limits apply)")]
    if not limit_file.exists() or not settings.inbox.is_dir():
        return []
    limit = int(limit_file.read_text())
    folders = 1 + sum(len(dirs) for _, dirs, _ in os.walk(settings.inbox))  # one watch per folder
    # The limit is per user and shared with editors, sync clients and IDEs, so
    # using more than half of it is already asking for ENOSPC at a bad moment.
    if folders > limit:
        level = FAIL
    elif folders > limit // 2:
        level = WARN
    else:
        return [(OK, f"inotify: {folders} folder(s) to watch, {INOTIFY_SYSCTL} = {limit}")]
    return [(level, f"inotify: {folders} folders to watch but {INOTIFY_SYSCTL} = {limit}; raise it with "
                    f"`sudo sysctl {INOTIFY_SYSCTL}=524288` (and in /etc/sysctl.d/ to keep it), "
                    "or set [watcher] polling = true")]


# The job table, and the folders that machines sharing it must share.
#
# With a PostgreSQL job table, engines on other machines protect images that
# this machine's watcher queued, and write where this machine's settings say.
# The table holds absolute paths, so the inbox, ``export_dir`` and
# ``archive_dir`` must be the same folders on every machine, at the same paths.
# Guessing from the file system type cannot tell (two machines can each mount
# an NFS share of their own); these checks look:
#
# * export and archive folders: each machine's doctor writes a marker file there
#   holding a random token, and records its path and token in the table
#   (``folder_markers``); every doctor then reads the other machines' markers.
#   A marker that is missing, or that holds another token, is a folder that
#   machine does not share with this one.
# * the inbox: nothing is ever written there (the watcher would queue it).
#   Instead, the latest queued images, whichever machine's watcher queued them,
#   must be visible here at the paths in the table: that is what an engine
#   here will open.

MARKER_PREFIX = ".fixative-shared-"  # hidden: sync clients and galleries skip it
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
    skew = store.clock_skew()
    problem = skew_problem(skew)
    if problem is None:
        return OK, f"clock: within {CLOCK_SKEW_WARN_SECONDS:.0f} s of the database server's"
    return (FAIL if abs(skew) > lease_seconds / 2 else WARN), f"clock: {problem}"


def _marker_check(store: JobStore, key: str, folder: Path) -> tuple[str, str]:
    machine = socket.gethostname()
    marker, token = folder / f"{MARKER_PREFIX}{machine}", uuid.uuid4().hex
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A new file renamed into place, as outputs are: anyone who can write to the
        # shared folder could have planted a symlink here, and it must not be written through.
        write_atomically(marker, token.encode())
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


def render(results: list[tuple[str, str]]) -> str:
    # Escaped: the inbox check names queued images, and the marker check paths other machines recorded.
    return "\n".join(f"{level:<4}  {printable(line)}" for level, line in results)
