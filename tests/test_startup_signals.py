"""SIGTERM at any moment of start-up ends the process cleanly (exit 0), never by the signal.

A signal that arrived after Hypercorn bound its socket but before the drain
handler was installed killed the process (exit -15) in a chaos run. These
tests send SIGTERM at moments spread over start-up, and right after the bind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, Server

# Delays after the process starts: the settings and logging, the store opening,
# the bind; the last ones land after it listens.
DELAYS = (0.3, 0.5, 0.7, 0.9, 1.2)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Server]:
    """A server process started without waiting for it to listen."""
    server = Server({"LOG_LEVEL": "INFO"}, tmp_path / "data", tmp_path / "server.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "REDIS_URL", "DATABASE_URL"))}
    with open(server.log_path, "ab") as log:
        server.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py")],
            cwd=tmp_path,
            env={**env, **server.env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    yield server
    server.kill()


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("delay", DELAYS)
def test_sigterm_during_start_up_exits_0(launch: Server, delay: float) -> None:
    time.sleep(delay)
    launch.signal(signal.SIGTERM)
    code = launch.wait(15)
    assert code == 0, f"exit {code} for SIGTERM {delay} s after the start:\n{launch.output()[-2000:]}"


def test_sigterm_right_after_the_bind_drains(launch: Server) -> None:
    deadline = time.monotonic() + 15
    while not listening(launch.port) and time.monotonic() < deadline:
        time.sleep(0.002)
    launch.signal(signal.SIGTERM)
    assert launch.wait(15) == 0, launch.output()[-2000:]
    assert '"shutdown.complete"' in launch.output()
