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
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fixative.daemon.settings import Settings

OK, WARN, FAIL = "ok", "WARN", "FAIL"
INOTIFY_SYSCTL = "fs.inotify.max_user_watches"
LOW_DISK_BYTES = 1 << 30  # a few protected PNGs of large artwork, with room to spare
PROBE_TIMEOUT_SECONDS = 300  # the first CUDA initialisation can take minutes
# The README's words, from bench/README.md's quiet full-scale run (sds, 512x512, 2 cores: 889 s).
CPU_SPEED = "one 512x512 image takes about 15 minutes on 2 cores (bench/README.md)"


def run_checks(settings: Settings) -> list[tuple[str, str]]:
    """Every check as (level, one line for the artist)."""
    results = [(OK, f"python {sys.version.split()[0]} ({sys.executable})")]
    results += _engine_checks(settings)
    results += _folder_checks(settings)
    from fixative.daemon.shared_storage import store_checks  # it uses this module's levels

    results += store_checks(settings)
    results += _inotify_checks(settings)
    return results


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
    if "model_error" in found:
        results.append((FAIL, f"model: {found['model_error']}"))
    else:
        results.append((OK, f"model: {settings.engine.model} on disk at {found['model_path']}"))
    return results


def probe() -> None:
    """Run in a child Python: report torch, each device (argv[2]) and the model location as JSON on stdout."""
    import torch

    from fixative.engine.errors import EngineError
    from fixative.engine.model import pick_device, pick_dtypes, resolve_model_folder
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
    try:
        found["model_path"] = str(resolve_model_folder(options.model))
    except EngineError as error:
        found["model_error"] = str(error)
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


def render(results: list[tuple[str, str]]) -> str:
    return "\n".join(f"{level:<4}  {line}" for level, line in results)
