"""A throwaway PostgreSQL server for the tests: initdb into a temporary folder, started on a free port.

Real server binaries, not a mock (Debian's ``postgresql`` package; ``.ci/run``
installs it). initdb and postgres refuse to run as root, so as root (CI) they
run as the ``postgres`` system user, in a folder handed over to it. Without
binaries the PostgreSQL tests skip with the reason, unless
``FIXATIVE_REQUIRE_POSTGRES=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def server_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, or Debian's newest /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One postgres server in its own folder; :meth:`database` makes a fresh database per test."""

    def __init__(self, binaries: Path, *, durable: bool = False):
        """``durable``: fsync on, as a production server runs (the job-table bench); off for the tests."""
        self.binaries = binaries
        self.durable = durable
        self.folder = Path(tempfile.mkdtemp(prefix="fixative-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self.databases = 0
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run([*self.as_user, str(self.binaries / program), *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            # A test server that loses its data in a power cut loses nothing.
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends every session at once, as a restart of the database server does."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        self.databases += 1
        name = f"test_{self.databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def role(self, name: str, password: str, *, owns: str | None = None) -> None:
        """A login role whose password the server checks (scram, where every other role is trusted).

        ``owns``: a new database of that name, owned by the role, as the README's
        ``createdb --owner`` makes it.
        """
        import psycopg
        from psycopg import sql

        hba = self.data / "pg_hba.conf"  # the first line that matches decides
        hba.write_text(f"host all {name} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
            if owns:
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(owns), sql.Identifier(name)))
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the reload is asynchronous: until it lands, the role is trusted
            try:
                psycopg.connect(f"postgresql://{name}@127.0.0.1:{self.port}/postgres").close()
            except psycopg.OperationalError:
                return
            time.sleep(0.05)
        raise RuntimeError(f"pg_hba.conf was not reloaded: {name} still gets in without a password")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)
