"""Private redis-server processes for tests that stop, restart, kill or cluster Redis.

`RedisServer` runs one `redis-server` on a free port with its own directory
(`--save ""`, append-only file on request), waits until it answers PING, and
stops it by pid (SIGTERM, then SIGKILL). `RedisCluster3` starts three such
servers with `--cluster-enabled yes`, joins them with `redis-cli --cluster
create` and waits until every node says `cluster_state:ok`. The fixtures that
use them stop them in their finalisers.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import redis.cluster
from helpers import free_port

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
REDIS_CLI = shutil.which("redis-cli") or "redis-cli"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
CLUSTER_TIMEOUT = 20.0


class RedisServer:
    """One private `redis-server` process; `start()` again reuses its port and directory."""

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = False,
        password: str | None = None,
        cluster: bool = False,
        tls: TlsFiles | None = None,
        replica_of: RedisServer | None = None,
        node_timeout_ms: int = 5000,
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.bus_port = free_port() if cluster else 0
        self.appendonly = appendonly
        self.password = password
        self.cluster = cluster
        self.tls = tls
        self.replica_of = replica_of
        self.node_timeout_ms = node_timeout_ms
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, password: str | None = None) -> str:
        """The URL Tandem gets; `password` overrides the server's own (for wrong-password tests)."""
        secret = self.password if password is None else password
        auth = f":{quote(secret, safe='')}@" if secret else ""
        if self.tls is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca), safe='/')}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        args = [
            REDIS_SERVER,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            "",
        ]
        if self.tls is not None:
            args += ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            args += ["--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port)]
            args += ["--cluster-config-file", str(self.dir / f"nodes-{self.port}.conf")]
            args += ["--cluster-node-timeout", str(self.node_timeout_ms)]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        return args

    def client(self, **options: object) -> redis.Redis:
        kwargs: dict[str, object] = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0, **options}
        if self.tls is not None:
            kwargs |= {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)  # type: ignore[arg-type]

    def start(self) -> RedisServer:
        if self.running:
            raise AssertionError(f"redis-server on {self.port} is already running")
        if shutil.which(REDIS_SERVER) is None:
            raise AssertionError("redis-server is not installed: install it (Debian: apt-get install redis-server)")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT)
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            for _ in range(int(START_TIMEOUT / 0.05) + 1):
                if self.proc.poll() is not None:
                    raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    client.ping()
                    # Loading an append-only file answers LOADING; wait for the data.
                    if client.info("persistence").get("loading", 0) == 0:
                        return self
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            client.close()
        self.kill()
        raise AssertionError(f"redis-server did not answer on {self.port}:\n{self.output()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (Redis writes its append-only file and exits), SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)

    def replication(self) -> dict[str, Any]:
        """INFO replication: `role` ("master" or "slave"), `master_port`, `master_link_status`…"""
        client = self.client()
        try:
            return dict(client.info("replication"))
        finally:
            client.close()

    def role(self) -> str:
        return str(self.replication()["role"])

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets and answers nothing."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def replicas_online(self) -> int:
        """Replicas this master streams to (a replica after a sync counts once its first ACK came)."""
        info = self.replication()
        return sum(1 for n in range(int(info.get("connected_slaves", 0))) if info[f"slave{n}"]["state"] == "online")

    def wait_replicated(self, timeout: float = START_TIMEOUT) -> None:
        """Until this replica is in sync with its master and the master counts it for WAIT."""
        assert self.replica_of is not None
        for _ in range(int(timeout / 0.05)):
            if self.replication().get("master_link_status") == "up" and self.replica_of.replicas_online():
                return
            time.sleep(0.05)
        raise AssertionError(f"replica on {self.port} did not sync:\n{self.output()}")


RedisFactory = Callable[..., RedisServer]  # starts a RedisServer: the `private_redis` fixture


class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1, made with `openssl`."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = directory / "ca.crt"
        self.cert = directory / "redis.crt"
        self.key = directory / "redis.key"
        ca_key, csr, ext = directory / "ca.key", directory / "redis.csr", directory / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ca, cert = self.ca, self.cert
        for command in (
            f"req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=tandem-test-ca -keyout {ca_key} -out {ca}",
            f"req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout {self.key} -out {csr}",
            f"x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -CAcreateserial -days 1 -extfile {ext} -out {cert}",
        ):
            subprocess.run(["openssl", *command.split()], check=True, capture_output=True, timeout=60)


class RedisCluster3:
    """A real Redis Cluster of three masters (and `replicas` replicas of each) on private ports."""

    def __init__(
        self, directory: Path, *, appendonly: bool = False, replicas: int = 0, node_timeout_ms: int = 5000
    ) -> None:
        self.replicas = replicas
        self.nodes = [
            RedisServer(directory / f"node-{n}", cluster=True, appendonly=appendonly, node_timeout_ms=node_timeout_ms)
            for n in range(3 * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url()

    @property
    def seeds(self) -> str:
        """REDIS_URL naming every node as a seed."""
        return "redis://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> RedisCluster3:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            created = subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=CLUSTER_TIMEOUT,
                check=False,
            )
            if created.returncode != 0:
                raise AssertionError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, replicas: int | None = None) -> None:
        """Until every node says cluster_state:ok with all 16384 slots served, and replicas are in sync."""
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        pending = [node for node in self.nodes if node.running]
        text = ""
        for _ in range(int(CLUSTER_TIMEOUT / 0.05) + len(self.nodes)):
            if not pending:
                return
            text = subprocess.run(
                [REDIS_CLI, "-p", str(pending[0].port), "CLUSTER", "INFO"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout
            wanted = self.replicas if replicas is None else replicas
            synced = pending[0].role() != "master" or pending[0].replicas_online() >= wanted
            if "cluster_state:ok" in text and "cluster_slots_ok:16384" in text and synced:
                pending.pop(0)
            elif time.monotonic() > deadline:
                break
            else:
                time.sleep(0.05)
        if pending:
            raise AssertionError(f"cluster not ok on {pending[0].port}:\n{text}")

    def wait_ok(self) -> None:
        """After a node restarted: until the cluster serves every slot again."""
        self._wait_ok()

    def wait_failover(self) -> None:
        """After a master died: until a replica of it is master and every slot is served."""
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        for _ in range(int(CLUSTER_TIMEOUT / 0.1)):
            if sum(node.role() == "master" for node in self.nodes if node.running) == 3:
                self._wait_ok(replicas=0)  # the promoted master has none until the dead one is back
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise AssertionError("no replica took over the dead master's slots")

    def owner(self, key: str) -> RedisServer:
        """The master that serves the slot of `key` (the others answer MOVED)."""
        for node in self.nodes:
            if not node.running or node.role() != "master":
                continue
            client = node.client()
            try:
                client.exists(key)
                return node
            except redis.ResponseError:
                continue
            finally:
                client.close()
        raise AssertionError(f"no node serves {key}")

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A running replica of `master`."""
        for node in self.nodes:
            if node is not master and node.running and int(node.replication().get("master_port", 0)) == master.port:
                return node
        raise AssertionError(f"no replica of {master.port}")

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=2.0)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
