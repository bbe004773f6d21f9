"""``fixative demo``: the whole daemon flow in a minute, without downloading Stable Diffusion.

It builds a tiny Stable-Diffusion-shaped model with RANDOM weights, writes a
config that points the daemon at a fresh inbox, export folder and state folder
(never ``~/ToProtect`` or the user's own config and job table), starts the real
``fixative run`` as a child process, copies three sample images into the
inbox the way an artist would, and prints ``fixative status`` until they are
done. Then it stops the daemon with SIGTERM, as systemd would.

The outputs are NOT protected: an untrained model gives a perturbation that
means nothing. So the demo says so in its banner, in the model's folder name
(which the engine's logs and every job's metrics quote), in the prompt the
engine embeds, and above every status it prints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fixative.daemon.status import render

BANNER = "PIPELINE DEMO — random weights, this does NOT protect anything"
LABEL = "PIPELINE-DEMO-random-weights-does-NOT-protect"
SAMPLES = ("sunset.png", "cut-out-with-transparency.png", "sketches/study.jpg")
POLL_SECONDS = 1.0
PRINT_EVERY_SECONDS = 5.0  # at most, while nothing changes; any change in the counts prints at once


def run_demo(folder: Path | None, timeout: float) -> int:
    """Run the demo in ``folder`` (kept) or in a temporary folder (removed); 0 if every sample was done."""
    if folder is not None and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        print(f"fixative demo: {folder} is in use (not an empty folder); name a new or empty folder", file=sys.stderr)
        return 2
    root = (folder or Path(tempfile.mkdtemp(prefix="fixative-demo-"))).absolute()
    print(f"=== fixative {BANNER} ===")
    try:
        return _demo(root, timeout, kept=folder is not None)
    finally:
        if folder is None:
            shutil.rmtree(root, ignore_errors=True)


def _demo(root: Path, timeout: float, *, kept: bool) -> int:
    from fixative.engine.tiny import build_tiny_model  # imports torch: only here, not for `fixative --help`

    print(f"building a tiny random model in {root / LABEL} ...", flush=True)
    build_tiny_model(root / LABEL)
    config = _write_config(root)
    samples = _make_samples(root / "samples")
    log_file = root / "daemon.log"

    # The daemon reads this config and nothing else: FIXATIVE_* variables of
    # the user's shell would override it (FIXATIVE_INBOX=~/ToProtect...).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(FIXATIVE_CONFIG=str(config), HF_HUB_OFFLINE="1")  # and it never downloads anything
    # A model this small gains nothing from threads, and on a busy machine
    # OpenMP threads waiting for each other make every step 10-50x slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    print(f"starting the daemon: FIXATIVE_CONFIG={config} fixative run  (its log: {log_file})", flush=True)
    with open(log_file, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "fixative.daemon.cli", "run"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    report = None
    try:
        deadline = time.monotonic() + timeout
        if _wait(env, daemon, deadline, lambda r: r["processes"]["watcher"]["alive"]):
            for sample in SAMPLES:  # as an artist would: a copy, into the inbox and a subfolder of it
                (root / "inbox" / sample).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(samples / sample, root / "inbox" / sample)
            print(f"copied {len(SAMPLES)} sample images into {root / 'inbox'}; "
                  f"in another terminal: FIXATIVE_CONFIG={config} fixative status --watch", flush=True)
            report = _wait(env, daemon, deadline, _all_finished, show=True)
        if report is None:
            why = "the daemon exited" if daemon.poll() is not None else f"timed out after {timeout:g}s"
            print(f"fixative demo: {why}; the end of its log:\n{_tail(log_file)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("fixative demo: interrupted", file=sys.stderr)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)  # what `systemctl --user stop` does
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    print(f"\ndaemon stopped (exit status {daemon.returncode})")
    if kept:
        print(f"outputs in {root / 'export'}, originals in {root / 'inbox'}, log in {log_file}")
    else:
        print("the demo folder was temporary and is now removed; `fixative demo --dir DIR` keeps it")
    print(f"=== {BANNER}: the figures above are meaningless on random weights ===")
    ok = report is not None and report["counts"]["done"] == len(SAMPLES)
    return 0 if ok and daemon.returncode == 0 else 1


def _write_config(root: Path) -> Path:
    # json.dumps makes a valid TOML basic string of any path (quotes, backslashes, unicode).
    def q(value: object) -> str:
        return json.dumps(str(value))

    config = root / "config.toml"
    config.write_text(f"""\
# {BANNER}
inbox = {q(root / "inbox")}
export_dir = {q(root / "export")}
state_dir = {q(root / "state")}

[watcher]
stability_seconds = 1
rescan_seconds = 30

[worker]
heartbeat_seconds = 1
lease_seconds = 30
retry_backoff_seconds = 2

[engine]
model = {q(root / LABEL)}
prompt = "a painting (PIPELINE DEMO: random weights, does NOT protect anything)"
steps = 10
device = "cpu"
dtype = "fp32"
""")
    return config


def _make_samples(folder: Path) -> Path:
    """Three generated paintings, at least 256 px: an RGB PNG, an RGBA PNG and a JPEG in a subfolder."""
    import numpy as np
    from PIL import Image

    from fixative.engine.pixels import to_rgb
    from fixative.engine.tiny import synthetic_paintings

    rgb = [to_rgb(painting) for painting in synthetic_paintings(3, 320, seed=7)]
    yy, xx = np.mgrid[0:288, 0:256]
    # Opaque in the middle, fading out towards the corners: a cut-out with soft edges.
    alpha = np.clip(400 - np.hypot(yy - 144, xx - 128) * 2.2, 0, 255).astype(np.uint8)
    images = {
        SAMPLES[0]: Image.fromarray(rgb[0][:256, :320]),
        SAMPLES[1]: Image.fromarray(np.dstack([rgb[1][:288, :256], alpha])),
        SAMPLES[2]: Image.fromarray(rgb[2][:256, :288]),
    }
    for name, image in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name, quality=92)
    return folder


def _status(env: dict[str, str]) -> dict | None:
    """``fixative status --json``, the real command, as the user would run it."""
    done = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "status", "--json"], env=env,
                          capture_output=True, text=True, timeout=60)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return None


def _all_finished(report: dict) -> bool:
    counts = report["counts"]
    return counts["done"] + counts["failed"] + counts["skipped"] >= len(SAMPLES)


def _wait(env, daemon: subprocess.Popen, deadline: float, until, *, show: bool = False) -> dict | None:
    """Poll status until ``until(report)``; None if the daemon exits or the deadline passes."""
    shown, shown_at = None, 0.0
    while daemon.poll() is None and time.monotonic() < deadline:
        report = _status(env)
        if report is not None:
            finished = until(report)
            changed = json.dumps(report["counts"]) != shown
            if show and (finished or changed or time.monotonic() - shown_at > PRINT_EVERY_SECONDS):
                print(f"\n--- fixative status ({BANNER}) ---\n{render(report)}", flush=True)
                shown, shown_at = json.dumps(report["counts"]), time.monotonic()
            if finished:
                return report
        time.sleep(POLL_SECONDS)
    return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
