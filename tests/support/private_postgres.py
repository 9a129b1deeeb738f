"""PostgreSQL of a test's own: a database on the machine's server, or a whole cluster.

``pg_database``: an empty database with a unique name on the machine's PostgreSQL, dropped
afterwards. ``private_postgres``: a cluster the test may stop and start again (an outage), made
with the machine's ``initdb``/``pg_ctl`` in a fresh directory, listening on a free loopback
port with trust authentication. PostgreSQL refuses to run as root, so as root the cluster runs
as the ``postgres`` user, in a directory that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import free_port
from tests.support.stores import create_pg_database, drop_pg_database, run_sync


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        pytest.skip(f"PostgreSQL's {name} is not installed")
    return found[-1]


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on its own port; database ``nilai``, user ``postgres``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="nilai-pg-"))
        self._data = self.directory / "data"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self._as_postgres = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the ``nilai`` database."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/nilai"

    def _run(self, *command: str) -> None:
        subprocess.run(
            [*self._as_postgres, *command],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )

    def create(self) -> PrivatePostgres:
        """Make the cluster, start it and create the ``nilai`` database."""
        self._run(
            _pg_bin("initdb"), "-D", str(self._data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        self.start()
        self._run(
            _pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "nilai"
        )
        return self

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories=''"
        options += " -c fsync=off"
        log = str(self.directory / "server.log")
        self._run(_pg_bin("pg_ctl"), "-D", str(self._data), "-l", log, "-o", options, "-w", "start")

    def stop(self) -> None:
        """Stop the server at once (open connections are cut, as in a crash of the database)."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self._data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        """Stop the server if it runs and delete the cluster."""
        subprocess.run(
            [
                *self._as_postgres,
                _pg_bin("pg_ctl"),
                "-D",
                str(self._data),
                "-m",
                "immediate",
                "stop",
            ],
            check=False,
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL cluster, deleted after the test."""
    cluster = PrivatePostgres().create()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_database() -> Iterator[str]:
    """The name of an empty database on the machine's PostgreSQL, dropped after the test."""
    name = run_sync(create_pg_database())
    try:
        yield name
    finally:
        run_sync(drop_pg_database(name))
