"""Redis clients for Tandem, and one way to call them off the event loop.

redis-py's asyncio client does not run under Trio, so every call goes
through a worker thread with a timeout at the call site. Every redis-py error
that means "Redis, or part of a cluster, is not there right now" becomes one
`unavailable` error (with `retry_after`), for the store and the limiter alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.cluster
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

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
)

DOWN_OR_SLOW: tuple[type[Exception], ...] = (*DOWN_ERRORS, trio.TooSlowError)

Client = redis.Redis | redis.cluster.RedisCluster


def unavailable(detail: str) -> ServerError:
    return ServerError(
        f"session store unavailable: {detail}",
        ErrorCode.UNAVAILABLE,
        retry_after=RETRY_AFTER_S,
    )


async def connect(url: str, *, cluster: bool) -> Client:
    """A client for `url`; connections are made lazily, so Redis may be down now."""
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "health_check_interval": 10,
        # No silent retries: a script whose reply was lost may have run, and
        # running an append twice would store a message twice. The caller
        # gets `unavailable` and decides.
        "retry": Retry(NoBackoff(), 0),
    }
    if cluster:  # asks a node for the slot map: off the event loop
        return await trio.to_thread.run_sync(lambda: redis.cluster.RedisCluster.from_url(url, **options))
    return redis.Redis.from_url(url, **options)


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
