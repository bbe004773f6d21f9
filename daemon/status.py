"""``fixative status``: what the daemon is doing, read from the job table alone.

It never talks to the daemon's processes: the watcher and the engine write a
heartbeat row every few seconds, and a process whose heartbeat is older than
:data:`ALIVE_WITHIN_SECONDS` counts as dead. So status works the same from a
terminal, a script or a cron job, and cannot hang on a stuck daemon.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from fixative.daemon.settings import Settings
from fixative.daemon.store import STATES, Job, StoreUnavailable, describe_store, open_store, store_exists

# Both processes beat at least every 10 s (watcher 5 s, engine worker.heartbeat_seconds),
# so a minute of silence means the process is gone.
ALIVE_WITHIN_SECONDS = 60.0
# A live process whose loop has not moved for this long is stuck (a hung GPU
# driver). The same figure as the unit's WatchdogSec (tests/test_systemd_unit.py
# checks it): `fixative run` pings the watchdog only when the engine has moved
# since the last ping, so systemd restarts a hung engine at the moment status
# starts to call it STALLED. Long enough for the longest silence measured in a
# healthy engine, on 2 CPU cores (bench/README.md, 768x512): 21 s per step, and
# 268 s for the first step plus the report's figures, which report no progress.
STALLED_AFTER_SECONDS = 600.0
PROCESSES = ("watcher", "engine")
# What status calls a full state disk. SQLite needs a few pages per write; with
# less than this left for this user (statvfs f_bavail), writes are failing or about to.
FULL_BELOW_BYTES = 1 << 20
# LSB's exit status for "program is not running", as `systemctl status` uses it.
EXIT_DAEMON_DOWN = 3


def build_report(settings: Settings, failures: int = 10, latest_done: int = 10) -> dict[str, Any]:
    """The ``status --json`` object. Creates nothing when the daemon has never run."""
    now = time.time()
    report: dict[str, Any] = {
        "up": False,
        # Why it is not up, when that is not a dead process: the daemon waits out a full
        # state disk without a heartbeat to record it in (daemon.state_disk).
        "waiting": None,
        "database": describe_store(settings),  # a PostgreSQL URL without its password
        "processes": {name: {"alive": False, "stalled": False, "pid": None, "status": "never started",
                             "age_seconds": None, "progress_age_seconds": None}
                      for name in PROCESSES},
        "counts": dict.fromkeys(STATES, 0),
        "running": None,
        "failures": [],
        "latest_done": [],
        "throughput_24h": {"hours": 24, "done": 0, "failed": 0, "skipped": 0, "mean_seconds": None},
    }
    if not store_exists(settings):
        return report
    store = open_store(settings)
    try:
        try:
            beats = store.processes()
        except StoreUnavailable as error:  # a PostgreSQL job table that is away: nothing else can be read
            report["waiting"] = f"{error}; {error.remedy}"
            return report
        for name, beat in beats.items():
            report["processes"][name] = {"alive": is_alive(beat), "stalled": is_stalled(beat), **beat}
        if looks_full(settings.state_dir):
            report["waiting"] = (f"the state folder's disk is full ({settings.state_dir}: "
                                 f"{free_bytes(settings.state_dir) // 1024} KiB free); "
                                 "nothing can be queued or recorded until there is space, then it resumes by itself")
        report["up"] = report["waiting"] is None and all(p["alive"] and not p["stalled"]
                                                          for p in report["processes"].values())
        report["counts"] = store.counts()
        running = store.running()
        report["running"] = _running(running, now) if running else None
        report["failures"] = [
            # "queued" here means the failure was transient and it will be retried by itself.
            {"id": job.id, "path": job.source_path, "error": job.error, "state": job.state,
             "attempts": job.attempts, "at": job.updated_at}
            for job in store.failures(failures)
        ]
        # The per-image figures answer "did it do anything?" without digging in the logs.
        report["latest_done"] = [
            {"id": job.id, "path": job.source_path, "output": job.output_path, "at": job.finished_at,
             "metrics": job.metrics}
            for job in store.jobs("done", limit=latest_done)
        ]
        report["throughput_24h"] = store.throughput(24)
    finally:
        store.close()
    return report


def free_bytes(state_dir: Path) -> int:
    folder = state_dir
    while not folder.exists():  # not created yet: the disk it will be on
        folder = folder.parent
    return shutil.disk_usage(folder).free


def looks_full(state_dir: Path) -> bool:
    return free_bytes(state_dir) < FULL_BELOW_BYTES


def is_alive(beat: dict[str, Any] | None) -> bool:
    return beat is not None and beat["age_seconds"] < ALIVE_WITHIN_SECONDS and beat["status"] != "stopped"


def is_stalled(beat: dict[str, Any] | None) -> bool:
    return beat is not None and beat["progress_age_seconds"] > STALLED_AFTER_SECONDS


def is_healthy(beat: dict[str, Any] | None) -> bool:
    """Alive and moving: what `status` calls up."""
    return is_alive(beat) and not is_stalled(beat)


def _running(job: Job, now: float) -> dict[str, Any]:
    step, total = job.progress_step, job.progress_total
    elapsed = now - job.started_at if job.started_at else None
    per_step = elapsed / step if elapsed and step else None
    return {
        "id": job.id,
        "path": job.source_path,
        "relative_path": job.relative_path,
        "attempt": job.attempts,
        "step": step,
        "total": total,
        "percent": round(100 * step / total, 1) if step is not None and total else None,
        "elapsed_seconds": elapsed,
        "seconds_per_step": per_step,
        "eta_seconds": per_step * (total - step) if per_step and total else None,
    }


def render(report: dict[str, Any]) -> str:
    """The report for a person at a terminal."""
    processes = report["processes"]
    verdict = "up" if report["up"] else f"WAITING ({report['waiting']})" if report["waiting"] else "DOWN"
    lines = [
        f"fixative is {verdict}: " + ", ".join(f"{name} {_process(processes[name])}" for name in PROCESSES),
        " · ".join(f"{state} {report['counts'][state]}" for state in STATES),
    ]
    running = report["running"]
    if running:
        progress = f"{running['step']}/{running['total']} ({running['percent']}%)" if running["total"] else "starting"
        speed = f" · {running['seconds_per_step']:.1f} s/step" if running["seconds_per_step"] else ""
        eta = f" · ETA {_duration(running['eta_seconds'])}" if running["eta_seconds"] is not None else ""
        lines.append(f"now: {printable(running['relative_path'])} {progress}{speed}{eta} (attempt {running['attempt']})")
    day = report["throughput_24h"]
    mean = f", {_duration(day['mean_seconds'])} per image" if day["mean_seconds"] else ""
    lines.append(f"last 24h: {day['done']} done{mean}, {day['failed']} failed, {day['skipped']} skipped as duplicates")
    if report["latest_done"]:
        lines.append("latest done:")
        for done in report["latest_done"][:3]:
            lines.append(f"  #{done['id']} {printable(done['output'])}{_figures(done['metrics'])}")
            lines += [f"    warning: {printable(warning)}" for warning in done["metrics"].get("warnings", [])]
        survives = _survival(report["latest_done"][0]["metrics"])
        if survives:
            lines.append(f"  #{report['latest_done'][0]['id']} survives: {survives}")
    if report["failures"]:
        lines.append("latest failures (fixative retry ID | --failed):")
        lines += [f"  #{f['id']} {printable(f['path'])}: {printable(f['error'])}"
                  f"{' (will retry)' if f['state'] == 'queued' else ''}"
                  for f in report["failures"]]
    return "\n".join(lines)


def printable(text: str | None) -> str:
    """``text`` on one terminal line: control characters escaped.

    A file name may hold a newline (or an escape sequence), and printed raw it
    would split a job across lines or repaint the terminal.
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text or "")


def _figures(metrics: dict[str, Any]) -> str:
    shown = [f"{label} {metrics[key]}{unit}" for key, label, unit in
             (("psnr", "PSNR", " dB"), ("max_delta", "max change", " levels"), ("protection_gain", "gain", ""))
             if key in metrics]
    return " · " + " · ".join(shown) if shown else ""


def _survival(metrics: dict[str, Any]) -> str:
    """'jpeg85 96% · jpeg75 93% · half+jpeg75 88%': what part of the effect each common pipeline leaves."""
    shown = [f"{name} {'n/a' if served['survival'] is None else format(served['survival'], '.0%')}"
             for name, served in metrics.get("survival", {}).items()]
    return " · ".join(shown)


def _process(beat: dict[str, Any]) -> str:
    if beat["age_seconds"] is None:
        return "never started"
    if beat["alive"] and beat["stalled"]:
        return f"STALLED (no progress for {_duration(beat['progress_age_seconds'])}: {beat['status']})"
    state = "alive" if beat["alive"] else "stopped" if beat["status"] == "stopped" else "dead"
    detail = f": {beat['status']}" if beat["status"] and beat["alive"] else ""
    return f"{state} ({_duration(beat['age_seconds'])} ago{detail})"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
