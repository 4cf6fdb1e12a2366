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
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import SHARED_REDIS_URL, STORES, Server, ServerFactory, check_redis
from redis_servers import RedisCluster3, RedisFactory, RedisServer


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """The session store of the servers a test starts: "sqlite" (default) or "redis"."""
    kind = str(getattr(request, "param", "sqlite"))
    assert kind in STORES, kind
    if kind == "redis":
        check_redis(SHARED_REDIS_URL)
    return kind


@pytest.fixture
def tandem_factory(tmp_path: Path, store: str) -> Iterator[ServerFactory]:
    """Start servers: `tandem_factory(SETTING="value", data_dir=...)`.

    With the "redis" store a server gets REDIS_URL=SHARED_REDIS_URL unless
    `settings` name another Redis.
    """
    servers: list[Server] = []
    counter = itertools.count()

    def start(data_dir: Path | None = None, **settings: str) -> Server:
        n = next(counter)
        # Rate limits are off unless a test turns them on: the suite sends more than 10 messages a minute.
        env = {"LOG_LEVEL": "INFO", "RATE_LIMIT_ENABLED": "0", **{k: str(v) for k, v in settings.items()}}
        if store == "redis":
            env.setdefault("REDIS_URL", SHARED_REDIS_URL)
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
