"""``fixative status``: what the daemon is doing, read from the job table alone.

It never talks to the daemon's processes: the watcher and each engine write a
heartbeat row every few seconds, and a process whose heartbeat is older than
:data:`fixative.daemon.liveness.ALIVE_WITHIN_SECONDS` counts as dead. So status works the same from a
terminal, a script or a cron job, and cannot hang on a stuck daemon.

The engines shown are those this machine's settings start (one per ``[engine]
devices`` entry, shown even if they never beat), and any other engine that is
alive, such as one on another machine sharing the job table.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from fixative.daemon.liveness import (daemon_id, engine_labels, engine_name, host_suffix, is_alive, is_stalled,
                                      watcher_name)
from fixative.daemon.settings import Settings
from fixative.daemon.text import printable
from fixative.daemon.store import (STATES, Job, StoreUnavailable, describe_store, free_bytes, looks_full, open_store,
                                   store_exists)

# LSB's exit status for "program is not running", as `systemctl status` uses it.
EXIT_DAEMON_DOWN = 3


def _watcher(beats: dict[str, dict[str, Any]], daemon: str) -> dict[str, Any] | None:
    """This daemon's watcher; on a machine that runs none (engines only, on a shared table), the one that beat last.

    "watcher" alone is the row of a watcher from before rows were named by host.
    """
    if watcher_name(daemon) in beats:
        return beats[watcher_name(daemon)]
    others = [beat for name, beat in beats.items() if name == "watcher" or name.startswith("watcher@")]
    return max(others, key=lambda beat: beat["beat_at"], default=None)


def _never_started(**extra: Any) -> dict[str, Any]:
    return {"alive": False, "stalled": False, "pid": None, "status": "never started", "age_seconds": None,
            "progress_age_seconds": None, **extra}


def build_report(settings: Settings, failures: int = 10, latest_done: int = 10) -> dict[str, Any]:
    """The ``status --json`` object. Creates nothing when the daemon has never run."""
    now = time.time()
    daemon = daemon_id(settings)
    configured = {engine_name(label, daemon): device
                  for label, device in zip(engine_labels(settings.devices), settings.devices)}
    report: dict[str, Any] = {
        "up": False,
        # Why it is not up, when that is not a dead process: the daemon waits out a full
        # state disk without a heartbeat to record it in (fixative.daemon.store_wait).
        "waiting": None,
        "database": describe_store(settings),  # a PostgreSQL URL without its password
        "processes": {"watcher": _never_started()},
        # One entry per engine: its heartbeat, its job now, what it did in the last 24 h.
        "engines": [_never_started(name=name, device=device, host=socket.gethostname(), running=None, batch=[],
                                   throughput_24h={"done": 0, "mean_seconds": None})
                    for name, device in configured.items()],
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
            beats = {name: {"alive": is_alive(beat), "stalled": is_stalled(beat), **beat}
                     for name, beat in store.processes().items()}
        except StoreUnavailable as error:  # a PostgreSQL job table that is away: nothing else can be read
            report["waiting"] = f"{error}; {error.remedy}"
            return report
        if (watcher := _watcher(beats, daemon)) is not None:
            report["processes"]["watcher"] = watcher
        running = store.running_jobs()
        report["engines"] = _engines(report["engines"], beats, running, store.throughput_by_engine(24), now)
        if looks_full(settings):
            report["waiting"] = (f"the state folder's disk is full ({settings.state_dir}: "
                                 f"{free_bytes(settings.state_dir) // 1024} KiB free); "
                                 "nothing can be queued or recorded until there is space, then it resumes by itself")
        report["up"] = report["waiting"] is None and bool(report["engines"]) and all(
            p["alive"] and not p["stalled"] for p in [report["processes"]["watcher"], *report["engines"]])
        report["counts"] = store.counts()
        report["running"] = _running(running[0], now) if running else None
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


def _engines(configured: list[dict[str, Any]], beats: dict[str, dict[str, Any]], running: list[Job],
             throughput: dict[str, dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """This machine's engines, with their beats if any, then any other live engine; each with its job and figures."""
    ours = {engine["name"] for engine in configured}
    engines = [{**engine, **beats.get(engine["name"], {})} for engine in configured]
    engines += [{"name": name, **beat} for name, beat in sorted(beats.items())
                if beat["device"] is not None and beat["alive"] and name not in ours]
    jobs: dict[str, list[Job]] = {}
    for job in running:  # the latest claimed first, should an expired lease linger
        jobs.setdefault(job.engine, []).append(job)
    for engine in engines:
        # A batch ([engine] batch_size): every job the engine holds, the group being
        # protected with its progress, the jobs waiting for their group "starting".
        held = sorted(jobs.get(engine["name"], []), key=lambda job: (job.progress_step is None, job.id))
        batch = [_running(job, now) for job in held] if engine["alive"] else []
        engine["batch"] = batch
        engine["running"] = batch[0] if batch else None
        engine["throughput_24h"] = throughput.get(engine["name"], {"done": 0, "mean_seconds": None})
    return engines


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


def render(report: dict[str, Any], daemon: str = "") -> str:
    """The report for a person at a terminal; ``daemon``: this daemon's id (:func:`fixative.daemon.liveness.daemon_id`).

    One engine reads as it always did (``engine alive``, then a ``now:`` line);
    several get a line each, with their pid, job and last 24 hours. This
    daemon's own engines are named by their label alone; any other's in full.
    """
    engines = report["engines"]
    working = sum(e["alive"] and not e["stalled"] for e in engines)
    watching = report["processes"]["watcher"]["alive"] and not report["processes"]["watcher"]["stalled"]
    verdict = ("up" if report["up"] else f"WAITING ({report['waiting']})" if report["waiting"]
               else f"DEGRADED ({working} of {len(engines)} engines working)" if watching and working else "DOWN")
    watcher = f"watcher {_process(report['processes']['watcher'])}"
    if len(engines) == 1:
        lines = [f"fixative is {verdict}: {watcher}, engine {_process(engines[0])}"]
    else:
        lines = [f"fixative is {verdict}: {watcher}, {len(engines)} engines"]
        for engine in engines:
            title = engine["name"].removesuffix(host_suffix(daemon))
            pid = f" (pid {engine['pid']})" if engine["pid"] else ""
            day = engine["throughput_24h"]
            mean = f", {_duration(day['mean_seconds'])} per image" if day["mean_seconds"] else ""
            lines.append(f"  {title}{pid} {_process(engine)} · last 24h: {day['done']} done{mean}")
            lines += [f"    {_now(running)}" for running in engine["batch"]]
    lines.append(" · ".join(f"{state} {report['counts'][state]}" for state in STATES))
    if report["running"] and len(engines) == 1:
        lines += [_now(running) for running in engines[0]["batch"] or [report["running"]]]
    day = report["throughput_24h"]
    mean = f", {_duration(day['mean_seconds'])} per image" if day["mean_seconds"] else ""
    lines.append(f"last 24h: {day['done']} done{mean}, {day['failed']} failed, {day['skipped']} skipped as duplicates")
    if report["latest_done"]:
        lines.append("latest done:")
        for done in report["latest_done"][:3]:
            lines.append(f"  #{done['id']} {done['output']}{_figures(done['metrics'])}")
            lines += [f"    warning: {warning}" for warning in done["metrics"].get("warnings", [])]
        survives = survival_line(report["latest_done"][0]["metrics"])
        if survives:
            lines.append(f"  #{report['latest_done'][0]['id']} survives: {survives}")
    if report["failures"]:
        lines.append("latest failures (fixative retry ID | --failed):")
        lines += [f"  #{f['id']} {f['path']}: {f['error']}"
                  f"{' (will retry)' if f['state'] == 'queued' else ''}"
                  for f in report["failures"]]
    # Every line escaped here, once: a file name or an engine's status can be anywhere in them.
    return "\n".join(printable(line) for line in lines)


def _now(running: dict[str, Any]) -> str:
    progress = f"{running['step']}/{running['total']} ({running['percent']}%)" if running["total"] else "starting"
    speed = f" · {running['seconds_per_step']:.1f} s/step" if running["seconds_per_step"] else ""
    eta = f" · ETA {_duration(running['eta_seconds'])}" if running["eta_seconds"] is not None else ""
    return f"now: {running['relative_path']} {progress}{speed}{eta} (attempt {running['attempt']})"


def _figures(metrics: dict[str, Any]) -> str:
    shown = [f"{label} {metrics[key]}{unit}" for key, label, unit in
             (("psnr", "PSNR", " dB"), ("max_delta", "max change", " levels"), ("protection_gain", "gain", ""))
             if key in metrics]
    return " · " + " · ".join(shown) if shown else ""


def survival_line(metrics: dict[str, Any]) -> str:
    """'jpeg85 96% · jpeg75 93% · half+jpeg75 88%': what part of the effect each common pipeline leaves.

    From an image's report, as the engine makes it: status shows a job's, protect each image's.
    """
    shown = [f"{name} {'n/a' if served['survival'] is None else format(served['survival'], '.0%')}"
             for name, served in metrics.get("survival", {}).items()]
    return " · ".join(shown)


def _process(beat: dict[str, Any]) -> str:
    if beat["age_seconds"] is None:
        return "never started"
    if beat["alive"] and beat["stalled"]:
        return f"STALLED (no progress for {_duration(beat['progress_age_seconds'])}: {beat['status']})"
    state = "alive" if beat["alive"] else "stopped" if beat["status"].startswith("stopped") else "dead"
    why = beat["status"].removeprefix("stopped").removeprefix(": ")  # an engine that could not start says why
    detail = f": {beat['status']}" if beat["status"] and beat["alive"] else f": {why}" if state == "stopped" and why else ""
    return f"{state} ({_duration(beat['age_seconds'])} ago{detail})"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
