"""PostgreSQL for the tests: a scratch database on the shared server, or a private cluster.

`scratch_database()` creates `tandem_test_<random>` on the PostgreSQL at TANDEM_TEST_PG_URL
(default postgresql://postgres@127.0.0.1:5432/postgres) and drops it afterwards; an unreachable
server fails the test with a clear message, never skips it. `PrivateCluster` is a cluster of our
own in a temporary directory owned by the `postgres` OS user (initdb and pg_ctl run through
`runuser -u postgres` when we are root), on a free port, that a test can stop and start again;
`destroy()` stops it by the pid in postmaster.pid and removes the directory.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from helpers import free_port
from psycopg import sql

ADMIN_URL = os.environ.get("TANDEM_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_BIN = Path(os.environ.get("TANDEM_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"


def with_dbname(url: str, dbname: str) -> str:
    """The postgresql:// URL `url` with its database replaced."""
    return urlsplit(url)._replace(path=f"/{dbname}").geturl()


def admin_connection(url: str = ADMIN_URL) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"these tests need PostgreSQL at {url} (trust auth; set TANDEM_TEST_PG_URL to use another): "
            f"{str(exc).strip()}"
        )


@contextmanager
def scratch_database(url: str = ADMIN_URL) -> Iterator[str]:
    """A new, empty database; yields its URL and drops it (WITH FORCE) afterwards."""
    name = f"tandem_test_{secrets.token_hex(6)}"
    with admin_connection(url) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield with_dbname(url, name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class PrivateCluster:
    """A PostgreSQL cluster of our own, run as the `postgres` OS user."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            user = pwd.getpwnam(OS_USER)
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(PG_BIN / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", OS_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise AssertionError(f"{tool} failed ({result.returncode}): {result.stdout}{result.stderr}\n{log}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def pid(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        try:
            return int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def destroy(self) -> None:
        """Stop the postmaster by its pid (SIGINT: fast shutdown, then SIGKILL) and remove the directory."""
        pid = self.pid()
        if pid is not None:
            for signum, wait in ((signal.SIGINT, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and _alive(pid):
                    time.sleep(0.05)
                if not _alive(pid):
                    break
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not ours to reap (pg_ctl started it); it counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
