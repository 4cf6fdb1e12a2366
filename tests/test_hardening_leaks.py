"""What a hostile reader learns from logs and /metrics: nothing that lets them in.

Against a real server: a scripted session's whole output holds no session code,
only its keyed hash; /metrics refuses clients without METRICS_TOKEN or off
loopback, serves METRICS_ADDRESS alone, and renders once per second however
many scrapes come (server CPU from /proc). In-process: the redaction of codes
and the render cache.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import ipaddress
import logging
import math
import secrets
import statistics
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import prometheus_client
import pytest
import trio
from helpers import BOTH_STORES, CODE_HASH, Server, ServerFactory, connect, free_port, http_get, log_lines

import config as config_module
import health
import logging_setup
import redaction
from limiter import client_ip
from metrics import Metrics, RenderCache, StoreMetrics

HASH_KEY = "leaks-test-key-0123456789"
TOKEN = "metrics-token-0123456789abcdef"
NOT_LOOPBACK = "203.0.113.9"  # TEST-NET-3: only ever a header value, never a destination
BURST = 300
BURST_THREADS = 20


# --- helpers --------------------------------------------------------------------


def request(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET to 127.0.0.1:`port`: (status, headers with lower-case names, body)."""
    return http_get(f"http://127.0.0.1:{port}{path}", headers)


def assert_refused(answer: tuple[int, dict[str, str], bytes], status: int) -> None:
    got, headers, body = answer
    assert got == status, (got, body)
    assert headers["content-type"] == "application/json", headers
    error = orjson.loads(body)["error"]
    assert error["code"] == "unauthorized" and error["message"], error
    assert b"tandem_" not in body


def http_burst(server: Server, path: str, headers: dict[str, str]) -> tuple[float, float, list[bytes]]:
    """BURST GETs from BURST_THREADS keep-alive connections at once: (server CPU s, wall s, bodies)."""

    def client(count: int) -> list[bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        bodies = []
        try:
            for _ in range(count):
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                body = response.read()
                assert response.status == 200, (response.status, body)
                bodies.append(body)
        finally:
            conn.close()
        return bodies

    time.sleep(0.3)  # let the server settle: the CPU measured is the burst's
    cpu, wall = server.cpu_seconds(), time.monotonic()
    with ThreadPoolExecutor(BURST_THREADS) as pool:
        results = list(pool.map(client, [BURST // BURST_THREADS] * BURST_THREADS))
    wall = time.monotonic() - wall
    time.sleep(0.1)  # the last responses' bookkeeping
    return server.cpu_seconds() - cpu, wall, [body for bodies in results for body in bodies]


def render_seconds() -> float:
    """CPU of one render of a Metrics registry like the server's, in this process (median of 50)."""
    metrics = Metrics()
    StoreMetrics(metrics, "sqlite")  # the store histograms' children, as in the server
    times = []
    for _ in range(50):
        start = time.process_time()
        prometheus_client.generate_latest(metrics.registry)
        times.append(time.process_time() - start)
    return statistics.median(times)


# --- codes in logs ------------------------------------------------------------------


@BOTH_STORES
@pytest.mark.parametrize("hash_key", [HASH_KEY, ""], ids=["HASH_KEY", "generated"])
async def test_a_scripted_session_logs_only_keyed_hashes_of_its_codes(
    tandem_factory: ServerFactory, hash_key: str
) -> None:
    server = tandem_factory(
        LOG_LEVEL="DEBUG",
        HASH_KEY=hash_key,
        RATE_LIMIT_ENABLED="1",
        RATE_LIMIT_MESSAGES_USER="3/60",  # a refusal logged inside the session's bound context
        # The others off: on the shared Redis they would count earlier runs' failures too.
        RATE_LIMIT_MESSAGES_IP="off",
        RATE_LIMIT_CONNECTIONS_IP="off",
        RATE_LIMIT_JOIN_FAILURES_IP="off",
        RATE_LIMIT_CODE_FAILURES="off",
        SESSION_IDLE_TIMEOUT="3",
        SWEEP_INTERVAL="0.1",
    )
    # A code nobody holds (hidden like a real one), of letters no hex digest or timestamp contains.
    guessed = "".join(secrets.choice("GHJKMNPQRSTVWXYZ") for _ in range(8))
    async with connect(server) as a, connect(server) as b, connect(server) as c:
        created = await a.create()
        code = created["code"]
        joined = await b.join(code)
        await b.expect("session:paired")
        await a.expect("session:paired")
        for i in range(3):
            await a.message({"i": i})
            await b.expect("message")
        assert (await a.request("message:send", data="over"))["code"] == "rate_limited"
        assert (await c.request("session:join", code=guessed))["code"] == "not_found"
        wrong = {"code": code, "client_id": created["client_id"], "token": joined["token"], "last_seq": 0}
        assert (await c.request("session:resume", **wrong))["type"] == "error"
        assert (await b.request("session:leave"))["type"] == "session:left"
        await a.expect("session:peer_left")
        assert (await a.request("session:leave"))["type"] == "session:left"
        resume = {"code": code, "client_id": created["client_id"], "token": created["token"], "last_seq": 0}
        assert (await c.request("session:resume", **resume))["type"] == "error"  # it ended
        # A second session left to expire: the sweeper logs its code.
        expiring = (await c.create())["code"]
        c.patience = 10
        assert (await c.recv())["type"] == "session:expired"
    assert await trio.to_thread.run_sync(server.terminate) == 0

    output = server.output()
    for raw in (code, expiring, guessed):
        assert raw not in output, f"the code {raw} is in the log"
    lines = log_lines(server, strict=True)
    sessions = [line["session"] for line in lines if "session" in line]
    assert sessions and all(CODE_HASH.fullmatch(value) for value in sessions), sessions
    by_event: dict[str, list[str]] = {}
    for line in lines:
        if "session" in line:
            by_event.setdefault(line["event"], []).append(line["session"])
    hashed, hashed_expiring = by_event["session.created"]
    if hash_key:  # the hash is the one HASH_KEY gives, here and on any other instance
        redactor = redaction.Redactor("hash", hash_key.encode())
        assert (hashed, hashed_expiring) == (redactor.code(code), redactor.code(expiring))
    assert hashed != hashed_expiring
    for event in ("session.paired", "session.ended", "rate_limit.refused"):
        assert by_event[event] == [hashed], (event, by_event)  # stable for one code
    # On the shared Redis this server may also sweep sessions other tests left.
    assert hashed_expiring in by_event["session.expired"] and hashed not in by_event["session.expired"]
    closes = [line for line in lines if line["event"] == "connection.close"]
    assert closes and all(isinstance(line["code"], int) for line in closes)  # close codes stay numbers


def pipeline_lines(key: str, *fields: Mapping[str, object], rekey: bytes | None = None) -> list[dict[str, Any]]:
    """Log one line per `fields` through a Pipeline keyed with `key` (re-keyed before the last, if `rekey`)."""
    config = dataclasses.replace(config_module.DEFAULTS, log_format="json", log_level="DEBUG", hash_key=key)
    stream = io.StringIO()
    pipeline = logging_setup.Pipeline(config, stream).start()
    logger = logging.getLogger("test.leaks")
    logger.propagate = False
    logger.handlers[:] = [pipeline.handler]
    logger.setLevel(logging.DEBUG)
    try:
        for n, line in enumerate(fields):
            if rekey is not None and n == len(fields) - 1:
                pipeline.set_hash_key(rekey)
            logger.info("leak.check", extra={"fields": line})
    finally:
        pipeline.stop()
    return [orjson.loads(raw) for raw in stream.getvalue().splitlines()]


def test_code_fields_and_tagged_codes_in_text_are_hashed_error_and_close_codes_kept() -> None:
    fields: dict[str, object] = {
        "session": "G8SC3YY1",
        "code": "G8SC3YY1",
        "close": {"code": 1000},
        "error_code": {"code": "not_found"},
        "error": 'redis: tandem:{G8SC3YY1}:s gone; frame {"code":"G8SC3YY1"}; DETAIL: Key (code)=(G8SC3YY1) exists',
        "long": "x" * (redaction.MAX_STRING - 12) + "tandem:{G8SC3YY1}:s",  # cut inside the code
    }
    (line,) = pipeline_lines(HASH_KEY, fields)
    assert "G8SC3YY1" not in orjson.dumps(line).decode()
    hashed = redaction.Redactor("hash", HASH_KEY.encode()).code("G8SC3YY1")
    assert line["session"] == line["code"] == hashed
    assert line["close"] == {"code": 1000} and line["error_code"] == {"code": "not_found"}
    assert line["error"].count(hashed) == 3, line["error"]
    assert line["long"].endswith("tandem:{...[11 more]"), line["long"][-40:]


def test_the_code_hash_is_keyed_and_the_key_can_be_replaced_at_run_time() -> None:
    same = {"session": "ABCD2345"}
    first, second, rekeyed = pipeline_lines("k" * 16, same, same, same, rekey=b"j" * 16)
    (other,) = pipeline_lines("j" * 16, {"session": "ABCD2345"})
    assert first["session"] == second["session"] != other["session"]
    assert rekeyed["session"] == other["session"]  # set_hash_key: the same hash as HASH_KEY=jjj...
    with pytest.raises(ValueError):
        logging_setup.Pipeline(config_module.DEFAULTS, io.StringIO()).set_hash_key(b"too short")


# --- who may read /metrics ---------------------------------------------------------


def test_metrics_on_the_main_port_without_a_token_is_for_loopback_clients_only(
    tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    default = tandem_factory()
    status, _, body = request(default.port, "/metrics")
    assert status == 200 and b"tandem_sessions" in body, (status, body)

    proxied = tandem_factory(tmp_path / "proxied", TRUSTED_PROXIES="127.0.0.1")
    assert request(proxied.port, "/metrics")[0] == 200  # the proxy's own request: loopback
    assert request(proxied.port, "/metrics", {"X-Forwarded-For": "127.0.0.5"})[0] == 200
    for accept in ("text/plain", "application/json", "application/openmetrics-text"):
        answer = request(proxied.port, "/metrics", {"X-Forwarded-For": NOT_LOOPBACK, "Accept": accept})
        assert_refused(answer, 403)
    # The probes stay open to anyone: load balancers are not on loopback.
    assert request(proxied.port, "/health/live", {"X-Forwarded-For": NOT_LOOPBACK})[0] == 200


def test_metrics_token_is_required_from_everyone_when_set(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(METRICS_TOKEN=TOKEN, TRUSTED_PROXIES="127.0.0.1")
    for headers in (
        {},
        {"Authorization": "Bearer " + TOKEN[:-1] + "X"},
        {"Authorization": "Bearer " + TOKEN + "X"},
        {"Authorization": "Basic " + TOKEN},
        {"Authorization": TOKEN},
    ):
        answer = request(server.port, "/metrics", headers)
        assert_refused(answer, 401)
        assert answer[1]["www-authenticate"] == "Bearer"
    right = {"Authorization": "Bearer " + TOKEN}
    status, _, body = request(server.port, "/metrics", {**right, "X-Forwarded-For": NOT_LOOPBACK})
    assert status == 200 and b"tandem_sessions" in body
    status, headers, body = request(server.port, "/metrics", {**right, "Accept": "application/json"})
    assert status == 200 and headers["content-type"] == "application/json" and "sessions" in orjson.loads(body)
    # Refusals are counted, under a fixed label.
    text = request(server.port, "/metrics", right)[2].decode()
    assert 'tandem_errors_total{code="unauthorized"} 5.0' in text, text
    assert TOKEN not in server.output()


def test_metrics_address_is_a_listener_of_its_own(tandem_factory: ServerFactory) -> None:
    metrics_port = free_port()
    server = tandem_factory(METRICS_ADDRESS=f"127.0.0.1:{metrics_port}", METRICS_TOKEN=TOKEN)
    status, headers, body = request(metrics_port, "/metrics")  # no token there
    assert status == 200 and headers["content-type"].startswith("text/plain") and b"tandem_sessions" in body
    status, headers, body = request(metrics_port, "/metrics", {"Accept": "application/json"})
    assert status == 200 and "uptime" in orjson.loads(body)
    assert request(metrics_port, "/health/live")[0] == 200
    assert request(metrics_port, "/health/ready")[0] == 200
    for path in ("/", "/api/info", "/ws", "/metrics/", "/static/index.html"):
        status, _, body = request(metrics_port, path)
        assert status == 404, (path, status, body)
        assert orjson.loads(body)["error"]["code"] == "not_found"
    # The main port keeps its rules.
    assert_refused(request(server.port, "/metrics"), 401)
    assert request(server.port, "/metrics", {"Authorization": "Bearer " + TOKEN})[0] == 200
    assert request(server.port, "/")[0] == 200
    # The start-up line names the listener.
    (listening,) = log_lines(server, "server.listening", strict=True)
    assert listening["metrics_address"] == f"http://127.0.0.1:{metrics_port}", listening


async def test_no_websocket_on_the_metrics_address(tandem_factory: ServerFactory) -> None:
    from trio_websocket import ConnectionRejected

    metrics_port = free_port()
    server = tandem_factory(METRICS_ADDRESS=f"127.0.0.1:{metrics_port}")
    with pytest.raises(ConnectionRejected) as rejected:
        async with connect(f"ws://127.0.0.1:{metrics_port}/ws"):
            pass
    assert rejected.value.status_code == 404
    async with connect(server) as a:  # the main port still relays
        assert (await a.create())["type"] == "session:created"


# --- what a flood of scrapes costs ---------------------------------------------------


def test_a_burst_of_scrapes_costs_about_one_render_per_second(tandem_factory: ServerFactory) -> None:
    server = tandem_factory()
    one_render = render_seconds()
    # Each burst twice, the cheaper kept: a stray collection or sweep in one does not count.
    live_cpu = min(http_burst(server, "/health/live", {})[0] for _ in range(2))  # BURST requests without a render
    (metrics_cpu, wall, bodies), again = http_burst(server, "/metrics", {}), http_burst(server, "/metrics", {})
    metrics_cpu = min(metrics_cpu, again[0])
    json_cpu, json_wall, json_bodies = http_burst(server, "/metrics", {"Accept": "application/json"})

    # Every JSON summary differs (uptime in ms, CPU): identical bodies are shared renders.
    distinct = len(set(json_bodies))
    assert distinct <= math.ceil(json_wall) + 1, (distinct, json_wall)
    assert len(set(bodies)) <= math.ceil(wall) + 1, (len(set(bodies)), wall)
    # BURST renders would cost BURST * one_render of CPU more than the probes did.
    renders = (metrics_cpu - live_cpu) / one_render
    assert renders < BURST / 2, (
        f"{BURST} scrapes cost {metrics_cpu * 1000:.0f} ms of server CPU, {BURST} probes "
        f"{live_cpu * 1000:.0f} ms: about {renders:.0f} renders of {one_render * 1000:.2f} ms"
    )
    assert json_cpu < live_cpu + BURST / 2 * one_render, (json_cpu, live_cpu)


async def test_concurrent_scrapes_share_one_render_per_cache_period() -> None:
    now = [0.0]
    cache = RenderCache(1.0, clock=lambda: now[0])
    started = trio.Event()

    async def render() -> bytes:
        started.set()
        await trio.sleep(0.05)
        return f"body at {now[0]}".encode()

    got: list[bytes] = []

    async def scrape(cancel_early: bool) -> None:
        with trio.move_on_after(0.01 if cancel_early else 5):
            got.append(await cache.get("text", render))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(scrape, True)  # the one that renders goes away: the others still get the body
        await started.wait()
        for _ in range(49):
            nursery.start_soon(scrape, False)
    # The render is shielded: the scraper that started it may get the body too.
    assert cache.renders == 1 and len(got) >= 49 and set(got) == {b"body at 0.0"}
    assert await cache.get("text", render) == b"body at 0.0" and cache.renders == 1
    assert await cache.get("json", render) == b"body at 0.0" and cache.renders == 2  # a form of its own
    now[0] = 1.0
    assert await cache.get("text", render) == b"body at 1.0" and cache.renders == 3


def test_a_trusted_proxy_naming_loopback_does_not_make_a_remote_peer_local() -> None:
    """A peer inside TRUSTED_PROXIES (a pod in a private range) sending X-Forwarded-For: 127.0.0.1."""
    trusted = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.0/8"))
    resolve = partial(client_ip, trusted=trusted)

    def scope(peer: str, forwarded: str | None = None) -> dict[str, Any]:
        headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
        return {"type": "http", "client": (peer, 40000), "headers": headers}

    assert not health.from_loopback(scope("10.1.2.3", "127.0.0.1"), resolve)
    assert not health.from_loopback(scope("10.1.2.3"), resolve)
    assert not health.from_loopback(scope("127.0.0.1", NOT_LOOPBACK), resolve)  # a local proxy for a remote client
    assert health.from_loopback(scope("127.0.0.1"), resolve)
    assert health.from_loopback(scope("127.0.0.1", "127.0.0.5"), resolve)
