"""tandem.js, the browser client: its Node tests (tests/js/), run by pytest.

`unit.test.mjs` tests the pure parts and the client against a fake WebSocket
(close codes, lost acks, authentication). The `server_*.test.mjs` files run
the client on Node's own WebSocket against a real `python server.py` that
this module starts; a small HTTP endpoint on loopback (TANDEM_CONTROL) lets
them `kill -9`, start and drain (SIGTERM) that server mid-test. Node is
required: a missing or too old `node` fails these tests, it never skips them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import PROCESS_TIMEOUT, ROOT, Server, ServerFactory, http_get

JS_TESTS = ROOT / "tests" / "js"
NODE_TIMEOUT = 180.0  # seconds one node --test run may take (each test bounds itself far below)
MIN_NODE = 20  # Node 20 has a WebSocket behind --experimental-websocket; 22 has it by default


def node_command() -> list[str]:
    """`node` and the flags its WebSocket needs; fails the test when Node is missing or too old."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"the tandem.js tests need Node {MIN_NODE}+ on PATH (Debian: apt-get install nodejs)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    match = re.match(r"v(\d+)\.(\d+)", version.strip())
    assert match, version
    major, minor = int(match[1]), int(match[2])
    if major < MIN_NODE or (major == MIN_NODE and minor < 10):
        pytest.fail(f"the tandem.js tests need Node 20.10+ (a WebSocket), found {version.strip()}")
    return [node, "--experimental-websocket"] if major < 22 else [node]


def run_node(test_file: Path, env: dict[str, str] | None = None) -> None:
    """`node --test test_file`; fails with node's whole output unless every test passed."""
    command = [*node_command(), "--test", "--test-reporter=spec", str(test_file)]
    try:
        result = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, **(env or {}), "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT,
        )
    except subprocess.TimeoutExpired as expired:
        partial = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else ""
        pytest.fail(f"{' '.join(command)} still ran after {NODE_TIMEOUT} s:\n{partial}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} exited with {result.returncode}:\n{output}"
    # The spec reporter's summary lines start with U+2139 (information source).
    assert re.search("^\u2139 pass [1-9]", output, re.MULTILINE), f"no test passed:\n{output}"
    assert re.search("^\u2139 fail 0$", output, re.MULTILINE), output


@contextmanager
def control_endpoint(server: Server) -> Iterator[str]:
    """An HTTP endpoint on loopback through which a Node test acts on `server`: its URL.

    GET /kill: kill -9. GET /start: start it again (same port, same DATA_DIR).
    GET /drain: SIGTERM, wait for the exit (its code is the answer), start again.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                if self.path == "/kill":
                    server.kill()
                    answer = "killed"
                elif self.path == "/start":
                    server.start()
                    answer = "started"
                elif self.path == "/drain":
                    server.signal(signal.SIGTERM)
                    answer = str(server.wait(PROCESS_TIMEOUT))
                    server.start()
                else:
                    self.send_error(404)
                    return
                status = 200
            except BaseException as exc:  # pytest.fail raises a BaseException: report it to the test
                status, answer = 500, f"{type(exc).__name__}: {exc}\n{server.output()[-4000:]}"
            body = answer.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_unit() -> None:
    """The pure parts, and every close code, lost ack and auth step against a fake WebSocket."""
    run_node(JS_TESTS / "unit.test.mjs")


@pytest.mark.parametrize(
    ("script", "settings"),
    [
        ("server_basics.test.mjs", {"HISTORY_SIZE": "5"}),
        ("server_restart.test.mjs", {"SHUTDOWN_GRACE": "3"}),
        ("server_limits.test.mjs", {"RATE_LIMIT_ENABLED": "1", "RATE_LIMIT_MESSAGES_USER": "3/2"}),
        # SECRET of server_auth.test.mjs; no leeway, so that its 4 s token must be refreshed in time.
        ("server_auth.test.mjs", {"AUTH_JWT_SECRET": "tandem-js-test-secret-of-32-chars!", "AUTH_LEEWAY": "0"}),
    ],
)
def test_against_a_real_server(tandem_factory: ServerFactory, script: str, settings: dict[str, str]) -> None:
    server = tandem_factory(**settings)
    with control_endpoint(server) as control:
        run_node(JS_TESTS / script, {"TANDEM_URL": server.url, "TANDEM_CONTROL": control})
    output = server.output()
    assert "Traceback" not in output, output[-4000:]


def test_served_with_type_and_validators(tandem: Server) -> None:
    """/tandem.js and the page: their type, an ETag, revalidated each time (no-cache), 304 when unchanged."""
    status, headers, body = http_get(f"{tandem.http}/tandem.js")
    assert status == 200
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["access-control-allow-origin"] == "*"  # an app on another origin imports it as a module
    assert body == (ROOT / "static" / "tandem.js").read_bytes()
    etag = headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag), etag
    for condition in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        status, again, body = http_get(f"{tandem.http}/tandem.js", {"If-None-Match": condition})
        assert (status, body, again["etag"]) == (304, b"", etag), condition
    assert http_get(f"{tandem.http}/tandem.js", {"If-None-Match": '"other"'})[0] == 200
    for path, kind in (("/", "text/html"), ("/app.js", "text/javascript"), ("/app.css", "text/css")):
        status, headers, _ = http_get(tandem.http + path)
        assert (status, headers["content-type"]) == (200, f"{kind}; charset=utf-8"), path
        assert headers["cache-control"] == "no-cache", path
        assert http_get(tandem.http + path, {"If-None-Match": headers["etag"]})[0] == 304, path
    status, headers, body = http_get(f"{tandem.http}/tandem.d.ts")
    assert status == 200 and b"export declare class Tandem" in body
    assert http_get(f"{tandem.http}/static_files.py")[0] == 404  # only the listed files are served
