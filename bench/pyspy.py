"""Figure 7: read a py-spy raw profile (collapsed stacks) of a server and say where its time went.

`py-spy record --format raw` writes one line per distinct stack: frames from the
root, `function (file:line)` joined by `;`, then a sample count. py-spy is meant
to drop idle threads, but on this VM it keeps threads blocked in epoll, in a
lock or condition wait: those samples (IDLE_LEAVES) are dropped here, and the
rest ("busy samples") are shares of wall-clock time a thread was running or in
a system call (a socket send, an fsync). Tandem's own lines are told apart by
their source text (the COMMIT of a group commit is its fsync).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT

# Leaf frames of a thread that waits: epoll with nothing to do, a worker thread
# waiting for a job, the log writer waiting for records.
IDLE_LEAVES = frozenset(
    {
        "EpollIOManager.get_events",
        "WorkerThread._work",
        "Condition.wait",
        "Event.wait",
        "Queue.get",
        "QueueListener.dequeue",
        "_Listener.dequeue",
    }
)
# Leaf functions named on their own: where they spend is not what their file says.
FUNCTIONS = {
    "SocketBuffer._read_from_socket": "redis-py socket reads (waiting for Redis replies)",
    "_SocketType._nonblocking_helper": "socket send/recv system calls",
}

# Frames that are on every stack of a thread and say nothing about the work.
PLUMBING = (
    "(threading.py)",
    "(trio/_core/_thread_cache.py)",
    "(trio/_threads.py)",
    "(outcome/",
    "unrolled_run (trio/_core/_run.py)",
    "_make_simple_sock_method_wrapper",
)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# The component that a leaf frame's file belongs to: the first prefix that matches.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("wsproto/", "wsproto (WebSocket framing)"),
    ("hypercorn/", "hypercorn (ASGI server)"),
    ("h11/", "h11 (HTTP)"),
    ("starlette/", "starlette"),
    ("trio_websocket/", "trio-websocket"),
    ("trio/_socket.py", "socket send/recv system calls"),
    ("trio/_core/_io_epoll.py", "trio I/O polling (epoll)"),
    ("trio/_channel.py", "trio memory channels"),
    ("trio/_threads.py", "trio thread hand-off (to_thread/from_thread)"),
    ("trio/_core/_thread_cache.py", "trio thread hand-off (to_thread/from_thread)"),
    ("trio/_core/_entry_queue.py", "trio thread hand-off (to_thread/from_thread)"),
    ("trio/_core/_run.py", "trio scheduler and cancel scopes"),
    ("trio/_core/_traps.py", "trio scheduler and cancel scopes"),
    ("trio/_core/_ki.py", "trio scheduler and cancel scopes"),
    ("outcome/", "trio scheduler and cancel scopes"),
    ("trio/", "trio, other"),
    ("redis/", "redis-py (client, parser)"),
    ("session_store.py", "Tandem store (incl. SQLite calls)"),
    ("sqlite_store.py", "Tandem store (incl. SQLite calls)"),
    ("redis_store.py", "Tandem store (incl. SQLite calls)"),
    ("redis_scripts.py", "Tandem store (incl. SQLite calls)"),
    ("redis_listener.py", "Tandem store (incl. SQLite calls)"),
    ("redis_client.py", "Tandem store (incl. SQLite calls)"),
    ("relay.py", "Tandem relay.py and lifecycle.py"),
    ("lifecycle.py", "Tandem relay.py and lifecycle.py"),
    ("server.py", "Tandem server.py"),
    ("hypercorn_fixes.py", "hypercorn (ASGI server)"),
    ("health.py", "Tandem health.py, metrics.py and prometheus_client (metrics)"),
    ("metrics.py", "Tandem health.py, metrics.py and prometheus_client (metrics)"),
    ("prometheus_client/", "Tandem health.py, metrics.py and prometheus_client (metrics)"),
    ("protocol.py", "Tandem protocol.py (incl. orjson)"),
    ("limiter.py", "Tandem limiter.py"),
    ("logging_setup.py", "logging"),
    ("redaction.py", "logging"),
    ("logging/", "logging"),
    ("asyncio/", "asyncio"),
    ("uvicorn/", "uvicorn"),
    ("websockets/", "websockets"),
    ("socketio/", "python-socketio / engineio"),
    ("engineio/", "python-socketio / engineio"),
    ("threading.py", "threads (stdlib)"),
    ("queue.py", "threads (stdlib)"),
    ("socket.py", "sockets (stdlib)"),
    ("selectors.py", "sockets (stdlib)"),
    ("<frozen codecs>", "UTF-8 decoding (codecs)"),
    ("<frozen importlib", "import machinery"),
    ("<frozen", "frozen stdlib"),
)


@dataclass
class Profile:
    samples: int = 0  # busy samples
    idle: int = 0  # samples of waiting threads, dropped
    stacks: list[tuple[list[tuple[str, str, str]], int]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Profile:
        profile = cls()
        for raw in path.read_text(errors="replace").splitlines():
            stack_text, _, count_text = raw.rpartition(" ")
            if not stack_text or not count_text.isdigit():
                continue
            frames = []
            for part in stack_text.split(";"):
                m = _FRAME.match(part.strip())
                if m:
                    frames.append((m["func"], _short(m["file"]), m["line"] or ""))
                else:
                    frames.append((part.strip(), "", ""))
            count = int(count_text)
            if frames and frames[-1][0] in IDLE_LEAVES:
                profile.idle += count
                continue
            profile.samples += count
            profile.stacks.append((frames, count))
        return profile

    def threads(self) -> Counter[str]:
        """Samples by thread role, told from the root of each stack."""
        roles: Counter[str] = Counter()
        for frames, count in self.stacks:
            funcs = {f"{func} ({file})" for func, file, _ in frames}
            files = " ".join(f for _, f, _ in frames)
            if "_listen (redis_store.py)" in funcs:
                roles["Redis listener thread"] += count
            elif "_thread_cache.py" in files:
                roles["store writer thread (SQLite / Redis pipeline)"] += count
            elif any(f.startswith("QueueListener._monitor") or f.startswith("_monitor") for f in funcs):
                roles["log writer thread"] += count
            elif "threading.py" in files:
                roles["other threads"] += count
            else:
                roles["event loop (main thread)"] += count
        return roles

    def components(self) -> Counter[str]:
        """Samples by the component of the innermost frame (self time)."""
        out: Counter[str] = Counter()
        for frames, count in self.stacks:
            out[stack_component(frames)] += count
        return out

    def self_functions(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for frames, count in self.stacks:
            if frames:
                func, file, _ = frames[-1]
                out[f"{func} ({file})"] += count
        return out

    def inclusive_functions(self) -> Counter[str]:
        """Samples in which a function is on the stack (once per stack)."""
        out: Counter[str] = Counter()
        for frames, count in self.stacks:
            for name in {f"{func} ({file})" for func, file, _ in frames}:
                out[name] += count
        return out

    def lines(self, top: int = 12) -> list[str]:
        """A plain-text summary."""
        if not self.samples:
            return ["no samples (py-spy could not attach?)"]
        pct = 100.0 / self.samples
        out = [f"{self.samples} busy samples ({self.idle} samples of waiting threads dropped)"]
        out.append("by thread: " + ", ".join(f"{k} {v * pct:.0f}%" for k, v in self.threads().most_common()))
        out.append("self time by component:")
        out += [f"  {v * pct:5.1f}%  {k}" for k, v in self.components().most_common(top)]
        out.append("self time by function:")
        out += [f"  {v * pct:5.1f}%  {k}" for k, v in self.self_functions().most_common(top)]
        out.append("inclusive time (on the stack), without thread and scheduler plumbing:")
        inclusive = [
            (k, v)
            for k, v in self.inclusive_functions().most_common()
            if v * pct < 95 and not k.startswith(("<module>", "run (", "main (")) and not any(p in k for p in PLUMBING)
        ]
        out += [f"  {v * pct:5.1f}%  {k}" for k, v in inclusive[: top + 8]]
        return out


def stack_component(frames: list[tuple[str, str, str]]) -> str:
    """The leaf's component; generic helpers (contextlib, generated __init__s) count for their caller's."""
    for frame in reversed(frames):
        name = leaf_component(frame)
        if name != "other":
            return name
    return "other"


def leaf_component(frame: tuple[str, str, str]) -> str:
    func, file, line = frame
    if func in FUNCTIONS:
        return FUNCTIONS[func]
    if file in ("session_store.py", "sqlite_store.py", "redis_store.py"):
        text = source_line(file, line)
        if "COMMIT" in text:
            return "SQLite COMMIT (WAL write and fsync)"
        if "execute(" in text:
            return "Tandem store: SQL statements (SQLite)"
        return "Tandem store: Python around them"
    return component(file)


_SOURCES: dict[str, list[str]] = {}


def source_line(file: str, line: str) -> str:
    """The text of line `line` of Tandem's `file` (as it is now on disk)."""
    if file not in _SOURCES:
        try:
            _SOURCES[file] = (ROOT / file).read_text().splitlines()
        except OSError:
            _SOURCES[file] = []
    lines = _SOURCES[file]
    n = int(line) if line.isdigit() else 0
    return lines[n - 1] if 0 < n <= len(lines) else ""


def component(file: str) -> str:
    for prefix, name in COMPONENTS:
        if "/" in prefix or prefix.startswith("<"):
            if file.startswith(prefix) or f"/{prefix}" in file:
                return name
        elif file == prefix or file.endswith(f"/python3.11/{prefix}"):  # a top-level module: Tandem's or stdlib's
            return name
    return "other"


def _short(file: str) -> str:
    """py-spy names files by module path (trio/_core/_run.py); absolute ones lose their prefix."""
    for marker in ("site-packages/", "/lib/python3.11/", "/python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file
