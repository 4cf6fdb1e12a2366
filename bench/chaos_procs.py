"""The processes a chaos run (bench/chaos.py) starts and hurts: private redis-servers.

`RedisProcess` is one redis-server (append-only, fsync always) restarted on its
port and directory; `RedisCluster` is six of them in one Redis Cluster (three
masters, a replica each) whose masters the driver kills to make them fail over.
Every process runs on loopback, on a free port, and is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
import redis.cluster
import trio

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0  # a Tandem or Redis process listens within this
CLUSTER_TIMEOUT = 40.0  # a cluster forms, fails over or takes a node back within this
# A master silent this long is failed over by its replica: short, so a failover takes seconds.
CLUSTER_NODE_TIMEOUT_MS = 2000
CLUSTER_NODES = 6  # three masters, one replica each
CLUSTER_SLOTS = 16384
REDIS_CLI = shutil.which("redis-cli") or "redis-cli"


class ChaosError(Exception):
    """The test machinery failed (a process would not start): not a finding about Tandem."""


def spawn(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a child process whose output goes to `log_path` (appended)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


async def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = trio.current_time() + START_TIMEOUT
    for _ in range(int(START_TIMEOUT / 0.02) + 1):
        if proc.poll() is not None:
            raise ChaosError(f"{what} exited with {proc.returncode} at start-up")
        try:
            stream = await trio.open_tcp_stream(LOOPBACK, port)
        except OSError:
            if trio.current_time() > deadline:
                break
            await trio.sleep(0.02)
            continue
        await stream.aclose()
        return
    raise ChaosError(f"{what} did not listen on {port} within {START_TIMEOUT} s")


class RedisProcess:
    """A private redis-server: append-only, fsync on every write; restarted on its port and directory."""

    def __init__(self, directory: Path, cluster: bool = False) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.bus_port = free_port() if cluster else 0
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{self.address}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        args = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "yes"]
        args += ["--appendfsync", "always", "--dir", str(self.dir), "--protected-mode", "no", "--logfile", ""]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port)]
            args += ["--cluster-config-file", str(self.dir / "nodes.conf")]
            args += ["--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS)]
        self.proc = spawn(args, self.dir / "redis.log")
        await wait_listening(self.port, self.proc, "redis-server")
        await trio.to_thread.run_sync(self._wait_loaded)

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def _wait_loaded(self) -> None:
        """Until the append-only file is loaded (LOADING answers before that)."""
        client = self.client(1.0)
        try:
            for _ in range(int(START_TIMEOUT / 0.05)):
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    if client.ping() and client.info("persistence").get("loading", 0) == 0:
                        return
                time.sleep(0.05)
        finally:
            client.close()
        raise ChaosError("redis-server did not load its append-only file")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def pause(self, seconds: float) -> None:
        """SIGSTOP for `seconds`, then SIGCONT: commands sent meanwhile run late, after their
        callers may have given up on them."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGSTOP)
        try:
            await trio.sleep(seconds)
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def cut_pubsub_now(self) -> int:
        """CLIENT KILL TYPE pubsub (blocking): every listener connected here loses its connection."""
        client = self.client()
        try:
            return int(client.client_kill_filter(_type="pubsub"))
        finally:
            client.close()

    async def cut_pubsub(self) -> int:
        return await trio.to_thread.run_sync(self.cut_pubsub_now)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


class RedisCluster:
    """Six private redis-servers in one Redis Cluster: three masters with a replica each.

    `url(seeds)` names the first `seeds` nodes (comma-separated host:port after
    one `redis://`); `failover(n)` kills master n with SIGKILL, waits until its
    replica serves its slots, restarts it (it comes back as a replica) and
    waits until every master has a replica again.
    """

    def __init__(self, directory: Path) -> None:
        self.nodes = [RedisProcess(directory / f"node-{n}", cluster=True) for n in range(CLUSTER_NODES)]

    def url(self, seeds: int = CLUSTER_NODES) -> str:
        return "redis://" + ",".join(node.address for node in self.nodes[: max(1, seeds)])

    @property
    def running(self) -> bool:
        return all(node.running for node in self.nodes)

    async def start(self) -> None:
        """Start the nodes (the first time: create the cluster) and wait until it is whole."""
        fresh = not (self.nodes[0].dir / "nodes.conf").exists()
        for node in self.nodes:
            if not node.running:
                await node.start()
        if fresh:
            await trio.to_thread.run_sync(self._create)
        await self.wait_whole()

    def _create(self) -> None:
        args = [REDIS_CLI, "--cluster", "create", *(node.address for node in self.nodes)]
        args += ["--cluster-replicas", "1", "--cluster-yes"]
        created = subprocess.run(args, capture_output=True, text=True, timeout=CLUSTER_TIMEOUT, check=False)
        if created.returncode != 0:
            raise ChaosError(f"redis-cli --cluster create failed: {created.stdout[-2000:]} {created.stderr[-2000:]}")

    def topology(self) -> dict[int, tuple[str, bool]]:
        """Each node's role as a live node sees it: port -> ("master" or "replica", failed)."""
        for node in self.nodes:
            if not node.running:
                continue
            client = node.client(1.0)
            try:
                nodes: dict[str, dict[str, Any]] = client.cluster("NODES")  # parsed: address -> fields
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                continue
            finally:
                client.close()
            roles = {}
            for address, fields in nodes.items():
                flags = str(fields.get("flags", "")).split(",")
                failed = "fail" in flags or "fail?" in flags
                roles[int(address.rsplit(":", 1)[1])] = ("master" if "master" in flags else "replica", failed)
            return roles
        return {}

    def masters(self) -> list[RedisProcess]:
        """The live masters, by port."""
        roles = self.topology()
        return [n for n in self.nodes if n.running and roles.get(n.port, ("", True)) == ("master", False)]

    def _whole(self, wait_replicas: bool) -> str | None:
        """None when every live node says the cluster is ok and serves every slot (and, with
        `wait_replicas`, every master has a replica whose link is up); else what is missing."""
        masters = 0
        for node in self.nodes:
            if not node.running:
                continue
            client = node.client(1.0)
            try:
                info: dict[str, Any] = client.cluster("INFO")  # parsed: field -> value
                if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                    return f"node {node.port}: state {info.get('cluster_state')}, {info.get('cluster_slots_ok')} slots"
                replication = client.info("replication")
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                return f"node {node.port}: {exc!r}"
            finally:
                client.close()
            if replication.get("role") == "master":
                masters += 1
                if wait_replicas and int(replication.get("connected_slaves", 0)) < 1:
                    return f"master {node.port} has no replica"
            elif wait_replicas and replication.get("master_link_status") != "up":
                return f"replica {node.port}: link {replication.get('master_link_status')}"
        if wait_replicas and masters != CLUSTER_NODES // 2:
            return f"{masters} masters"
        return None

    async def wait_whole(self, wait_replicas: bool = True) -> None:
        deadline = trio.current_time() + CLUSTER_TIMEOUT
        missing: str | None = "not checked"
        for _ in range(int(CLUSTER_TIMEOUT / 0.1) + 1):
            missing = await trio.to_thread.run_sync(self._whole, wait_replicas)
            if missing is None or trio.current_time() > deadline:
                break
            await trio.sleep(0.1)
        if missing is not None:
            raise ChaosError(f"the Redis Cluster is not whole after {CLUSTER_TIMEOUT} s: {missing}")

    async def wait_failed_over(self, node: RedisProcess) -> None:
        """After `node` died: until another node serves its slots (its replica was promoted)."""
        deadline = trio.current_time() + CLUSTER_TIMEOUT
        for _ in range(int(CLUSTER_TIMEOUT / 0.1) + 1):
            role = (await trio.to_thread.run_sync(self.topology)).get(node.port)
            promoted = role is None or role[0] == "replica" or role[1]
            if promoted and await trio.to_thread.run_sync(self._whole, False) is None:
                return
            if trio.current_time() > deadline:
                break
            await trio.sleep(0.1)
        raise ChaosError(f"node {node.port} was not failed over within {CLUSTER_TIMEOUT} s")

    async def kill_master(self, pick: int) -> RedisProcess | None:
        """SIGKILL master number `pick` (modulo the live masters, by port) and wait for its failover."""
        masters = await trio.to_thread.run_sync(self.masters)
        if not masters:
            return None
        node = masters[pick % len(masters)]
        node.kill9()
        await self.wait_failed_over(node)
        return node

    async def kill_node(self, node: RedisProcess) -> None:
        """SIGKILL `node`; if it was a master, wait until its replica took over."""
        was_master = node in await trio.to_thread.run_sync(self.masters)
        node.kill9()
        if was_master:
            await self.wait_failed_over(node)

    async def heal(self) -> None:
        """Restart every node that is down (same port and directory) and wait until the cluster is whole."""
        for node in self.nodes:
            if not node.running:
                await node.start()
        await self.wait_whole()

    async def cut_pubsub(self) -> int:
        """CLIENT KILL TYPE pubsub on every live node."""
        cut = 0
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    cut += await trio.to_thread.run_sync(node.cut_pubsub_now)
        return cut

    def client(self) -> redis.cluster.RedisCluster:
        """A cluster client that knows every live node (for the driver's own writes)."""
        port = next(n.port for n in self.nodes if n.running)
        return redis.cluster.RedisCluster(host=LOOPBACK, port=port, socket_timeout=2.0, socket_connect_timeout=1.0)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
