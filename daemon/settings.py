"""The daemon's settings: a TOML file, overridden by ``FIXATIVE_*`` environment variables.

Priority, highest first: arguments passed in code > environment > TOML file > defaults.
Nested tables use ``__`` in the environment: ``FIXATIVE_ENGINE__STEPS=50`` sets
``[engine] steps = 50``.

Call :func:`load_settings`; it turns every problem into a :class:`ConfigError`
with one line per problem, naming the key and where its value came from (the
file or the variable), which the CLI prints before exiting with
:data:`EX_CONFIG`. ``Settings()`` on its own reads only the environment.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from fixative.daemon.inbox_filter import WatcherConfigError, check_folders
from fixative.engine.options import Device, EngineOptions

# sysexits.h EX_CONFIG. The systemd unit has RestartPreventExitStatus=78, so a
# config error stops the service instead of restarting it in a loop.
EX_CONFIG = 78


def _absolute(path: Path) -> Path:
    # "~" must work in TOML and in the environment, where no shell expands it.
    return path.expanduser().absolute()


UserPath = Annotated[Path, AfterValidator(_absolute)]


def _xdg(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or fallback).expanduser()


def default_config_file() -> Path:
    return _xdg("XDG_CONFIG_HOME", "~/.config") / "fixative" / "config.toml"


class WatcherSettings(BaseModel):
    """``[watcher]``: how files in the inbox are noticed."""

    model_config = ConfigDict(extra="forbid")

    stability_seconds: float = Field(5.0, gt=0)
    rescan_seconds: float = Field(300.0, gt=0)
    polling: bool = False
    poll_interval_seconds: float = Field(2.0, gt=0)


class WorkerSettings(BaseModel):
    """``[worker]``: leases and retries of the engine process."""

    model_config = ConfigDict(extra="forbid")

    lease_seconds: float = Field(300, gt=0)
    heartbeat_seconds: float = Field(10, gt=0)
    max_attempts: int = Field(3, ge=1)
    retry_backoff_seconds: float = Field(30, ge=0)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> WorkerSettings:
        # A lease that expires between two heartbeats would hand a live job to
        # someone else and run it twice.
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds: must be at most half of lease_seconds "
                f"(got {self.heartbeat_seconds:g} and {self.lease_seconds:g})"
            )
        return self


class EngineSettings(EngineOptions):
    """``[engine]``: the options every image is protected with, plus ``devices`` and ``batch_size``.

    ``devices`` and ``batch_size`` are read here, where people look for them,
    but they are no options of an image: :class:`Settings` moves them out, and
    ``settings.engine`` is the plain :class:`EngineOptions` that is stored on
    each job and fingerprinted.
    """

    # One engine process per entry under `fixative run`, each on its device.
    # The same device may be listed twice: two engines then share it (each
    # with its own model copy); on a CPU that is how two engines are tried.
    devices: list[Device] | None = Field(None, min_length=1)
    # How many queued jobs of the same settings an engine claims and protects as
    # one batch per PGD step (fixative.daemon.worker). Memory grows with it; 1 is one at a time.
    batch_size: int = Field(1, ge=1)


# The TOML file that Settings reads; set by load_settings. A context variable
# rather than a class attribute, so that two loads (tests, threads) never see
# each other's file.
_toml_file: ContextVar[Path | None] = ContextVar("fixative_toml_file", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FIXATIVE_",
        env_nested_delimiter="__",
        extra="forbid",  # a typo in the TOML file is an error, not a silently ignored key
        validate_default=True,  # so the "~" in the defaults is expanded too
    )

    inbox: UserPath = Path("~/ToProtect")
    export_dir: UserPath = Path("~/Protected")
    state_dir: UserPath = Field(default_factory=lambda: _xdg("XDG_STATE_HOME", "~/.local/state") / "fixative")
    # The job table. None: the SQLite file state_dir/jobs.db, for one machine. A
    # postgresql:// URL: a PostgreSQL database that engines on several machines share.
    state_db: str | None = None
    # What happens to an original once its protected copy is written. "archive"
    # moves it to archive_dir, which empties the inbox as work completes.
    after: Literal["keep", "archive"] = "keep"
    # None means a sibling of the inbox, "<inbox>-originals" (~/ToProtect-originals):
    # outside the inbox so the watcher does not see the files again, outside the
    # export folder so an unprotected original is never published by mistake,
    # and not hidden in the state folder where an artist would not find it.
    archive_dir: UserPath | None = None
    watcher: WatcherSettings = WatcherSettings()
    worker: WorkerSettings = WorkerSettings()
    # Read as EngineSettings; after validation, the EngineOptions without `devices`
    # and `batch_size` (see EngineSettings).
    engine: EngineSettings = EngineSettings()
    _devices: list[str] = PrivateAttr(default_factory=list)
    _batch_size: int = PrivateAttr(1)

    @model_validator(mode="after")
    def _engine_settings_apart(self) -> Settings:
        if isinstance(self.engine, EngineSettings):
            self._devices = self.engine.devices or [self.engine.device]
            self._batch_size = self.engine.batch_size
            self.engine = EngineOptions.model_validate(self.engine.model_dump(exclude={"devices", "batch_size"}))
        return self

    @property
    def devices(self) -> list[str]:
        """The devices `fixative run` starts one engine on each: ``[engine] devices``, else ``[engine] device``."""
        return list(self._devices)

    @property
    def batch_size(self) -> int:
        """``[engine] batch_size``: the most jobs an engine protects together (see ``fixative.daemon.worker``)."""
        return self._batch_size

    @field_validator("state_db")
    @classmethod
    def _postgresql_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql://", "postgres://")):
            # Not echoed back: it may hold a password.
            raise ValueError("must be a postgresql:// URL (leave it out to use the SQLite file in state_dir)")
        return url

    @model_validator(mode="after")
    def _folders_apart(self) -> Settings:
        if self.archive_dir is None:
            self.archive_dir = self.inbox.with_name(self.inbox.name + "-originals")
        inbox = self.inbox.resolve()
        # The watcher's own startup check, run here too so that every command
        # (engine, doctor, status) reports the overlap as a config error (exit 78).
        try:
            check_folders(self.inbox, self.export_dir)
        except WatcherConfigError as error:
            raise ValueError(str(error)) from None
        if self.after == "archive":
            archive = self.archive_dir.resolve()
            if _inside(archive, inbox):
                raise ValueError(f"archive_dir: must not be inside inbox ({self.archive_dir} is in {self.inbox})")
            if _inside(archive, self.export_dir.resolve()):
                raise ValueError(
                    f"archive_dir: must not be inside export_dir, where originals could be "
                    f"published by mistake ({self.archive_dir})"
                )
        return self

    @property
    def db_path(self) -> Path:
        return self.state_dir / "jobs.db"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # pydantic-settings never reads a TOML file unless this method returns a
        # TomlConfigSettingsSource; `toml_file` in model_config alone does nothing.
        # No .env file and no secrets dir: one config file is enough to explain.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_toml_file.get()))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class ConfigError(Exception):
    """Invalid or missing configuration. ``lines`` has one line per problem, each naming its key."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def config_path(config_file: Path | None = None) -> Path:
    """The config file that settings are read from: ``config_file``, else ``$FIXATIVE_CONFIG``, else the XDG one."""
    if config_file is None and os.environ.get("FIXATIVE_CONFIG"):
        config_file = Path(os.environ["FIXATIVE_CONFIG"])
    return default_config_file() if config_file is None else config_file.expanduser()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read the settings from ``config_file`` (see :func:`config_path`), the environment and ``overrides``.

    A file named explicitly (argument or ``FIXATIVE_CONFIG``) must exist; the
    default one may be absent. Every problem of the file and of the
    environment is reported at once, each line naming where it comes from:
    the file and key, or the ``FIXATIVE_*`` variable.
    """
    named = config_file is not None or bool(os.environ.get("FIXATIVE_CONFIG"))
    config_file = config_path(config_file)
    # pydantic-settings skips a missing TOML file silently; a user who named
    # one wants to know that their settings are not being read.
    if named and not config_file.is_file():
        raise ConfigError([f"config file not found: {config_file}"])

    problems, file_values = [], {}
    if config_file.is_file():
        try:
            file_values = tomllib.loads(config_file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            problems.append(f"{config_file}: not valid TOML: {error}")
            config_file = None  # still check the environment, so that every problem shows at once
    token = _toml_file.set(config_file)
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        problems += [_with_source(_describe(e), config_file, file_values, overrides) for e in error.errors()]
    except SettingsError as error:  # e.g. FIXATIVE_ENGINE='not json'
        problems.append(str(error))
    finally:
        _toml_file.reset(token)
    # The environment overrides the file key by key, so a wrong value in the file
    # under a variable's is not in the errors above; it would be at the next run.
    problems += [f"{config_file}: {line}; {_variable(line)} overrides it for now"
                 for line in _file_errors(file_values) if _variable(line)]
    if problems:
        raise ConfigError(problems)
    return settings


class _FileOnly(Settings):
    """Settings from the values given to it alone: the file's, to find its errors without the environment's."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **others):
        return (init_settings,)


def _file_errors(file_values: dict[str, Any]) -> list[str]:
    """The described errors of the file's own settings (the checks across settings need them all, so not those)."""
    if not file_values:
        return []
    try:
        _FileOnly(**file_values)
    except ValidationError as error:
        return [_describe(e) for e in error.errors() if e["loc"] and _model_at([str(p) for p in e["loc"]]) is None]
    return []


def _with_source(line: str, config_file: Path | None, file_values: dict[str, Any], overrides: dict[str, Any]) -> str:
    """``line`` (``engine.steps: ...``) prefixed with where its key's value came from: the variable, the file, or neither."""
    key = line.split(":", 1)[0]
    parts = key.split(".")
    if parts[0] in overrides:  # given in code, which wins over both
        return line
    if variable := _variable(line):
        return f"{variable}: {line}"
    if config_file is not None and _holds(file_values, parts):
        return f"{config_file}: {line}"
    return line


def _holds(values: dict[str, Any], parts: list[str]) -> bool:
    for part in parts:
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


def _variable(line: str) -> str | None:
    """The ``FIXATIVE_*`` environment variable that sets the key ``line`` is about, if one does.

    ``FIXATIVE_ENGINE__STEPS`` for ``engine.steps``, or ``FIXATIVE_ENGINE`` when the
    table is given whole as JSON. Names are case-insensitive, as pydantic-settings reads them.
    """
    parts = line.split(":", 1)[0].upper().split(".")
    names = {name.upper(): name for name in os.environ}
    for n in range(len(parts), 0, -1):
        if (candidate := "FIXATIVE_" + "__".join(parts[:n])) in names:
            return names[candidate]
    return None


def _describe(error: Any) -> str:
    """One pydantic error as ``engine.steps: must be ≥ 1 (got 0)``."""
    loc = [str(part) for part in error["loc"]]
    kind, ctx, got = error["type"], error.get("ctx", {}), error.get("input")
    key = ".".join(loc)
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        if _model_at(loc) is not None:
            # A model validator; ours start their message with the field they blame.
            return f"{key}.{message}" if key else message
        return f"{key}: {message}"
    if kind == "extra_forbidden":
        parent_model = _model_at(loc[:-1])
        known = list(parent_model.model_fields) if parent_model else []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean {'.'.join(loc[:-1] + close)}?)" if close else ""
        return f"{key}: unknown setting{hint}"
    messages = {
        "greater_than_equal": lambda: f"must be ≥ {ctx.get('ge')}",
        "greater_than": lambda: f"must be > {ctx.get('gt')}",
        "less_than_equal": lambda: f"must be ≤ {ctx.get('le')}",
        "less_than": lambda: f"must be < {ctx.get('lt')}",
    }
    message = messages[kind]() if kind in messages else error["msg"].replace("Input should", "should")
    return f"{key}: {message} (got {got!r})"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The pydantic model that holds the setting at ``loc`` (for "did you mean")."""
    model: type[BaseModel] = Settings
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model
