"""The worker's one loaded model: loaded once, and again only when a job's options need another.

A job is protected with the options it was queued with (its fingerprint says
so), and those may name another model, dtype or prompt than the one loaded.
Only the options that :func:`fixative.engine.model.load_model` builds into the
model force a reload; the rest (steps, strength...) are the attack's.
"""

from __future__ import annotations

from typing import Any

import structlog

from fixative.daemon.pulse import Pulse
from fixative.daemon.settings import Settings
from fixative.daemon.store import Job
from fixative.engine.options import EngineOptions

log = structlog.get_logger()

# The options that load_model builds into the model; a job queued with other
# values needs the model loaded again.
MODEL_OPTIONS = ("model", "models", "device", "dtype", "low_vram", "prompt")


def job_options(settings: Settings, job: Job) -> EngineOptions:
    """The options ``job`` was queued with; the device is this engine's (it is not in the fingerprint)."""
    if job.options is None:  # a row written before the job table kept options
        return settings.engine
    return EngineOptions.model_validate({**job.options, "device": settings.engine.device})


class ModelCache:
    def __init__(self, pulse: Pulse):
        self.pulse = pulse
        self.model: Any = None  # fixative.engine.model.LoadedModel
        self.loaded_with: dict[str, Any] | None = None  # the MODEL_OPTIONS self.model was loaded with

    def load(self, options: EngineOptions) -> Any:
        """The model for ``options``: the one loaded, if it fits them, else a new one (EngineError if it cannot load).

        Several ``models`` load as one ``fixative.engine.ensemble.Ensemble``.
        """
        from fixative.engine.ensemble import load_protector

        wanted = {name: getattr(options, name) for name in MODEL_OPTIONS}
        if self.model is not None and wanted == self.loaded_with:
            return self.model
        log.info("engine.loading_model", model=list(options.members) if options.models else options.model)
        self.model = self.loaded_with = None  # free the old model first: two may not fit in memory
        self.pulse.loading = True  # minutes from a cold disk; not a stall
        try:
            self.model = load_protector(options)
        finally:
            self.pulse.loading = False
            self.pulse.progressed()
        self.loaded_with = wanted
        return self.model
