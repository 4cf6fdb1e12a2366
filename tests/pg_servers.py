"""PostgreSQL for the tests: a scratch database on the shared server, or a private cluster.

`scratch_database()` creates `tandem_test_<random>` on the shared PostgreSQL (helpers.SHARED_PG_URL:
TANDEM_TEST_PG_URL, default postgresql://postgres@127.0.0.1:5432/postgres, or the private one
conftest.py starts where none answers) and drops it afterwards; an unreachable server fails the
test with a clear message, never skips it. `PrivateCluster` is a cluster of our own in a temporary
directory, on a free port, that a test can stop and start again; run as root, initdb and pg_ctl
run as the `postgres` OS user (`nobody` where there is none) through `runuser`, since PostgreSQL
refuses to run as root. The binaries come from TANDEM_TEST_PG_BIN, else the newest
/usr/lib/postgresql/<version>/bin (Debian's `postgresql`), else the directory of `initdb` on the
PATH. `destroy()` stops it by the pid in postmaster.pid and removes the directory.
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

import helpers
import psycopg
import pytest
from helpers import free_port
from psycopg import sql


def find_pg_bin() -> Path | None:
    """Where initdb, pg_ctl and postgres are (see the module's docstring), or None."""
    if named := os.environ.get("TANDEM_TEST_PG_BIN"):
        return Path(named)
    debian = [path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if debian:
        return max(debian, key=lambda bin_dir: tuple(int(n) for n in bin_dir.parent.name.split(".") if n.isdigit()))
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


PG_BIN = find_pg_bin()
OS_USERS = ("postgres", "nobody")  # who runs a private cluster when we are root (the first that exists)


def with_dbname(url: str, dbname: str) -> str:
    """The postgresql:// URL `url` with its database replaced."""
    return urlsplit(url)._replace(path=f"/{dbname}").geturl()


def pg_problem(url: str) -> str | None:
    """Why the PostgreSQL at `url` cannot serve the tests (no trust-auth login), or None."""
    try:
        psycopg.connect(url, autocommit=True, connect_timeout=3).close()
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    return None


def admin_connection(url: str | None = None) -> psycopg.Connection[tuple[object, ...]]:
    url = url or helpers.SHARED_PG_URL
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"these tests need PostgreSQL at {url} (trust auth; set TANDEM_TEST_PG_URL to use another): "
            f"{str(exc).strip()}"
        )


@contextmanager
def scratch_database(url: str | None = None) -> Iterator[str]:
    """A new, empty database on `url` (default: the shared PostgreSQL); yields its URL and drops it
    (WITH FORCE) afterwards."""
    url = url or helpers.SHARED_PG_URL
    name = f"tandem_test_{secrets.token_hex(6)}"
    with admin_connection(url) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield with_dbname(url, name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class PrivateCluster:
    """A PostgreSQL cluster of our own (as root: run as the `postgres` OS user, or `nobody`)."""

    def __init__(self) -> None:
        if PG_BIN is None or not (PG_BIN / "initdb").exists():
            where = PG_BIN or "/usr/lib/postgresql/<version>/bin or on the PATH"
            raise AssertionError(
                f"PostgreSQL's server binaries are not installed (no initdb in {where}): install them "
                "(Debian: apt-get install postgresql) or name their directory in TANDEM_TEST_PG_BIN"
            )
        self.bin = PG_BIN
        owner = _cluster_owner() if os.geteuid() == 0 else None
        self.user = owner.pw_name if owner is not None else None
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        try:
            if owner is not None:
                os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        # cwd: the OS user may not be allowed into ours.
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=self.dir)
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


def _cluster_owner() -> pwd.struct_passwd:
    """The OS user a private cluster runs as when we are root: the first of OS_USERS that exists."""
    for name in OS_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise AssertionError(f"PostgreSQL does not run as root, and none of the users {OS_USERS} exists")


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
