"""Rate-limit checks per second against local Redis, beside a plain EVALSHA of `return 1`.

    .venv/bin/python bench/limiter_bench.py [--url redis://127.0.0.1:6379/0] [--checks 10000]

Both sides go the way the server makes a check: `RedisLimiter.hit` from trio
tasks, one `trio.to_thread` call and one EVALSHA each, on one redis-py client
with the store's options (RedisStore.open). The baseline is the same call path
(same client, same threads, same keys and arguments) with a script that only
returns 1, so the ratio is what the sliding window's Lua costs over a bare
round trip. The rule is the default per-user one, 10 per 60 s; each key is hit
HITS_PER_KEY times, so every check is admitted with up to 7 earlier entries in
its window: LRANGE, LPUSH, LTRIM and PEXPIRE, the dearest path.

The machine may be busy (a test suite running beside it): limiter and baseline
run in alternating slices of SLICE checks, so that both meet the same load, and
the rates are totals over all slices; the median of the per-slice ratios is
printed too. Per concurrency: 1 task, and 16 as many connections make. Target:
a ratio of at least 0.8. In-memory decisions per second are printed for
reference. Bounded: at most --checks of each kind per concurrency, and the
whole run within TIME_BUDGET_S.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from limiter import MemoryLimiter, RedisLimiter, Rule, redis_key
from redis_client import CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S, Connector

TIME_BUDGET_S = 25.0  # the whole run, Redis part and memory part
MEMORY_DECISIONS = 200_000
CONCURRENCY = (1, 16)
TARGET = 0.8
SLICE = 250  # checks per slice; limiter and baseline slices alternate
HITS_PER_KEY = 8  # under the limit of 10: every check admitted


class TrivialCheck:
    """The baseline: RedisLimiter's call path with `return 1` as the script."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script("return 1")

    def _call(self, rule: Rule, key: str, mode: str) -> Any:
        return self._script(keys=[redis_key(rule, key)], args=[rule.limit, round(rule.window * 1000), mode, ""])

    async def hit(self, rule: Rule, key: str) -> Any:
        with trio.fail_after(2.0):
            return await trio.to_thread.run_sync(self._call, rule, key, "hit", abandon_on_cancel=True)


async def measure(
    check: Callable[[Rule, str], Awaitable[Any]], rule: Rule, first: int, checks: int, tasks: int, budget: float
) -> tuple[float, int]:
    """(seconds, checks made): checks first..first+checks over `tasks` concurrent tasks, within `budget` s."""
    done = 0

    async def worker(offset: int) -> None:
        nonlocal done
        for n in range(first + offset, first + checks, tasks):
            await check(rule, f"user-{n // HITS_PER_KEY}")
            done += 1

    started = time.perf_counter()
    with trio.move_on_after(budget):
        async with trio.open_nursery() as nursery:
            for offset in range(tasks):
                nursery.start_soon(worker, offset)
    return time.perf_counter() - started, done


def memory_rate(decisions: int, budget: float) -> float:
    limiter = MemoryLimiter()
    rule = Rule("bench", 10, 60.0)
    keys = [f"user-{n}" for n in range(10_000)]
    deadline = time.perf_counter() + budget
    started = time.perf_counter()
    done = 0
    for n in range(decisions):
        limiter.hit_now(rule, keys[n % len(keys)])
        done += 1
        if n % 10_000 == 0 and time.perf_counter() > deadline:
            break
    return done / (time.perf_counter() - started)


async def run(url: str, checks: int) -> int:
    client = redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=10,
        retry=Retry(NoBackoff(), 0),
    )
    tag = secrets.token_hex(4)
    try:
        info: dict[str, Any] = client.info("server")
        print(f"redis {info['redis_version']} at {url}; {checks} checks of each kind per concurrency")
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (others' work skews both sides)")
        limiter = RedisLimiter(Connector.of(client))
        baseline = TrivialCheck(client)
        budget = TIME_BUDGET_S / (len(CONCURRENCY) + 1)
        print(
            f"{'tasks':>5}  {'limiter checks/s':>16}  {'EVALSHA return 1/s':>18}  {'ratio':>5}  slices (median ratio)"
        )
        worst = float("inf")
        for tasks in CONCURRENCY:
            rule = Rule(f"bench_{tag}_{tasks}", 10, 60.0)
            await limiter.hit(rule, "warm-up")  # loads the scripts
            await baseline.hit(rule, "warm-up")
            # Slices of SLICE checks, limiter and baseline alternating, so that both meet
            # the same load on the machine; totals over all slices give the rates.
            totals = {"limiter": [0.0, 0], "baseline": [0.0, 0]}
            ratios: list[float] = []
            deadline = time.perf_counter() + budget
            for n in range(0, checks, SLICE):
                size = min(SLICE, checks - n)
                left = max(0.1, deadline - time.perf_counter())
                ours = await measure(limiter.hit, rule, n, size, tasks, left)
                theirs = await measure(baseline.hit, rule, n, size, tasks, left)
                for name, (seconds, done) in (("limiter", ours), ("baseline", theirs)):
                    totals[name][0] += seconds
                    totals[name][1] += done
                if ours[1] and theirs[1]:
                    ratios.append((ours[1] / ours[0]) / (theirs[1] / theirs[0]))
                if time.perf_counter() > deadline:
                    print(f"  (time budget reached after {n + size} of {checks} checks)")
                    break
            if limiter.fallbacks:
                print(f"error: {limiter.fallbacks} checks fell back to memory: Redis failed", file=sys.stderr)
                return 1
            ours_rate = totals["limiter"][1] / totals["limiter"][0]
            theirs_rate = totals["baseline"][1] / totals["baseline"][0]
            ratio = ours_rate / theirs_rate
            worst = min(worst, ratio)
            spread = f"{len(ratios)} ({statistics.median(ratios):.2f})" if ratios else "0"
            print(f"{tasks:>5}  {ours_rate:>16,.0f}  {theirs_rate:>18,.0f}  {ratio:>5.2f}  {spread}")
        print(f"in memory: {memory_rate(MEMORY_DECISIONS, budget):,.0f} decisions/s (MemoryLimiter.hit_now)")
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
        verdict = "meets" if worst >= TARGET else "BELOW"
        print(f"lowest ratio {worst:.2f}: {verdict} the target of {TARGET}")
        return 0
    finally:
        keys = list(client.scan_iter(match=f"tandem:rl:{{bench_{tag}_*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--checks", type=int, default=10_000, help="checks of each kind per concurrency")
    args = parser.parse_args()
    if args.checks < 1:
        parser.error("--checks must be at least 1")
    return trio.run(run, args.url, args.checks)


if __name__ == "__main__":
    sys.exit(main())
