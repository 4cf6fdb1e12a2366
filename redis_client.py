"""The Redis client of an instance, and one way to call it off the event loop.

redis-py's asyncio client does not run under Trio, so every call goes through
a worker thread with a timeout at the call site. Every redis-py error that
means "Redis, or part of a cluster, is not there right now" becomes one
`unavailable` error (with `retry_after`), for the store and the limiter alike.
A cluster client is made on first use, from any of several seed nodes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.cluster
import trio
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

import config
from config import seed_urls
from protocol import ErrorCode, ServerError

T = TypeVar("T")

# A Redis command fails after this long; the caller sees `unavailable`.
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0
# A call off the event loop may take two socket timeouts (connect, then reply).
CALL_TIMEOUT_S = SOCKET_TIMEOUT_S * 2
RETRY_AFTER_S = 1.0
# Redis, or a part of the cluster, is not there right now: a lost or refused
# connection, a timeout, CLUSTERDOWN/MASTERDOWN, a slot no reachable node
# serves, a replica that became read-only in a failover, TRYAGAIN during a
# resharding, LOADING after a restart.
DOWN_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,  # BusyLoadingError included
    redis.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.AskError,  # MOVED included: a slot changed hands in a failover
)

DOWN_OR_SLOW: tuple[type[Exception], ...] = (*DOWN_ERRORS, trio.TooSlowError)

Client = redis.Redis | redis.cluster.RedisCluster


def unavailable(detail: str) -> ServerError:
    return ServerError(
        f"session store unavailable: {detail}",
        ErrorCode.UNAVAILABLE,
        retry_after=RETRY_AFTER_S,
    )


def _options() -> dict[str, Any]:
    return {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "health_check_interval": 10,
        # No silent retries: a script whose reply was lost may have run, and
        # running an append twice would store a message twice. The caller
        # gets `unavailable` and decides.
        "retry": Retry(NoBackoff(), 0),
    }


def _cluster_client(url: str) -> redis.cluster.RedisCluster:
    """A cluster client from the seeds of `url`; it asks them for the slot map now."""
    seeds = [redis.connection.parse_url(seed) for seed in seed_urls(url)]  # type: ignore[no-untyped-call]
    nodes = [redis.cluster.ClusterNode(s["host"], s.get("port", 6379)) for s in seeds]  # type: ignore[no-untyped-call]
    shared = {k: v for k, v in seeds[0].items() if k not in ("host", "port", "db")}
    # The cluster client itself may retry (after a failed node it learns the
    # layout again and tries the slot's new master): what goes through it is
    # idempotent or a rate-limit count. Scripts that must not run twice go
    # through plain pipelines on the node (RedisStore._execute), which never retry.
    options = _options() | {"retry": Retry(ExponentialBackoff(cap=0.25, base=0.05), 2)}
    return redis.cluster.RedisCluster(startup_nodes=nodes, **shared, **options)


class Connector:
    """This instance's one Redis client, made on first use.

    A plain client connects lazily by itself. redis-py's cluster client asks
    its seed nodes for the slot map in its constructor and fails when none
    answers, so here it is made by the first call that finds a seed answering
    (at most one attempt per RETRY_AFTER_S); until then calls are `unavailable`.
    """

    def __init__(self, url: str, *, cluster: bool, client: Client | None = None) -> None:
        self.cluster = cluster
        self._url = url
        if client is None and not cluster:
            client = redis.Redis.from_url(url, **_options())
        self._client = client
        self._lock = threading.Lock()
        self._next_attempt = 0.0

    @property
    def display(self) -> str:
        """REDIS_URL as logs may show it: the password masked."""
        return config.REDIS_URL.mask(self._url)

    @classmethod
    def of(cls, client: Client) -> Connector:
        """A connector around a client made elsewhere (tests, benchmarks)."""
        return cls("", cluster=isinstance(client, redis.cluster.RedisCluster), client=client)

    @property
    def client(self) -> Client:
        """The client: in a worker thread only, as making a cluster's talks to it."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                now = time.monotonic()
                if now < self._next_attempt:
                    raise redis.exceptions.RedisClusterException("no seed node of the cluster answered yet")
                self._next_attempt = now + RETRY_AFTER_S
                self._client = _cluster_client(self._url)
            return self._client

    async def call(self, fn: Callable[[Client], T]) -> T:
        """`fn(client)` in a worker thread: its result, or `unavailable`."""
        return await call(lambda: fn(self.client))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


@dataclass(frozen=True)
class Script:
    """A Lua script run by its SHA1, and by its body when a node does not know it yet."""

    body: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.body.encode()).hexdigest())

    def __call__(self, client: Client, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # a restarted or new node: EVAL caches it there
            return client.eval(self.body, len(keys), *keys, *args)


async def call(fn: Callable[..., T], *args: Any) -> T:
    """Run the blocking `fn(*args)` in a worker thread: its result, or `unavailable`.

    A call cut by its timeout is abandoned (the thread finishes on its own);
    errors that are not an outage (a script error, a bug) pass through.
    """
    try:
        with trio.fail_after(CALL_TIMEOUT_S):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except DOWN_OR_SLOW as exc:
        raise unavailable(type(exc).__name__) from None
