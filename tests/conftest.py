"""Shared test fixtures: real Tandem processes on free ports, private Redis servers.

`tandem` starts `python server.py` (helpers.Server) as a subprocess with a
private DATA_DIR and waits until it listens; a server that does not come up
fails the test with its own output. Everything a test module imports
(`Server`, `Client`, `connect`, `call`, ...) is in helpers.py.

The session store is the `store` fixture: "sqlite" (DATA_DIR) unless a module
parametrises it: `pytestmark = pytest.mark.parametrize("store", STORES,
indirect=True)` (or `@BOTH_STORES` on a test) runs each test once per store
("redis": the shared Redis at SHARED_REDIS_URL, which must answer PING, else
the test fails).

The shared Redis and PostgreSQL are the machine's (127.0.0.1:6379 and :5432,
or TANDEM_TEST_REDIS_URL / TANDEM_TEST_PG_URL). Where one does not answer,
`pytest_configure` starts a private redis-server or PostgreSQL cluster for the
whole run, once (in the xdist controller, before it starts the workers, which
inherit the URLs in those variables), says so in one line, and
`pytest_unconfigure` stops it by pid.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest
from helpers import STORES, Server, ServerFactory, check_redis, redis_problem
from pg_servers import PrivateCluster, pg_problem
from redis_servers import RedisCluster3, RedisFactory, RedisServer

import redaction

# The private servers this run started in place of the shared ones (pytest_configure).
PRIVATE_REDIS: list[RedisServer] = []
PRIVATE_PG: list[PrivateCluster] = []


def _share(variable: str, name: str, url: str) -> None:
    """Point the shared URL at `url`: for this process (helpers.`name`) and the xdist workers (`variable`)."""
    os.environ[variable] = url
    setattr(helpers, name, url)


def _start_private_redis() -> str | None:
    """A private redis-server where the shared Redis does not answer; what to say about it."""
    problem = redis_problem(helpers.SHARED_REDIS_URL)
    if problem is None:
        return None
    server = RedisServer(Path(tempfile.mkdtemp(prefix="tandem-redis-")))
    PRIVATE_REDIS.append(server)
    try:
        server.start()
    except AssertionError as exc:
        raise pytest.UsageError(f"no Redis answers at {helpers.SHARED_REDIS_URL} ({problem}), and {exc}") from exc
    assert server.proc is not None
    said = f"redis-server at {server.url()} (pid {server.proc.pid}; {helpers.SHARED_REDIS_URL}: {problem})"
    _share("TANDEM_TEST_REDIS_URL", "SHARED_REDIS_URL", server.url())
    return said


def _start_private_pg() -> str | None:
    """A private PostgreSQL cluster where the shared one does not let us in; what to say about it."""
    problem = pg_problem(helpers.SHARED_PG_URL)
    if problem is None:
        return None
    try:
        cluster = PrivateCluster()
        PRIVATE_PG.append(cluster)
        cluster.start()
    except AssertionError as exc:
        raise pytest.UsageError(f"no PostgreSQL answers at {helpers.SHARED_PG_URL} ({problem}), and {exc}") from exc
    said = f"PostgreSQL at {cluster.url} (pid {cluster.pid()}; {helpers.SHARED_PG_URL}: {problem})"
    _share("TANDEM_TEST_PG_URL", "SHARED_PG_URL", cluster.url)
    return said


@pytest.hookimpl(trylast=True)  # after the terminal reporter exists
def pytest_configure(config: pytest.Config) -> None:
    """Start a private Redis / PostgreSQL for the run where the shared one does not answer (see above)."""
    if hasattr(config, "workerinput") or config.option.help or config.option.collectonly:
        return  # an xdist worker uses what the controller found or started
    said = [line for line in (_start_private_redis(), _start_private_pg()) if line is not None]
    if said:
        line = redaction.hide_credentials(f"tests: started a private {' and a private '.join(said)} for this run")
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line, file=sys.stderr)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the private servers pytest_configure started, by pid, and remove their directories."""
    while PRIVATE_PG:
        PRIVATE_PG.pop().destroy()
    while PRIVATE_REDIS:
        server = PRIVATE_REDIS.pop()
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """The session store of the servers a test starts: "sqlite" (default) or "redis"."""
    kind = str(getattr(request, "param", "sqlite"))
    assert kind in STORES, kind
    if kind == "redis":
        check_redis(helpers.SHARED_REDIS_URL)
    return kind


@pytest.fixture
def tandem_factory(tmp_path: Path, store: str) -> Iterator[ServerFactory]:
    """Start servers: `tandem_factory(SETTING="value", data_dir=...)`.

    With the "redis" store a server gets REDIS_URL=helpers.SHARED_REDIS_URL unless
    `settings` name another Redis.
    """
    servers: list[Server] = []
    counter = itertools.count()

    def start(data_dir: Path | None = None, **settings: str) -> Server:
        n = next(counter)
        # Rate limits are off unless a test turns them on: the suite sends more than 10 messages a minute.
        env = {"LOG_LEVEL": "INFO", "RATE_LIMIT_ENABLED": "0", **{k: str(v) for k, v in settings.items()}}
        if store == "redis":
            env.setdefault("REDIS_URL", helpers.SHARED_REDIS_URL)
        server = Server(env, data_dir or tmp_path / "data", tmp_path / f"server-{n}.log")
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def tandem(tandem_factory: ServerFactory) -> Server:
    return tandem_factory()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisFactory]:
    """Start private redis-servers: `private_redis(appendonly=True, password=...)`; all stopped at the end."""
    servers: list[RedisServer] = []

    def start(**options: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", **options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster3]:
    """A real 3-master Redis Cluster, stopped at the end of the test."""
    nodes = RedisCluster3(tmp_path / "cluster").start()
    yield nodes
    nodes.stop()
