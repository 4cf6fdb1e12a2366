"""Tandem's benchmarks: one command, one table of figures measured in one run.

    .venv/bin/python -m bench                 # everything, 3 rounds (~17 min)
    .venv/bin/python -m bench --quick         # smoke run, 1 short round (~3.5 min)
    .venv/bin/python -m bench --only 1,3      # some figures

Servers and load generators are child processes on 127.0.0.1 (free ports):
Tandem (`python server.py`, RATE_LIMIT_ENABLED=0, no socket caps, a temp DATA_DIR), the bare
relay (bench/bare_relay.py), python-socketio on uvicorn (bench/sio_server.py),
and a private redis-server. Load comes from `--clients` processes of
trio-websocket clients (bench/load.py) or Socket.IO clients (bench/sio_load.py);
figure 4's held connections from raw-socket holders (bench/holder.py) bound to
127.0.0.2, 127.0.0.3, ... (loopback; each source address has its own ports).
Each measurement starts fresh servers, sets up its pairs, warms up, counts a
window, and stops everything. A round runs every measurement in turn (the
bare relay's closed loop first: figure 3's load is half of it); each figure
is a ratio to something measured in the same round, its median over
`--rounds` rounds, its spread the min and max. CPU is read from /proc for
every process in the window, so each row says how busy the server, Redis and
the clients were.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    LOOPBACK,
    NOFILE,
    PAYLOAD_BYTES,
    PYTHON,
    ROOT,
    Child,
    clean_env,
    cpu_seconds,
    free_port,
    machine,
    machine_busy_seconds,
    metric_mean_ms,
    parse_line,
    percentile,
    raise_nofile,
    rss_kib,
    scrape_metrics,
    spawn,
)
from bench.pyspy import Profile

# Bounds on waiting for children.
READY_TIMEOUT = 120.0
HELD_SETUP_MAX = 900.0
RESULT_GRACE = 60.0
QUIET_LOAD = 0.5


@dataclass(frozen=True)
class Plan:
    rounds: int = 3
    warmup: float = 2.0
    duration: float = 8.0
    drain: float = 1.0
    pairs: int = 100
    clients: int = 2  # load-generator processes
    rate: float = 2000.0  # messages a second: figure 3's fixed-rate detail, figures 4, 6 and 7
    held_connections: int = 50_000  # figure 4, the active pairs' included; capped by RLIMIT_NOFILE
    holder_connections: int = 10_000  # at most per holder process (each has its own RLIMIT_NOFILE)
    holder_concurrency: int = 100  # pairs a holder sets up at once (Tandem's listen backlog is 4,096)
    profile_seconds: float = 8.0


QUICK = Plan(rounds=1, warmup=1.0, duration=3.0, held_connections=2_000, profile_seconds=3.0)
# Figure 4's target, and the file descriptors a server needs beside its sockets.
HELD_TARGET = 50_000
FD_MARGIN = 1_000
ALL_FIGURES = (1, 2, 3, 4, 5, 6, 7, 8)
# Figure 7's profiles: (store, load): as fast as acks allow, and at figure 3's fixed rate.
PROFILES = (("sqlite", "throughput"), ("redis", "throughput"), ("sqlite", "rate"))


# --- one measurement ---------------------------------------------------------------------

PERCENTILES = {"p50_ms": 50.0, "p99_ms": 99.0, "p999_ms": 99.9, "max_ms": 100.0}


@dataclass
class Measure:
    name: str
    duration: float
    delivered: int = 0
    acked: int = 0
    sent: int = 0
    errors: int = 0
    closed: int = 0
    late_sends: int = 0
    client_cpu_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # per watched process
    latencies_us: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.delivered / self.duration

    def p(self, q: float) -> float:
        return percentile(self.latencies_us, q) / 1000.0

    def cores(self, *names: str) -> float:
        return sum(v for k, v in self.cpu_s.items() if not names or k.startswith(names)) / self.duration

    def us_per_msg(self, *names: str) -> float:
        return sum(v for k, v in self.cpu_s.items() if k.startswith(names)) / max(1, self.delivered) * 1e6

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "msgs_per_s": round(self.rate, 1),
            "delivered": self.delivered,
            "acked": self.acked,
            "sent": self.sent,
            "errors": self.errors,
            "closed": self.closed,
            "late_sends": self.late_sends,
            # None where nothing was sent (figure 4's RSS-only measurements): results.json stays strict JSON.
            **{k: round(self.p(q), 3) if self.latencies_us else None for k, q in PERCENTILES.items()},
            "client_cores": round(self.client_cpu_s / self.duration, 3),
            "cores": {k: round(v / self.duration, 3) for k, v in self.cpu_s.items()},
            **self.extra,
        }


class Workers:
    """Load-generator processes: started, waited for `ready`, sent `go`, read for `result`."""

    def __init__(self, bench: Bench, module: str, configs: list[dict[str, Any]], tag: str) -> None:
        self.children: list[Child] = []
        self.lines: queue.Queue[tuple[int, str]] = queue.Queue()
        for i, config in enumerate(configs):
            child = spawn(
                f"{tag}-{i}",
                [PYTHON, "-m", module, json.dumps(config)],
                bench.out / "logs" / f"{tag}-{i}.log",
                env=clean_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self.children.append(child)
            threading.Thread(target=self._read, args=(i, child), daemon=True).start()

    def _read(self, i: int, child: Child) -> None:
        assert child.proc.stdout is not None
        for raw in child.proc.stdout:
            self.lines.put((i, raw.decode()))
        self.lines.put((i, ""))  # EOF

    def expect(self, kind: str, timeout: float) -> list[dict[str, Any]]:
        """The `kind` line of every worker, in worker order."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.children):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"workers did not say {kind} within {timeout}s: {self._outputs()}")
            try:
                i, line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if not line:
                child = self.children[i]
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(5)
                raise RuntimeError(
                    f"worker {child.name} exited with {child.proc.returncode} before {kind}: {child.output()}"
                )
            k, body = parse_line(line)
            if k == kind:
                got[i] = body
        return [got[i] for i in range(len(self.children))]

    def tell(self, line: str) -> None:
        for child in self.children:
            if child.alive() and child.proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    child.proc.stdin.write(f"{line}\n".encode())
                    child.proc.stdin.flush()

    def stop(self) -> None:
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(15)
            child.stop(5)

    def _outputs(self) -> str:
        return "\n".join(f"[{c.name}] {c.output(1500)}" for c in self.children)


def split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# --- the bench ---------------------------------------------------------------------------


class Bench:
    def __init__(self, plan: Plan, out: Path) -> None:
        self.plan = plan
        self.out = out
        self.children: list[Child] = []
        self.redis: Child | None = None
        self.replica: Child | None = None
        self.redis_url = ""
        self.redis_version = ""
        self.seed = 0
        self.sources = 0  # holder source addresses handed out
        self.held_count = plan.held_connections  # figure 4, after RLIMIT_NOFILE (see held_count)

    # -- servers --

    def _server(self, child: Child) -> Child:
        self.children.append(child)
        return child.wait_listening()

    def tandem(self, name: str, redis: bool = False, **extra: str) -> Child:
        port = free_port()
        data = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.out))
        settings = {"HOST": LOOPBACK, "PORT": str(port), "DATA_DIR": str(data / "data"), "RATE_LIMIT_ENABLED": "0"}
        # Every load generator is one address (loopback): the per-address caps
        # that stop one hostile client would stop the benchmark's 10,000 sockets.
        settings |= {"MAX_SOCKETS": "0", "MAX_SOCKETS_IP": "0"}
        if redis:
            settings["REDIS_URL"] = self.redis_url
        settings |= extra
        child = spawn(
            name,
            [PYTHON, str(ROOT / "server.py")],
            self.out / "logs" / f"{name}.log",
            env=clean_env(**settings),
            cwd=data,
            port=port,
        )
        child.extra["tandem"] = True
        return self._server(child)

    def bare(self) -> Child:
        port = free_port()
        child = spawn(
            "bare",
            [PYTHON, str(ROOT / "bench" / "bare_relay.py")],
            self.out / "logs" / "bare.log",
            env=clean_env(PORT=str(port)),
            port=port,
        )
        return self._server(child)

    def socketio(self) -> Child:
        port = free_port()
        child = spawn(
            "socketio",
            [PYTHON, str(ROOT / "bench" / "sio_server.py"), str(port), self.redis_url],
            self.out / "logs" / "socketio.log",
            env=clean_env(),
            port=port,
        )
        return self._server(child)

    def start_redis(self) -> None:
        if self.redis is not None:
            return
        port = free_port()
        self.redis = spawn("redis", self._redis_args("redis", port), self.out / "logs" / "redis.log", port=port)
        self.redis.wait_listening()
        self.redis_url = f"redis://{LOOPBACK}:{port}/0"
        with contextlib.closing(self.redis_client()) as client:
            self.redis_version = str(client.info("server").get("redis_version", "?"))

    def start_replica(self) -> None:
        """A replica of the private Redis (figure 8), in sync before it returns."""
        self.start_redis()
        if self.replica is not None:
            return
        assert self.redis is not None
        port = free_port()
        args = [*self._redis_args("replica", port), "--replicaof", LOOPBACK, str(self.redis.port)]
        self.replica = spawn("replica", args, self.out / "logs" / "replica.log", port=port).wait_listening()
        deadline = time.monotonic() + READY_TIMEOUT
        with contextlib.closing(self.redis_client()) as client:
            while time.monotonic() < deadline:
                slave = client.info("replication").get("slave0")
                if isinstance(slave, dict) and slave.get("state") == "online":
                    return
                time.sleep(0.1)
        raise RuntimeError("the replica did not come in sync")

    def _redis_args(self, name: str, port: int) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (figures 2, 3, 5, 6 and 8 need it)")
        directory = self.out / name
        directory.mkdir(parents=True, exist_ok=True)
        return [
            binary,
            "--bind",
            LOOPBACK,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(directory),
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]

    def redis_client(self) -> redis.Redis:
        assert self.redis is not None
        return redis.Redis(host=LOOPBACK, port=self.redis.port, socket_timeout=30, socket_connect_timeout=5)

    def flush_redis(self) -> None:
        """Start each measurement on an empty Redis (the private one: nobody else's data)."""
        with contextlib.closing(self.redis_client()) as client:
            client.flushall()

    def stop(self, *children: Child) -> None:
        for child in children:
            child.stop()
            if child in self.children:
                self.children.remove(child)

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop(5)
        self.children.clear()
        for server in (self.replica, self.redis):
            if server is not None:
                server.stop(5)
        self.redis = self.replica = None

    # -- load --

    def _configs(self, mode: str, urls: list[str], pairs: int, processes: int, **extra: Any) -> list[dict[str, Any]]:
        p = self.plan
        configs = []
        for n in split(pairs, processes):
            self.seed += 1
            config = {"mode": mode, "urls": urls, "pairs": n, "warmup": p.warmup, "duration": p.duration}
            configs.append({**config, "drain": p.drain, "seed": self.seed, **extra})
        return configs

    def measure(
        self,
        name: str,
        watch: dict[str, Child],
        workers: Workers,
        before_go: Callable[[], None] | None = None,
        at_window: Callable[[], None] | None = None,
    ) -> Measure:
        """Wait for the workers to be ready, start them together, read CPU over the window, collect."""
        p = self.plan
        ready = workers.expect("ready", READY_TIMEOUT)
        if before_go is not None:
            before_go()
        t0 = time.monotonic_ns() + 300_000_000
        workers.tell(f"go {t0}")
        start, end = t0 + int(p.warmup * 1e9), t0 + int((p.warmup + p.duration) * 1e9)
        # /metrics is read just outside the window (a scrape costs the server a
        # session count on its store), and /proc at its edges (costs it nothing).
        tandems = [c for c in watch.values() if c.extra.get("tandem")]
        time.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9 - 0.5))
        metrics0 = [scrape_metrics(c.port) for c in tandems]
        time.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9))
        cpu0 = {k: cpu_seconds(c.pid) for k, c in watch.items()}
        busy0 = machine_busy_seconds()
        if at_window is not None:
            at_window()
        time.sleep(max(0.0, (end - time.monotonic_ns()) / 1e9))
        cpu1 = {k: cpu_seconds(c.pid) for k, c in watch.items()}
        busy1 = machine_busy_seconds()
        time.sleep(0.05)  # past the window's last deliveries
        metrics1 = [scrape_metrics(c.port) for c in tandems]
        results = workers.expect("result", p.drain + RESULT_GRACE)
        workers.stop()
        m = Measure(name, p.duration)
        m.cpu_s = {k: cpu1[k] - cpu0[k] for k in watch}
        # Where a message's time goes on the server, from Tandem's own /metrics (first instance).
        if metrics0 and metrics1:
            handling = metric_mean_ms(metrics0[0], metrics1[0], "tandem_message_handling_seconds")
            if handling is not None:
                m.extra["handling_mean_ms"] = round(handling, 3)
        for r in results:
            m.delivered += r["delivered"]
            m.acked += r["acked"]
            m.sent += r["sent"]
            m.errors += r["errors"]
            m.closed += r["closed"]
            m.late_sends += r["late_sends"]
            m.client_cpu_s += r["cpu_s"]
            m.latencies_us.extend(r["latencies_us"])
        m.latencies_us.sort()
        # The rest of the machine: every other process (other engineers' test runs, say).
        ours = sum(m.cpu_s.values()) + m.client_cpu_s
        m.extra["other_cores"] = round(max(0.0, busy1 - busy0 - ours) / m.duration, 3)
        m.extra["setup_s"] = max(r["setup_s"] for r in ready)
        m.extra["pairs"] = sum(r["pairs"] for r in ready)
        m.extra["failed_pairs"] = sum(r.get("failed", 0) for r in ready)
        store = ""
        if "handling_mean_ms" in m.extra:
            store = f", send-to-ack in server {m.extra['handling_mean_ms']:.1f} ms"
        log(
            f"  {name}: {m.rate:,.0f} msgs/s, p50 {m.p(50):.2f} ms, p99 {m.p(99):.2f} ms, cores {m.cores():.2f}"
            f" (+clients {m.client_cpu_s / m.duration:.2f}, rest of machine {m.extra['other_cores']:.2f}){store},"
            f" errors {m.errors}, closed {m.closed}"
        )
        return m

    def measure_stop(
        self, name: str, watch: dict[str, Child], configs: list[dict[str, Any]], tag: str, module: str = "bench.load"
    ) -> Measure:
        """`measure` with load workers (`module`) started from `configs`, stopped whatever happens."""
        workers = Workers(self, module, configs, tag)
        try:
            return self.measure(name, watch, workers)
        finally:
            workers.stop()

    def throughput(self, kind: str) -> Measure:
        """Closed loop, `pairs` pairs, as fast as acks allow, against one kind of server."""
        p = self.plan
        servers: list[Child] = []
        watch: dict[str, Child] = {}
        try:
            if kind == "bare":
                servers = [self.bare()]
            elif kind == "sqlite":
                servers = [self.tandem("tandem-sqlite")]
            elif kind in ("redis", "redis2"):
                self.flush_redis()
                servers = [self.tandem(f"tandem-redis{i + 1}", redis=True) for i in range(2 if kind == "redis2" else 1)]
            elif kind == "socketio":
                self.flush_redis()
                servers = [self.socketio()]
            elif kind in ("redis-replica", "redis-wait"):  # figure 8: a master with a replica
                self.flush_redis()
                waits = {"REDIS_ACK_REPLICAS": "1"} if kind == "redis-wait" else {}
                servers = [self.tandem(f"tandem-{kind}", redis=True, **waits)]
            watch = {f"server{i + 1}": s for i, s in enumerate(servers)}
            if self.redis is not None and kind in ("redis", "redis2", "socketio", "redis-replica", "redis-wait"):
                watch["redis"] = self.redis
            if self.replica is not None and kind in ("redis-replica", "redis-wait"):
                watch["replica"] = self.replica
            urls = [f"ws://{LOOPBACK}:{s.port}/ws" for s in servers]
            module = "bench.load"
            if kind == "socketio":
                urls = [f"http://{LOOPBACK}:{s.port}" for s in servers]
                module = "bench.sio_load"
            configs = self._configs("throughput", urls, p.pairs, p.clients)
            return self.measure_stop(f"throughput {kind}", watch, configs, kind, module)
        finally:
            self.stop(*servers)

    def latency(self, kind: str, rate: float) -> Measure:
        """Open loop: `rate` messages a second over `pairs` pairs, both members sending on a schedule."""
        p = self.plan
        per_member = rate / p.pairs / 2
        servers: list[Child] = []
        try:
            if kind == "bare":
                servers = [self.bare()]
            elif kind == "sqlite":
                servers = [self.tandem("tandem-sqlite")]
            else:
                self.flush_redis()
                servers = [self.tandem(f"tandem-redis{i + 1}", redis=True) for i in range(2 if kind == "redis2" else 1)]
            watch = {f"server{i + 1}": s for i, s in enumerate(servers)}
            if kind in ("redis", "redis2") and self.redis is not None:
                watch["redis"] = self.redis
            urls = [f"ws://{LOOPBACK}:{s.port}/ws" for s in servers]
            configs = self._configs("rate", urls, p.pairs, p.clients, rate=per_member)
            m = self.measure_stop(f"latency {kind} at {rate:,.0f} msgs/s", watch, configs, kind)
            m.extra["offered_msgs_per_s"] = round(rate, 1)
            return m
        finally:
            self.stop(*servers)

    def source(self) -> str:
        """A loopback address no holder of this run has used yet: 127.0.0.2, 127.0.0.3, ..."""
        n = self.sources
        self.sources += 1
        return f"127.0.{n // 250}.{2 + n % 250}"

    def holders(self, port: int, connections: int, deflate: bool, tag: str) -> Workers:
        """Processes of bench/holder.py holding `connections` (in pairs) on `port`, each from its own address."""
        p = self.plan
        pairs = connections // 2
        processes = max(2, math.ceil(connections / p.holder_connections))
        configs = [
            {
                "port": port,
                "pairs": n,
                "source": self.source(),
                "deflate": deflate,
                "concurrency": p.holder_concurrency,
                "setup_timeout": self.held_setup_timeout(),
            }
            for n in split(pairs, processes)
        ]
        return Workers(self, "bench.holder", configs, tag)

    def held_setup_timeout(self) -> float:
        return min(HELD_SETUP_MAX, 60.0 + self.held_count / 50)

    def held(self, client: str, server: str = "tandem") -> Measure:
        """Figure 4: one server holding `held_count` connections in paired sessions: RSS per connection.

        `client` "plain" or "deflate" (the handshake offers permessage-deflate);
        `server` "tandem" (defaults), "compression" (Tandem, WS_COMPRESSION=1) or
        "bare". On "tandem" with the plain client, 100 of the pairs are active:
        a closed loop as figure 1's, then the fixed rate (p99 of the active pairs).
        """
        p = self.plan
        active = client == "plain" and server == "tandem"
        name = f"held {client} {server}"
        if server == "bare":
            target = self.bare()
        elif server == "compression":
            target = self.tandem(f"tandem-held-{client}-compression", WS_COMPRESSION="1")
        else:
            target = self.tandem(f"tandem-held-{client}")
        try:
            time.sleep(1.0)
            empty = rss_kib(target.pid)
            wanted = self.held_count - (2 * p.pairs if active else 0)
            holders = self.holders(target.port, wanted, client == "deflate", f"held-{client}-{server}")
            try:
                ready = holders.expect("ready", self.held_setup_timeout() + 30)
                held = 2 * sum(int(r["pairs"]) for r in ready)
                setup_s = max(float(r["setup_s"]) for r in ready)
                extensions = sum(int(r["extensions"]) for r in ready)
                log(
                    f"  {name}: {held:,} connections in {setup_s} s ({sum(int(r['failed']) for r in ready)} pairs "
                    f"failed, {extensions:,} accepted permessage-deflate)"
                )
                time.sleep(1.0)
                full = rss_kib(target.pid)
                m = Measure(name, p.duration)
                if active:
                    watch = {"server1": target} | {f"holder{i}": c for i, c in enumerate(holders.children)}
                    url = f"ws://{LOOPBACK}:{target.port}/ws"
                    configs = self._configs("throughput", [url], p.pairs, p.clients)
                    m = self.measure_stop(f"{name} + active throughput", watch, configs, "active")
                    configs = self._configs("rate", [url], p.pairs, p.clients, rate=p.rate / p.pairs / 2)
                    at_rate = self.measure_stop(f"{name} + active at {p.rate:,.0f} msgs/s", watch, configs, "active")
                    m.extra["at_rate"] = at_rate.summary() | {"offered_msgs_per_s": p.rate}
                holders.tell("stop")
                results = holders.expect("result", RESULT_GRACE)
            finally:
                holders.stop()
            m.extra.update(
                connections=held,
                connections_total=held + (2 * m.extra.get("pairs", 0) if active else 0),
                held_setup_s=setup_s,
                extensions=extensions,
                closed_while_held=sum(int(r["closed"]) for r in results),
                rss_empty_kib=empty,
                rss_full_kib=full,
                kib_per_connection=round((full - empty) / max(1, held), 2),
            )
            log(
                f"  RSS {empty:,} KiB empty, {full:,} KiB with {held:,} connections: "
                f"{m.extra['kib_per_connection']} KiB each; {m.extra['closed_while_held']} closed while held"
            )
            return m
        finally:
            self.stop(target)

    def profile(self, kind: str, mode: str = "throughput") -> tuple[Measure, Profile]:
        """Figure 7: py-spy on Tandem during a throughput or fixed-rate run (not one of the measured rounds)."""
        p = replace(self.plan, duration=self.plan.profile_seconds)
        spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        if not Path(spy).exists():
            raise RuntimeError("py-spy is not installed (pip install -r bench/requirements.txt)")
        if kind == "redis":
            self.flush_redis()
        server = self.tandem(f"tandem-{kind}-profiled", redis=kind == "redis")
        raw = self.out / f"profile-{kind}-{mode}.txt"
        recorder: list[subprocess.Popen[bytes]] = []
        try:
            saved, self.plan = self.plan, p
            urls = [f"ws://{LOOPBACK}:{server.port}/ws"]
            extra = {"rate": p.rate / p.pairs / 2} if mode == "rate" else {}
            workers = Workers(self, "bench.load", self._configs(mode, urls, p.pairs, p.clients, **extra), "profile")

            def record() -> None:
                args = [
                    spy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--duration",
                    str(int(p.duration)),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                ]
                with open(self.out / "logs" / "py-spy.log", "ab") as out:
                    recorder.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT))

            try:
                m = self.measure(f"profiled {kind} {mode}", {"server1": server}, workers, at_window=record)
            finally:
                workers.stop()
                self.plan = saved
            for proc in recorder:
                try:
                    proc.wait(p.duration + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            self.stop(server)
        return m, Profile.read(raw) if raw.exists() else Profile()


# --- figures and the table -----------------------------------------------------------------


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str) -> str:
    if len(values) < 2:
        return "(1 run)"
    return f"{min(values):{fmt}} - {max(values):{fmt}}"


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    """ "yes", or "no" with how far off the target the value is, in percent of the target."""
    if value != value:  # nan
        return "n/a"
    met = value >= target if higher_is_better else value <= target
    if met:
        return "yes"
    off = (value / target - 1) * 100
    return f"no ({off:+.1f}%)" if abs(off) < 10 else f"no ({off:+.0f}%)"


Row = tuple[str, str, str, str, str, str]


class Table:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def figure(self, label: str, values: list[float], fmt: str, target: str = "", met: str = "", cpu: str = "") -> None:
        self.rows.append((label, f"{med(values):{fmt}}", spread(values, fmt), target, met, cpu))

    def detail(self, label: str, value: str, spread_text: str = "", cpu: str = "") -> None:
        self.rows.append(("    " + label, value, spread_text, "", "", cpu))

    def text(self) -> str:
        head: Row = (
            "figure",
            "median",
            "spread (min - max)",
            "target",
            "met",
            "CPU cores: server / Redis / clients / rest",
        )
        rows = [head, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = []
        for n, r in enumerate(rows):
            lines.append(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w) if i < 3 else c.ljust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                ).rstrip()
            )
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def cpu_text(ms: list[Measure]) -> str:
    if not ms:
        return ""
    server = med([m.cores("server") for m in ms])
    redis = f"{med([m.cores('redis') for m in ms]):.2f}" if any("redis" in m.cpu_s for m in ms) else "-"
    clients = med([m.client_cpu_s / m.duration + m.cores("holder") for m in ms])
    other = med([m.extra.get("other_cores", float("nan")) for m in ms])
    return f"{server:.2f} / {redis} / {clients:.2f} / {other:.2f}"


def build_table(
    plan: Plan, runs: dict[str, list[Measure]], profiles: dict[str, Profile], figures: set[int], held: Held
) -> Table:
    t = Table()
    get = runs.get
    bare, sqlite, redis = get("throughput bare", []), get("throughput sqlite", []), get("throughput redis", [])
    sio, redis2 = get("throughput socketio", []), get("throughput redis2", [])
    lat_redis, lat_redis2 = get("latency redis", []), get("latency redis2", [])

    def ratios(a: list[Measure], b: list[Measure], value: Callable[[Measure], float] | None = None) -> list[float]:
        """value(a) ÷ value(b) (default: msgs/s), round by round (a round that failed on either side is left out)."""
        of = value or (lambda m: m.rate)
        by_round = {m.extra.get("round"): m for m in b}
        pairs = [(of(x), of(y)) for x in a if (y := by_round.get(x.extra.get("round"))) is not None]
        return [x / y for x, y in pairs if y]

    def rates(ms: list[Measure], label: str) -> None:
        t.detail(label, f"{med([m.rate for m in ms]):,.0f}", spread([m.rate for m in ms], ",.0f"), cpu_text(ms))

    def store_time(ms: list[Measure]) -> None:
        handling = [m.extra["handling_mean_ms"] for m in ms if "handling_mean_ms" in m.extra]
        if handling:
            t.detail(
                "server: send read → ack queued (commit incl.), mean ms",
                f"{med(handling):.1f}",
                spread(handling, ".1f"),
            )

    def server_us(ms: list[Measure], label: str, names: tuple[str, ...] = ("server",)) -> None:
        values = [m.us_per_msg(*names) for m in ms]
        t.detail(label, f"{med(values):.0f}", spread(values, ".0f"))

    def server_us_ratio(label: str, a: list[Measure], b: list[Measure], target: float) -> None:
        values = ratios(a, b, lambda m: m.us_per_msg("server"))
        t.figure(label, values, ".2f", f"≤ {target:g}", verdict(med(values), target, False))

    def p99(m: Measure) -> float:
        return m.p(99)

    def fixed_rate(ms: list[Measure], label: str) -> None:
        """The p99 at the fixed rate (no target), with the rates offered and delivered."""
        values = [m.p(99) for m in ms]
        t.detail(
            f"{label}, fixed {plan.rate:,.0f} msgs/s, no target: p99 ms; delivered/offered",
            f"{med(values):.2f}; {med([m.rate for m in ms]):,.0f}/{plan.rate:,.0f}",
            spread(values, ".2f"),
            cpu_text(ms),
        )

    if 1 in figures and bare and sqlite:
        values = ratios(sqlite, bare)
        t.figure("1 throughput, embedded ÷ bare relay", values, ".2f", "≥ 0.9", verdict(med(values), 0.9, True))
        rates(sqlite, "Tandem embedded, msgs/s")
        rates(bare, "bare relay, msgs/s")
        server_us_ratio("1 server CPU per message, embedded ÷ bare relay", sqlite, bare, 1.1)
        server_us(sqlite, "server CPU per message, µs: Tandem embedded")
        store_time(sqlite)
        server_us(bare, "server CPU per message, µs: bare relay")
    if 2 in figures and bare and redis:
        values = ratios(redis, bare)
        t.figure("2 throughput, Redis ÷ bare relay", values, ".2f", "≥ 0.85", verdict(med(values), 0.85, True))
        rates(redis, "Tandem on Redis, msgs/s")
        if 1 not in figures:
            rates(bare, "bare relay, msgs/s")
        server_us(redis, "server CPU per message, µs: Tandem")
        store_time(redis)
        server_us(redis, "Redis CPU per message, µs", ("redis",))
    half_bare = get("latency-half bare", [])
    for key, store, target in (("sqlite", "embedded", 2.0), ("redis", "Redis", 3.0)):
        half = get(f"latency-half {key}", [])
        if 3 not in figures or not half or not half_bare:
            continue
        values = ratios(half, half_bare, p99)
        t.figure(
            f"3 p99 at half the bare relay's capacity, {store} ÷ bare relay",
            values,
            ".2f",
            f"≤ {target:g}",
            verdict(med(values), target, False),
            cpu_text(half),
        )
        for label, fn in (("p99", p99), ("p50", lambda m: m.p(50))):
            t.detail(
                f"{label}, ms: Tandem / bare relay",
                f"{med([fn(m) for m in half]):.2f} / {med([fn(m) for m in half_bare]):.2f}",
                spread([fn(m) for m in half], ".2f"),
            )
        offered = med([float(m.extra["offered_msgs_per_s"]) for m in half])
        t.detail(
            "msgs/s offered (½ bare closed loop); delivered: Tandem / bare",
            f"{offered:,.0f}; {med([m.rate for m in half]):,.0f} / {med([m.rate for m in half_bare]):,.0f}",
        )
        store_time(half)
        t.detail("bare relay at that load", "", "", cpu_text(half_bare))
        fixed = get(f"latency {key}", [])
        if fixed:
            fixed_rate(fixed, store)
    plain, deflate = get("held plain tandem", []), get("held deflate tandem", [])
    if 4 in figures and (plain or deflate):
        for ms, label in ((deflate, "client offering permessage-deflate"), (plain, "client not offering it")):
            if not ms:
                continue
            kib = [float(m.extra["kib_per_connection"]) for m in ms]
            t.figure(
                f"4 RSS per held connection, KiB: {label}", kib, ".1f", "≤ 24 (≤ 30)", verdict(med(kib), 24, False)
            )
            t.detail(
                f"server RSS empty → full, MiB ({med([m.extra['connections'] for m in ms]):,.0f} connections)",
                f"{med([m.extra['rss_empty_kib'] / 1024 for m in ms]):.0f} → "
                f"{med([m.extra['rss_full_kib'] / 1024 for m in ms]):.0f}",
            )
        for m in get("held deflate compression", [])[:1]:
            t.detail(
                "with WS_COMPRESSION=1 (operator opt-in), KiB",
                f"{m.extra['kib_per_connection']:.1f}",
                f"deflate on {m.extra['extensions']:,} of {m.extra['connections']:,}",
            )
        for m in get("held plain bare", [])[:1]:
            t.detail("bare relay (Hypercorn + Starlette), KiB", f"{m.extra['kib_per_connection']:.1f}")
    if 4 in figures and plain:
        counts = [float(m.extra["connections_total"]) for m in plain]
        t.figure(
            "4 connections held by one process",
            counts,
            ",.0f",
            f"{HELD_TARGET:,}",
            verdict(med(counts), HELD_TARGET, True),
        )
        if held.why:
            t.detail(f"fewer than {HELD_TARGET:,}: {held.why}", "")
        closed = [float(m.extra["closed_while_held"]) for m in plain]
        if any(closed):
            t.detail("closed by the server while held", f"{med(closed):,.0f}", spread(closed, ",.0f"))
        values = ratios(plain, sqlite)
        t.figure(
            f"4 throughput of {plan.pairs} active pairs among them ÷ without",
            values,
            ".2f",
            "≥ 0.8",
            verdict(med(values), 0.8, True),
            cpu_text(plain),
        )
        rates(plain, "with them, msgs/s")
        rates(sqlite, "without them (figure 1's Tandem embedded), msgs/s")
        server_us(plain, "server CPU per message with them, µs")
        store_time(plain)
        at_rate = [m.extra["at_rate"] for m in plain if "at_rate" in m.extra]
        if at_rate:
            values = [float(r["p99_ms"]) for r in at_rate]
            t.detail(
                f"p99 of the active pairs at {plan.rate:,.0f} msgs/s, ms (p50)",
                f"{med(values):.2f} ({med([float(r['p50_ms']) for r in at_rate]):.2f})",
                spread(values, ".2f"),
            )
    if 5 in figures and redis and sio:
        values = ratios(redis, sio)
        t.figure(
            "5 throughput, Tandem on Redis ÷ python-socketio", values, ".2f", "≥ 1.5", verdict(med(values), 1.5, True)
        )
        if 2 not in figures:
            rates(redis, "Tandem on Redis, msgs/s")
        rates(sio, "python-socketio + AsyncRedisManager, msgs/s")
        server_us(sio, "server CPU per message, µs: python-socketio")
    if 6 in figures and redis and redis2:
        server_us_ratio("6 servers' CPU per message, 2 instances ÷ 1 (Redis)", redis2, redis, 1.05)
        server_us(redis2, "servers' CPU per message, µs: 2 instances (both)")
        server_us(redis, "server CPU per message, µs: 1 instance")
        values = ratios(redis2, redis)
        t.detail("throughput, 2 instances ÷ 1", f"{med(values):.2f}", spread(values, ".2f"))
        rates(redis2, "2 instances, msgs/s (server = both)")
    if 6 in figures and lat_redis2:
        fixed_rate(lat_redis2, "2 instances")
        if lat_redis:
            fixed_rate(lat_redis, "1 instance")
    replica, wait = get("throughput redis-replica", []), get("throughput redis-wait", [])
    if 8 in figures and replica and wait:
        values = ratios(wait, replica)
        t.figure("8 throughput, ack waits for a replica ÷ not (REDIS_ACK_REPLICAS=1 ÷ 0)", values, ".2f", "", "", "")
        rates(wait, "REDIS_ACK_REPLICAS=1, msgs/s")
        store_time(wait)
        rates(replica, "REDIS_ACK_REPLICAS=0, same master and replica, msgs/s")
        store_time(replica)
    if 7 in figures:
        for kind, profile in profiles.items():
            if not profile.samples:
                continue
            threads = profile.threads()
            loop = threads.get("event loop (main thread)", 0) / profile.samples * 100
            load = "as fast as acks allow" if kind.endswith("throughput") else f"{plan.rate:,.0f} msgs/s"
            store = kind.split(",")[0].replace("sqlite", "embedded").replace("redis", "Redis")
            t.rows.append((f"7 profile, {store}, {load}: event loop", f"{loop:.0f}%", "", "", "", ""))
            for name, count in profile.components().most_common(5):
                t.detail(name, f"{count / profile.samples * 100:.0f}%")
    return t


@dataclass(frozen=True)
class Held:
    """Figure 4: how many connections one server holds, and why fewer than HELD_TARGET."""

    count: int
    reason: str = ""  # "held 19,000: ..." (empty at HELD_TARGET or more)
    why: str = ""  # the same, short, for the table
    nofile: int = 0  # the servers' RLIMIT_NOFILE (soft; hard where it could be raised)


def held_count(wanted: int, option: str) -> Held:
    """`wanted` connections, or as many as the open-file limit the servers inherit leaves room for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = wanted if soft == resource.RLIM_INFINITY else soft - FD_MARGIN
    count = max(0, min(wanted, room))
    if count < min(wanted, HELD_TARGET):
        which = "hard limit" if soft == hard else "limit"
        needs = f"{HELD_TARGET:,} needs `ulimit -n` >= {HELD_TARGET + FD_MARGIN:,}"
        reason = f"held {count:,}: the server's RLIMIT_NOFILE {which} is {soft:,} ({needs})"
        return Held(count, reason, f"RLIMIT_NOFILE {which} {soft:,} ({needs})", soft)
    if count < HELD_TARGET:
        return Held(count, f"held {count:,}: {option} asked for {wanted:,}", f"{option} {wanted:,}", soft)
    return Held(count, nofile=soft)


def wait_quiet(limit: float, max_wait: float) -> float:
    """Wait (up to `max_wait` s) for the 1-minute load average to drop below `limit`; return it."""
    deadline = time.monotonic() + max_wait
    load = os.getloadavg()[0]
    while load >= limit and time.monotonic() < deadline:
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        load = os.getloadavg()[0]
    return load


@contextlib.contextmanager
def output_dir(path: str | None) -> Iterator[Path]:
    if path:
        out = Path(path).resolve()
        out.mkdir(parents=True, exist_ok=True)
        yield out
    else:
        yield Path(tempfile.mkdtemp(prefix="tandem-bench-"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round, 2,000 held connections (~3.5 min)")
    parser.add_argument("--only", default="", help="figures to run, e.g. 1,2,7 (default: all)")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 3, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds counted per measurement (default 8, quick 3)")
    parser.add_argument("--clients", type=int, help="load-generator processes (default 2)")
    parser.add_argument(
        "--held",
        "--idle",
        type=int,
        help=f"connections held by one server for figure 4 (default {HELD_TARGET}, quick 2000; "
        f"at most RLIMIT_NOFILE - {FD_MARGIN})",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help=f"first wait up to S seconds for the 1-min load average to drop below {QUIET_LOAD}",
    )
    parser.add_argument("--out", help="directory for logs, profiles and results.json (default: a new temp dir)")
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else Plan()
    if args.rounds:
        plan = replace(plan, rounds=max(1, min(args.rounds, 9)))
    if args.duration:
        plan = replace(plan, duration=max(1.0, min(args.duration, 60.0)))
    if args.clients:
        plan = replace(plan, clients=max(1, min(args.clients, 16)))
    if args.held:
        plan = replace(plan, held_connections=max(2 * plan.pairs + 2, min(args.held, 1_000_000)))
    figures = {int(f) for f in args.only.split(",") if f.strip()} if args.only else set(ALL_FIGURES)
    if not figures <= set(ALL_FIGURES):
        parser.error(f"--only takes figures from {ALL_FIGURES}")

    raise_nofile(max(NOFILE, plan.held_connections + FD_MARGIN))  # the servers inherit it (figure 4)
    held = held_count(plan.held_connections, "--quick" if args.quick and not args.held else "--held")
    if args.wait_quiet:
        wait_quiet(QUIET_LOAD, min(args.wait_quiet, 1800))
    load_before = os.getloadavg()
    info = machine()
    started = datetime.now(UTC)
    if load_before[0] >= QUIET_LOAD:
        log(f"warning: the machine is busy (load average {load_before[0]:.2f}): figures will be low and noisy")

    runs: dict[str, list[Measure]] = {}
    profiles: dict[str, Profile] = {}
    failures: list[str] = []
    with output_dir(args.out) as out:
        (out / "logs").mkdir(exist_ok=True)
        bench = Bench(plan, out)
        bench.held_count = held.count
        log(f"bench: output in {out}")
        if 4 in figures and held.reason:
            log(f"figure 4: {held.reason}")
        clock = time.monotonic()
        try:
            needs_redis = figures & {2, 3, 5, 6} or 7 in figures
            if needs_redis:
                bench.start_redis()
            if 8 in figures:
                bench.start_replica()
            throughput_kinds = [
                k
                for k, figs in (
                    ("bare", {1, 2, 3}),  # figure 3: its load is half the bare relay's capacity
                    ("sqlite", {1, 4}),  # figure 4: throughput without held connections
                    ("redis", {2, 5, 6}),
                    ("socketio", {5}),
                    ("redis2", {6}),
                    ("redis-replica", {8}),
                    ("redis-wait", {8}),
                )
                if figs & figures
            ]
            # At half the bare relay's capacity (figure 3), then at the fixed rate (figures 3 and 6).
            half_kinds = ["bare", "sqlite", "redis"] if 3 in figures else []
            fixed_kinds = [k for k, figs in (("sqlite", {3}), ("redis", {3, 6}), ("redis2", {6})) if figs & figures]

            def record(key: str, r: int, run: Callable[[], Measure]) -> None:
                """One measurement, tried twice; a failure is logged and leaves a gap in its round."""
                for attempt in (1, 2):
                    try:
                        measured = run()
                    except RuntimeError as exc:
                        failures.append(f"{key}, round {r + 1}, attempt {attempt}: {str(exc)[:300]}")
                        log(f"  {key} failed (attempt {attempt} of 2): {str(exc)[:2000]}")
                        continue
                    measured.extra["round"] = r
                    runs.setdefault(key, []).append(measured)
                    return

            for r in range(plan.rounds):
                log(f"round {r + 1}/{plan.rounds}: throughput")
                for kind in throughput_kinds:
                    record(f"throughput {kind}", r, partial(bench.throughput, kind))
                capacity = [m.rate for m in runs.get("throughput bare", []) if m.extra["round"] == r]
                if half_kinds and not capacity:
                    failures.append(f"figure 3, round {r + 1}: no closed-loop figure of the bare relay to halve")
                    log(f"  {failures[-1]}")
                if half_kinds and capacity:
                    half = capacity[0] / 2
                    log(f"round {r + 1}/{plan.rounds}: latency at {half:,.0f} msgs/s (half the bare relay's capacity)")
                    for kind in half_kinds:
                        record(f"latency-half {kind}", r, partial(bench.latency, kind, half))
                if fixed_kinds:
                    log(f"round {r + 1}/{plan.rounds}: latency at {plan.rate:,.0f} msgs/s")
                for kind in fixed_kinds:
                    record(f"latency {kind}", r, partial(bench.latency, kind, plan.rate))
                if 4 in figures:
                    log(f"round {r + 1}/{plan.rounds}: {held.count:,} connections held")
                    for client in ("plain", "deflate"):
                        record(f"held {client} tandem", r, partial(bench.held, client))
            if 4 in figures:
                log(f"{held.count:,} connections held: WS_COMPRESSION=1, and the bare relay (figure 4's details)")
                record("held deflate compression", 0, partial(bench.held, "deflate", "compression"))
                record("held plain bare", 0, partial(bench.held, "plain", "bare"))
            if 7 in figures:
                for kind, mode in PROFILES:
                    log(f"profile: Tandem {kind}, {mode}")
                    try:
                        measured, profiles[f"{kind}, {mode}"] = bench.profile(kind, mode)
                    except RuntimeError as exc:
                        failures.append(f"profile {kind} {mode}: {str(exc)[:300]}")
                        log(f"  failed: {str(exc)[:2000]}")
                        continue
                    runs.setdefault(f"profiled {kind} {mode}", []).append(measured)
        finally:
            bench.close()
        elapsed = time.monotonic() - clock
        table = build_table(plan, runs, profiles, figures, held)
        header = [
            f"Tandem benchmarks, {started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min"
            f"{' (--quick)' if args.quick else ''}",
            f"machine: {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, Python {info['python']}, "
            f"{info['kernel']}" + (f", Redis {bench.redis_version}" if bench.redis_version else ""),
            f"load average before: {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}"
            + ("  (busy: figures are low and noisy)" if load_before[0] >= QUIET_LOAD else ""),
            f"each figure: median of {plan.rounds} run(s) of {plan.duration:g} s after {plan.warmup:g} s warm-up; "
            f"{plan.pairs} pairs over {plan.clients} client processes; data {PAYLOAD_BYTES} bytes",
        ]
        if 4 in figures and held.reason:
            header.append(f"figure 4: {held.reason}")
        if failures:
            header.append(
                f"failed attempts: {len(failures)} (each retried once; a round that failed twice is left out)"
            )
            header += [f"  {f}" for f in failures]
        print("\n".join(header))
        print()
        print(table.text())
        for kind, profile in profiles.items():
            print()
            print(f"Figure 7, py-spy on Tandem ({kind} load):")
            print("\n".join("  " + line for line in profile.lines()))
        results = {
            "started": started.isoformat(),
            "machine": info,
            "load_before": load_before,
            "plan": plan.__dict__,
            "held": held.__dict__,
            "runs": {k: [m.summary() for m in v] for k, v in runs.items()},
            "failures": failures,
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "table.txt").write_text("\n".join(header) + "\n\n" + table.text() + "\n")
        log(f"bench: logs, profiles and results.json in {out}")
    return 0
