"""The ``fixative`` command line: one argparse parser, one function per command.

Commands import their heavy parts lazily, so ``fixative status`` and
``fixative watch`` never import torch (tests/test_status_cli.py checks it).

Exit codes: 0 fine, 1 something failed, 3 the daemon is down (``status``),
75 another daemon holds the state folder (``run``, ``watch``, ``engine``; see
``fixative.daemon.lock``), 78 (EX_CONFIG) the configuration is invalid, 141 the reader of
the output went away (``status | head``). The unit does not restart on 75 or
78: restarting cannot help either.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from fixative.daemon.inbox_filter import WatcherConfigError, ignore_reason
from fixative.daemon.lock import EXIT_ALREADY_RUNNING, AlreadyRunning, hold
from fixative.daemon.settings import EX_CONFIG, ConfigError, Settings, config_path, load_settings
from fixative.daemon.store import STATES, StoreUnavailable, open_store, store_exists
from fixative.daemon.text import printable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fixative",
        description="Protect artwork from Stable Diffusion style mimicry.",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE",
        help="settings file (default: $FIXATIVE_CONFIG, then ~/.config/fixative/config.toml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from fixative.daemon import check_command, protect_command

    protect_command.add_parsers(commands)
    check_command.add_parser(commands)

    p = commands.add_parser("watch", help="watch the inbox and queue finished images (no GPU needed)")
    p.set_defaults(run=_watch)

    p = commands.add_parser("engine", help="protect queued images on one device (a GPU)")
    p.add_argument("--device", type=_device, metavar="DEVICE",
                   help="cpu, cuda, cuda:1, mps... (default: [engine] device); queued jobs run here whatever they were queued with")
    # How `fixative run` hands its state-folder lock to its engine child (fixative.daemon.lock).
    p.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--owner", help=argparse.SUPPRESS)  # set by `fixative run`, to release a dead engine's job
    p.add_argument("--label", help=argparse.SUPPRESS)  # set by `fixative run`: "cpu#2" for a device's second engine
    p.set_defaults(run=_engine)

    p = commands.add_parser("run", help="the daemon: watcher + engine, as the systemd unit starts it")
    p.set_defaults(run=_run)

    p = commands.add_parser("status", help="is the daemon up, and what is it doing")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p.set_defaults(run=_status)

    p = commands.add_parser("list", help="list jobs, newest first")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_list)

    p = commands.add_parser("retry", help="queue failed jobs again")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=int, help="the job id, as `fixative list` shows it")
    which.add_argument("--failed", action="store_true", help="every failed job")
    p.set_defaults(run=_retry)

    p = commands.add_parser("enqueue", help="queue images by hand, as if dropped into the inbox")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(run=_enqueue)

    p = commands.add_parser("init", help="write a commented config file where fixative reads it (replaces nothing)",
                            description="Writes the example config (every setting at its default, explained) to "
                            "--config FILE, $FIXATIVE_CONFIG or ~/.config/fixative/config.toml, the file fixative reads. "
                            "An existing file is never replaced.")
    p.set_defaults(run=_init)

    p = commands.add_parser("doctor", help="check torch, the device, the model, folders, the job table and inotify limits")
    p.set_defaults(run=_doctor)

    p = commands.add_parser("demo", help="see the whole flow on a tiny RANDOM model (a pipeline demo: protects nothing)",
                            description="Runs the real daemon on a temporary inbox with a tiny random model and "
                            "three sample images. Ignores your config; never touches your inbox or job table.")
    p.add_argument("--dir", type=Path, metavar="DIR", help="a new or empty folder to run in and keep (default: temporary)")
    p.add_argument("--timeout", type=float, default=600, metavar="SECONDS", help="give up after this long (default 600)")
    p.set_defaults(run=_demo)
    return parser


# What a shell reports for a program killed by SIGPIPE, as `cat` would be.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # `fixative status | head`: the reader has what it wanted. Point stdout
        # at /dev/null so that the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (ConfigError, WatcherConfigError) as error:
        for line in getattr(error, "lines", [str(error)]):
            print(f"fixative: config: {line}", file=sys.stderr)
        return EX_CONFIG
    except AlreadyRunning as error:
        print(f"fixative: {error}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except StoreUnavailable as error:  # enqueue, retry: nothing was written, so nothing is half-done
        print(f"fixative: {error}; {error.remedy}", file=sys.stderr)
        return 1


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _stop_event() -> threading.Event:
    """An event set by SIGTERM (systemctl stop) or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _watch(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from fixative.daemon.logs import configure_logging
    from fixative.daemon.watcher import run_watcher

    configure_logging(args.verbose)
    with hold(settings.state_dir, "watch"):
        return run_watcher(settings, _stop_event())


def _device(value: str) -> str:
    from pydantic import TypeAdapter, ValidationError

    from fixative.engine.options import Device

    try:
        return TypeAdapter(Device).validate_python(value)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: auto, cpu, mps, cuda or cuda:N") from None


def _engine(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from fixative.daemon.logs import configure_logging
    from fixative.daemon.worker import run_worker

    configure_logging(args.verbose)
    if args.device:
        settings = settings.model_copy(update={"engine": settings.engine.model_copy(update={"device": args.device})})
    with hold(settings.state_dir, "engine", inherited_fd=args.lock_fd):
        return run_worker(settings, _stop_event(), args.owner, args.label)


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from fixative.engine.errors import ModelError
    from fixative.engine.model_files import resolve_model_folder

    # Before any folder or engine: a first run without the model says so here, in
    # plain words, instead of creating the inbox and failing in an engine's log.
    try:
        resolve_model_folder(settings.engine.model)
    except ModelError as error:
        print(f"fixative: {error}", file=sys.stderr)
        return EX_CONFIG
    from fixative.daemon.logs import configure_logging
    from fixative.daemon.supervisor import run_daemon

    configure_logging(args.verbose)
    # The child reads the same config file as this process, with the same flags.
    engine_command = [sys.executable, "-m", "fixative.daemon.cli"]
    if args.config:
        engine_command += ["--config", str(args.config.absolute())]
    if args.verbose:
        engine_command.append("--verbose")
    with hold(settings.state_dir, "run") as lock_fd:
        return run_daemon(settings, _stop_event(), engine_command + ["engine", "--lock-fd", str(lock_fd)],
                          pass_fds=(lock_fd,))


def _status(args: argparse.Namespace) -> int:
    from fixative.daemon.liveness import daemon_id
    from fixative.daemon.status import EXIT_DAEMON_DOWN, build_report, render

    settings = _settings(args)
    code = EXIT_DAEMON_DOWN
    try:
        while True:
            report = build_report(settings)
            if args.json:
                print(json.dumps(report), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\x1b[H\x1b[J", end="")  # redraw in place
                print(render(report, daemon_id(settings)), flush=True)
            code = 0 if report["up"] else EXIT_DAEMON_DOWN
            if not args.watch:
                return code
            time.sleep(args.watch)
    except KeyboardInterrupt:  # the way out of --watch
        return code


def _list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not store_exists(settings):
        jobs = []
    else:
        store = open_store(settings)
        jobs = store.jobs(args.state, limit=args.limit)
        store.close()
    if args.json:
        print(json.dumps([asdict(job) for job in jobs]))
        return 0
    if not jobs:
        print(f"no {args.state} jobs" if args.state else "no jobs yet")
        return 0
    for job in jobs:
        if job.state == "skipped":
            note = f"same content as #{job.duplicate_of}"
        elif job.state in ("failed", "superseded"):
            note = job.error or ""
        elif job.state == "done":
            note = f"-> {job.output_path}"
        elif job.state == "running" and job.progress_total:
            note = f"step {job.progress_step}/{job.progress_total}"
        else:
            note = f"attempt {job.attempts}: {job.error}" if job.error else ""
        print(f"#{job.id:<5} {job.state:<8} {printable(job.source_path)}  {printable(note)}".rstrip())
    return 0


def _retry(args: argparse.Namespace) -> int:
    store = open_store(_settings(args))
    count = store.retry(args.id, all_failed=args.failed)
    store.close()
    if args.id is not None and count == 0:
        print(f"fixative: job #{args.id} is not a failed job that can be retried", file=sys.stderr)
        return 1
    print(f"queued again: {count} job(s)")
    return 0


def _enqueue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    inbox = settings.inbox.resolve()
    store = open_store(settings)
    refused = 0
    for name in args.files:
        path = name.absolute()
        # A file in the inbox keeps its subfolder in the export folder, as the watcher's would.
        base = inbox if path.is_relative_to(inbox) else path.parent
        problem = _enqueue_problem(path, base)
        if problem:
            print(f"fixative: {printable(str(name))}: {problem}", file=sys.stderr)
            refused += 1
            continue
        job = store.enqueue(path, settings.engine, inbox=base)
        extra = f" (same content as #{job.duplicate_of})" if job.duplicate_of else ""
        print(f"#{job.id} {job.state}: {printable(str(path))}{extra}")
    store.close()
    return 1 if refused else 0


def _enqueue_problem(path: Path, base: Path) -> str | None:
    """The watcher's rules for a file named on the command line; None if it may be queued."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    if stat.S_ISLNK(mode):
        return "is a symlink; fixative does not follow links, name the file itself"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return ignore_reason(path, base)


def _init(args: argparse.Namespace) -> int:
    from importlib.resources import files

    target = config_path(args.config)
    packaged = files("fixative.daemon")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "x") as config:  # "x": fails if anything is there, even a file made a moment ago
            config.write(packaged.joinpath("config.example.toml").read_text())
    except FileExistsError:
        print(f"fixative: {target} already exists, and init replaces nothing; edit it, "
              "or move it away and run init again", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"fixative: cannot write {target}: {error.strerror or error}", file=sys.stderr)
        return 1
    print(f"wrote {target}: every setting at its default, each explained; edit it, then run `fixative doctor`")
    print(f"to run fixative as a service, copy {packaged.joinpath('systemd', 'fixative.service')} "
          "to ~/.config/systemd/user/ (README: Running it as a service)")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from fixative.daemon.doctor import FAIL, render, run_checks

    results = run_checks(_settings(args), config_path(args.config))
    print(render(results))
    return 1 if any(level == FAIL for level, _ in results) else 0


def _demo(args: argparse.Namespace) -> int:
    from fixative.daemon.demo import run_demo

    return run_demo(args.dir, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
