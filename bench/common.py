"""What the bench's processes share: ports, child processes, /proc readings, payloads, percentiles.

Everything here is loopback only: servers bind 127.0.0.1 and clients connect there.
Timestamps that cross processes are CLOCK_MONOTONIC (`time.monotonic_ns`), one
clock for the whole machine on Linux.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"
# The size of a message's `data` value in bytes ("~100-byte messages").
PAYLOAD_BYTES = 100
# File descriptors a load generator may hold: its sockets and some.
NOFILE = 20_000
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def raise_nofile(wanted: int = NOFILE) -> int:
    """Raise this process's open-file limit towards `wanted` (children inherit it); return the new soft limit.

    The hard limit is raised too where the process may (CAP_SYS_RESOURCE); elsewhere
    the soft limit stops at the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and wanted > hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def payload_text(request_id: int, sent_ns: int) -> str:
    """A `message:send` frame whose `data` ({"t": send time, "p": padding}) is PAYLOAD_BYTES long."""
    stamp = str(sent_ns)
    pad = "x" * max(0, PAYLOAD_BYTES - len(stamp) - 13)  # 13: {"t":,"p":""}
    return f'{{"type":"message:send","id":{request_id},"data":{{"t":{stamp},"p":"{pad}"}}}}'


def payload_data(sent_ns: int) -> dict[str, Any]:
    """The same `data` value as a dict, for clients that serialise themselves (Socket.IO)."""
    stamp = str(sent_ns)
    return {"t": sent_ns, "p": "x" * max(0, PAYLOAD_BYTES - len(stamp) - 13)}


def percentile(ordered: list[int] | list[float], q: float) -> float:
    """The q-th percentile (0-100) of an ascending list, nearest rank; nan if empty."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


# --- /proc ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid` (all its threads) so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    uname = os.uname()
    return {
        "cores": os.cpu_count() or 0,
        "cpu": model,
        "python": sys.version.split()[0],
        "kernel": f"{uname.sysname} {uname.release}",
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def scrape_metrics(port: int, timeout: float = 2.0) -> dict[str, float]:
    """Tandem's /metrics as {"name{labels}": value}; {} if it does not answer (best effort)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=timeout) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


def metric_mean_ms(before: dict[str, float], after: dict[str, float], name: str, having: str = "") -> float | None:
    """Mean of histogram `name` between two scrapes, in ms, over the series whose labels contain
    `having` (e.g. 'op="append"'); None if there is no such series or no observation."""
    count = total = 0.0
    for key, value in after.items():
        if key.startswith(f"{name}_count") and having in key:
            count += value - before.get(key, 0.0)
            total_key = f"{name}_sum" + key[len(f"{name}_count") :]
            total += after.get(total_key, 0.0) - before.get(total_key, 0.0)
    return total / count * 1000 if count > 0 else None


# --- child processes ---------------------------------------------------------------


@dataclass
class Child:
    """A process the bench started; stopped by its own pid only."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def wait_listening(self, timeout: float = START_TIMEOUT) -> Child:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.port} within {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def spawn(
    name: str,
    args: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    port: int = 0,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = None,
) -> Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args,
            cwd=cwd or ROOT,
            env=env,
            stdin=stdin,
            stdout=stdout if stdout is not None else log,
            stderr=log,
        )
    return Child(name, proc, log_path, port)


def clean_env(**settings: str) -> dict[str, str]:
    """The environment for a child: this one minus every Tandem/Redis/database setting, plus `settings`."""
    drop = ("TANDEM_", "REDIS_URL", "REDIS_CLUSTER", "DATABASE_URL", "RATE_LIMIT", "PORT", "HOST", "DATA_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = str(ROOT)
    env.update(settings)
    return env


# --- worker <-> orchestrator lines ----------------------------------------------------
#
# A load worker prints `ready {json}` once its connections are set up, reads
# `go <monotonic ns>` on stdin (the start of the run, the same instant for every
# worker) and prints `result {json}` at the end.


def emit_line(kind: str, body: dict[str, Any]) -> None:
    sys.stdout.write(f"{kind} {json.dumps(body)}\n")
    sys.stdout.flush()


def parse_line(line: str) -> tuple[str, dict[str, Any]]:
    kind, _, rest = line.strip().partition(" ")
    return kind, (json.loads(rest) if rest else {})
