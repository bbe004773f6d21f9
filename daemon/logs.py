"""Logging: structlog for our code, with the standard library's loggers routed through it.

Readable colour lines when stderr is a terminal; one JSON object per line
when it is anything else (journald's socket under systemd, a file, a pipe), so
that ``journalctl --user -u fixative -o cat | jq`` works. ``JOURNAL_STREAM``
alone does not decide it: a terminal started by a systemd user service (as
desktop terminals are) inherits that variable, with stderr on the terminal. Logs go to stderr, keeping
stdout for command output such as ``status --json``.

torch, diffusers and watchdog log through the standard library; the
``ProcessorFormatter`` below gives their records the same renderer, so the
journal never mixes two formats.
"""

from __future__ import annotations

import logging
import sys

import structlog

# Libraries that install their own stderr handler and stop propagation, so their
# messages would bypass our formatter and arrive unstructured in the journal.
_SELF_HANDLED_LIBRARIES = ("transformers", "diffusers")


def configure_logging(verbose: bool = False) -> None:
    as_json = not sys.stderr.isatty()
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,  # e.g. job_id, bound by the engine for each job
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    renderer: structlog.typing.Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)  # the traceback as a string field
    else:
        renderer = structlog.dev.ConsoleRenderer()

    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,  # records from stdlib loggers get the same fields
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # watchdog logs every inotify event at DEBUG; -v is for our own debug lines.
    logging.getLogger("watchdog").setLevel(logging.INFO)
    logging.captureWarnings(True)  # diffusers and torch warn through `warnings`
    adopt_library_loggers()


def adopt_library_loggers() -> None:
    """Send transformers' and diffusers' logs through our handler.

    They attach their own handler the first time they are imported, so the
    engine calls this again after loading the model.
    """
    for name in _SELF_HANDLED_LIBRARIES:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
