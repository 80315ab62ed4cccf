"""A throwaway PostgreSQL server for tests and benchmarks: `initdb` in a temporary folder, a free
loopback port, trust authentication, stopped and removed at the end.

    with ThrowawayPostgres() as server:
        url = server.database("t1")          # postgresql://postgres@127.0.0.1:PORT/t1, created empty

A SIGTERM to the process that made it (a `timeout`, a `kill`) ends it as Ctrl-C would, so the
cluster is stopped on the way out rather than left running. `initdb` refuses to run as root, so as root the cluster is made and run by the `postgres` system user
(the Debian package creates it). Where no PostgreSQL is installed, `available()` says why not.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/VERSION/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def available() -> str | None:
    """None where a throwaway server can start here, else why not."""
    if binaries() is None:
        return "no PostgreSQL here (initdb not found; apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres system user for initdb"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (pip install -e '.[serve]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayPostgres:
    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="pg-"))
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0

    def run(self, *command: str) -> None:
        """A PostgreSQL tool, as the postgres user where we are root."""
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        subprocess.run(prefix + [str(binaries() / command[0]), *command[1:]], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> "ThrowawayPostgres":
        if self.as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(self.folder, account.pw_uid, account.pw_gid)
        data = self.folder / "data"
        self.run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        if threading.current_thread() is threading.main_thread():  # only there can a handler be set
            self.on_sigterm = signal.signal(signal.SIGTERM, interrupt)
        return self

    def url(self, name: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-w", "-o",
                 f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            if hasattr(self, "on_sigterm"):
                signal.signal(signal.SIGTERM, self.on_sigterm)


def interrupt(signum, frame):
    """SIGTERM as KeyboardInterrupt: pytest, and any `with`, then run their teardown."""
    raise KeyboardInterrupt(f"signal {signum}")
