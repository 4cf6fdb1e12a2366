"""Lifecycle tests against the real process: restart, crash, drain, slow readers, start-up.

Every test runs `python server.py` (see conftest.py) and talks to it over real
WebSockets; signals are real (SIGTERM, SIGKILL). What is checked is what a
user can observe: close codes, exit codes, and the Delivery promise of
PROTOCOL.md: an acknowledged message survives a graceful restart and a
`kill -9`, and `session:resume` replays it in `seq` order, without gaps or
duplicates. The restart tests run on both stores: with Redis the sessions
outlive Tandem there.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import trio
from helpers import (
    BOTH_STORES,
    PROCESS_TIMEOUT,
    ROOT,
    Client,
    Server,
    ServerFactory,
    base_env,
    close_code,
    connect,
    expect_messages,
    frames_until_close,
    free_port,
    is_listening,
    paired,
    resume,
    wait_exit,
    wait_listening,
)
from trio_websocket import ConnectionClosed

MAX_SEQ = 2**53 - 1


# --- helpers ---------------------------------------------------------------------


def run_to_exit(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `python server.py` that is expected to exit on its own."""
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=5) as response:
        body = orjson.loads(response.read())
    assert isinstance(body, dict)
    return body


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM a process this test started; SIGKILL it if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(PROCESS_TIMEOUT)
            raise
    return proc.returncode


async def expect_presence(client: Client, client_id: str, online: bool) -> None:
    frame = await client.expect("session:presence")
    assert frame["client_id"] == client_id and frame["online"] is online, frame


async def pair_then_drop_b(server: Server, a: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """A creates, B joins and leaves by dropping its socket; returns (created, joined)."""
    created = await a.create()
    async with connect(server) as b:
        joined = await b.join(created["code"])
        await b.expect("session:paired")
        await a.expect("session:paired")
    await expect_presence(a, joined["client_id"], False)
    return created, joined


async def burst(
    a: Client, count: int, trigger_after: int, trigger: Callable[[], Awaitable[None]]
) -> tuple[dict[int, Any], dict[int, int], int]:
    """Pipeline `count` message:send frames; call `trigger` right after the
    `trigger_after`th ack; read until the socket closes.

    Returns (data by request id, acked seq by request id, close code).
    """
    sent: dict[int, Any] = {}
    acked: dict[int, int] = {}
    code = 0

    async def sender() -> None:
        for i in range(1, count + 1):
            data = {"n": i, "text": f"burst message {i}", "pad": "x" * 64}
            sent[i] = data
            try:
                await a.send({"type": "message:send", "id": i, "data": data})
            except ConnectionClosed:
                sent.pop(i)  # never left this client
                return

    async def reader() -> None:
        nonlocal code
        triggered = False
        with trio.fail_after(30):
            for _ in range(count + 10):
                try:
                    frame = orjson.loads(await a.ws.get_message())
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    code = int(exc.reason.code)
                    return
                assert frame["type"] == "message:ack", frame
                assert frame["id"] not in acked, f"second ack for {frame}"
                acked[frame["id"]] = frame["seq"]
                if len(acked) == trigger_after and not triggered:
                    triggered = True
                    await trigger()
            raise AssertionError("more frames than requests")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await reader()
        nursery.cancel_scope.cancel()
    assert len(acked) >= trigger_after
    return sent, acked, code


async def check_replay(server: Server, creds: dict[str, Any], sent: dict[int, Any], acked: dict[int, int]) -> None:
    """B resumes from 0: seqs 1..newest, no duplicates, every acked message with its data."""
    async with connect(server) as b:
        reply = await resume(b, creds, 0)
        assert reply["recovered"] is True, reply
        newest = reply["last_seq"]
        assert newest >= max(acked.values()), (newest, max(acked.values()))
        replay = await expect_messages(b, newest)
        await b.nothing()
    assert [m["seq"] for m in replay] == list(range(1, newest + 1))
    by_seq = {m["seq"]: m["data"] for m in replay}
    for request_id, seq in acked.items():
        assert by_seq[seq] == sent[request_id], f"acked seq {seq} replayed with other data"
    numbers = [m["data"]["n"] for m in replay]
    assert len(set(numbers)) == len(numbers), "a message was stored twice"
    assert set(numbers) <= set(sent), "a message nobody sent was replayed"
    assert len(set(acked.values())) == len(acked), "two acks with one seq"


# --- 1. graceful restart --------------------------------------------------------------


@BOTH_STORES
async def test_restart_replays_missed_messages_after_sigterm(tandem_factory: ServerFactory) -> None:
    server = tandem_factory()
    async with connect(server) as a:
        created = await a.create()
        async with connect(server) as b:
            joined = await b.join(created["code"])
            await b.expect("session:paired")
            await a.expect("session:paired")
            for i in range(3):
                await a.message({"before": i})
            seen = await expect_messages(b, 3)
            assert [m["data"] for m in seen] == [{"before": i} for i in range(3)]
            b_last_seq = seen[-1]["seq"]
        await expect_presence(a, joined["client_id"], False)

        missed = [{"missed": i, "text": "while B was away"} for i in range(5)]
        missed_seqs = [await a.message(data) for data in missed]
        assert missed_seqs == list(range(b_last_seq + 1, b_last_seq + 6))

        server.signal(signal.SIGTERM)
        assert await close_code(a) == 1012
    assert await wait_exit(server) == 0

    restarted = tandem_factory(data_dir=server.data_dir)
    async with connect(restarted) as a, connect(restarted) as b:
        reply = await resume(b, joined, b_last_seq)
        assert reply["recovered"] is True
        assert reply["last_seq"] == missed_seqs[-1]
        assert {c["client_id"] for c in reply["clients"]} == {created["client_id"], joined["client_id"]}
        replay = await expect_messages(b, 5)
        assert [m["seq"] for m in replay] == missed_seqs
        assert [m["data"] for m in replay] == missed
        assert all(m["from"] == created["client_id"] for m in replay)
        await b.nothing()

        a_reply = await resume(a, created, 0)
        assert a_reply["last_seq"] == missed_seqs[-1]
        assert {(c["client_id"], c["online"]) for c in a_reply["clients"]} == {
            (created["client_id"], True),
            (joined["client_id"], True),
        }
        await expect_presence(b, created["client_id"], True)
        await a.nothing()  # its own messages are not replayed to it

        seq = await a.message("hello again")
        frame = await b.expect("message")
        assert (frame["seq"], frame["data"], frame["from"]) == (seq, "hello again", created["client_id"])
        reply_seq = await b.message({"reply": True})
        frame = await a.expect("message")
        assert (frame["seq"], frame["data"]) == (reply_seq, {"reply": True})
        assert reply_seq == seq + 1


# --- 2. kill -9 after a burst --------------------------------------------------------


@BOTH_STORES
async def test_acked_messages_survive_sigkill_mid_burst(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(HISTORY_SIZE="1000")
    async with connect(server) as a:
        _, joined = await pair_then_drop_b(server, a)

        async def kill() -> None:
            server.kill()

        sent, acked, code = await burst(a, 300, 150, kill)
    assert code == 1006  # no close frame from a killed process

    restarted = tandem_factory(data_dir=server.data_dir, HISTORY_SIZE="1000")
    await check_replay(restarted, joined, sent, acked)


# --- 3. SIGTERM with many open connections ----------------------------------------------


async def test_sigterm_closes_every_connection_with_1012_within_grace(tandem_factory: ServerFactory) -> None:
    grace = 5.0
    chat_pairs, idle_pairs, bare = 8, 8, 18
    total = 2 * (chat_pairs + idle_pairs) + bare
    assert total == 50
    server = tandem_factory(SHUTDOWN_GRACE=str(grace))

    codes: list[int] = []
    members: list[tuple[dict[str, Any], dict[str, Any]]] = []
    ready = 0
    all_ready = trio.Event()
    exchanged = 0

    def mark_ready(n: int) -> None:
        nonlocal ready
        ready += n
        if ready == total:
            all_ready.set()

    async def chatter(client: Client) -> None:
        nonlocal exchanged
        try:
            for i in range(100_000):
                await client.send({"type": "message:send", "id": i, "data": {"i": i}})
                for _ in range(100_000):
                    frame = await client.recv()
                    if frame["type"] == "message:ack" and frame["id"] == i:
                        break
                    # The peer's socket may close first during the drain: its presence event comes through.
                    assert frame["type"] in ("message", "session:presence"), frame
                exchanged += 1
                await trio.sleep(0.005)
        except ConnectionClosed as exc:
            assert exc.reason is not None
            codes.append(int(exc.reason.code))
            return
        raise AssertionError("conversation did not end")

    async def waiter(client: Client) -> None:
        codes.append(await close_code(client, within=30))

    async def pair_task(chatting: bool) -> None:
        async with connect(server) as a, connect(server) as b:
            created = await a.create()
            joined = await b.join(created["code"])
            await b.expect("session:paired")
            await a.expect("session:paired")
            members.append((created, joined))
            mark_ready(2)
            async with trio.open_nursery() as nursery:
                for client in (a, b):
                    nursery.start_soon(chatter if chatting else waiter, client)

    async def bare_task() -> None:
        async with connect(server) as client:
            pong = await client.request("ping")
            assert pong["type"] == "pong"
            mark_ready(1)
            await waiter(client)

    elapsed = 0.0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(chat_pairs + idle_pairs):
                nursery.start_soon(pair_task, i < chat_pairs)
            for _ in range(bare):
                nursery.start_soon(bare_task)
            await all_ready.wait()
            await trio.sleep(0.5)  # the chatters are mid-conversation
            assert exchanged > 0
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            exit_code = await wait_exit(server)
            elapsed = time.monotonic() - started
    assert exit_code == 0, server.output()
    assert elapsed <= grace + 1.0, f"exit took {elapsed:.2f}s with SHUTDOWN_GRACE={grace}"
    assert len(codes) == total
    assert codes == [1012] * total, sorted(codes)

    restarted = tandem_factory(data_dir=server.data_dir, SHUTDOWN_GRACE=str(grace))
    assert len(members) == chat_pairs + idle_pairs
    for created, joined in members:
        async with connect(restarted) as a, connect(restarted) as b:
            for client, creds in ((a, created), (b, joined)):
                # last_seq above the newest seq: nothing is replayed.
                reply = await resume(client, creds, MAX_SEQ)
                assert reply["recovered"] is True
                assert {c["client_id"] for c in reply["clients"]} == {created["client_id"], joined["client_id"]}
            await expect_presence(a, joined["client_id"], True)
            await a.nothing(0.05)
            await b.nothing(0.05)


# --- 4. acks in flight at SIGTERM ----------------------------------------------------------


@BOTH_STORES
async def test_no_acked_message_lost_when_sigterm_arrives_mid_burst(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(HISTORY_SIZE="1000")
    async with connect(server) as a:
        _, joined = await pair_then_drop_b(server, a)

        async def terminate() -> None:
            server.signal(signal.SIGTERM)

        sent, acked, code = await burst(a, 500, 100, terminate)
    assert code == 1012
    assert await wait_exit(server) == 0

    restarted = tandem_factory(data_dir=server.data_dir, HISTORY_SIZE="1000")
    await check_replay(restarted, joined, sent, acked)


# --- 5. a reader that stops reading -----------------------------------------------------------


async def test_slow_reader_is_dropped_without_unbounded_memory(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(PING_INTERVAL="1")
    payload = "x" * 10_000
    max_messages, max_seconds = 3000, 20.0
    async with connect(server) as a, connect(server) as b:  # b: trio-websocket's default queue of 1
        created = await a.create()
        joined = await b.join(created["code"])
        await b.expect("session:paired")
        await a.expect("session:paired")
        # From here on B reads nothing.
        rss_start = peak = server.rss_kib()
        sent = 0
        offline_at: int | None = None
        deadline = time.monotonic() + max_seconds
        while sent < max_messages and time.monotonic() < deadline:
            await a.send({"type": "message:send", "id": sent, "data": payload})
            for _ in range(10):
                frame = await a.recv()
                if frame["type"] == "message:ack":
                    assert frame["id"] == sent, frame
                    break
                assert frame["type"] == "session:presence", frame
                assert frame == {"type": "session:presence", "client_id": joined["client_id"], "online": False}
                offline_at = sent
            else:
                raise AssertionError("no ack")
            sent += 1
            if sent % 20 == 0:
                peak = max(peak, server.rss_kib())
            if offline_at is not None and sent >= offline_at + 20:
                break  # the server keeps acking after dropping B
        peak = max(peak, server.rss_kib())
        assert offline_at is not None, f"B never reported offline after {sent} messages"
        growth_mib = (peak - rss_start) / 1024
        assert growth_mib < 30, f"server RSS grew by {growth_mib:.1f} MiB"

        # B reads again: at most what was already on its way, then the close.
        frames, code = await frames_until_close(b, 15, max_frames=sent + 1)  # no more than A sent
        for frame in frames:
            assert frame["type"] == "message" and frame["data"] == payload, str(frame)[:200]
        received = [frame["seq"] for frame in frames]
        assert code in (1013, 1006), code
        assert received == list(range(1, len(received) + 1))
        assert len(received) <= offline_at + 1

    async with paired(server) as (c, d, _, _):
        seq = await c.message("still serving")
        frame = await d.expect("message")
        assert (frame["seq"], frame["data"]) == (seq, "still serving")


# --- 6. start-up ------------------------------------------------------------------------------


def test_bad_setting_exits_2_with_one_line(tmp_path: Path) -> None:
    for name, value in (("PORT", "abc"), ("SESSION_TTL", "-1"), ("LOG_LEVEL", "LOUD")):
        env = base_env(HOST="127.0.0.1", PORT=str(free_port()), DATA_DIR=str(tmp_path / "data"))
        env[name] = value
        result = run_to_exit(env, tmp_path)
        assert result.returncode == 2, (name, result)
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert len(lines) == 1, (name, lines)
        assert name in lines[0], (name, lines)


def test_second_server_on_same_data_dir_refuses_to_start(tandem_factory: ServerFactory, tmp_path: Path) -> None:
    first = tandem_factory()
    port = free_port()
    env = base_env(HOST="127.0.0.1", PORT=str(port), DATA_DIR=str(first.data_dir))
    result = run_to_exit(env, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "DATA_DIR" in output and "in use" in output, output
    assert not is_listening(port)
    assert health(first.port) == {"status": "pass"}


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    dotenv_port, env_port = free_port(), free_port()
    (tmp_path / ".env").write_text(f"# settings for this directory\nPORT={dotenv_port}\nHOST=127.0.0.1\n")

    # PORT from .env only.
    log = tmp_path / "dotenv.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py")],
            cwd=tmp_path,
            env=base_env(DATA_DIR=str(tmp_path / "data-1")),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(proc, dotenv_port, log)
        assert health(dotenv_port) == {"status": "pass"}
    finally:
        assert stop(proc) == 0

    # PORT in both: the environment wins.
    log = tmp_path / "env-wins.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py")],
            cwd=tmp_path,
            env=base_env(DATA_DIR=str(tmp_path / "data-2"), PORT=str(env_port)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(proc, env_port, log)
        assert health(env_port) == {"status": "pass"}
        assert not is_listening(dotenv_port)
    finally:
        assert stop(proc) == 0
