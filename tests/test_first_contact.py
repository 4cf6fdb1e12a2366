"""What a new user meets first: `--help`, a misspelt `.env` key, start-up failures, the URL to open.

Each start-up failure the environment causes (a taken port, an address no
interface has, a DATA_DIR that is a file or is held by another process) ends
the process with exit 2 and one `tandem: SETTING=value: what happened; what
to do` line on stderr, the form of a bad setting; a misspelt `.env` key is
named in a warning with the setting it most likely meant.
"""

from __future__ import annotations

import re
import resource
import socket
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, Server, base_env, eventually, free_port, log_lines

EXIT_TIMEOUT = 30.0


def run_server(cwd: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """`python server.py ARGS` in `cwd` until it exits: (exit code, stdout, stderr)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args],
        cwd=cwd,
        env=base_env(HOST="127.0.0.1", **settings),
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=False,
    )


def failure_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one `tandem:` line on stderr of a process that failed at start-up."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("tandem: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_help_lists_the_commands_and_points_at_the_settings(tmp_path: Path) -> None:
    result = run_server(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert "migrate" in result.stdout and ".env.example" in result.stdout
    named = re.findall(r"\b(?:README|docs/[a-z_]+)\.md\b", result.stdout)
    assert "docs/configuration.md" in named, "--help points at the settings reference"
    assert all((ROOT / name).is_file() for name in named), named
    wrong = run_server(tmp_path, "serve-please")
    assert wrong.returncode == 2 and "usage: python server.py" in wrong.stderr


def test_a_taken_port_names_the_setting_and_the_address(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        line = failure_line(run_server(tmp_path, PORT=str(port), DATA_DIR=str(tmp_path / "data")))
    assert line.startswith(f"tandem: PORT={port}: cannot listen on 127.0.0.1:{port}: Address already in use;"), line
    assert "choose another port" in line


def test_an_address_no_interface_has_names_host(tmp_path: Path) -> None:
    settings = {"HOST": "192.0.2.1", "PORT": str(free_port()), "DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py")],
        cwd=tmp_path,
        env=base_env(**settings),
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=False,
    )
    line = failure_line(result)
    assert line.startswith("tandem: HOST=192.0.2.1: cannot listen on 192.0.2.1:"), line


def test_a_data_dir_that_is_a_file_names_data_dir(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file")
    line = failure_line(run_server(tmp_path, PORT=str(free_port()), DATA_DIR=str(not_a_dir)))
    assert line.startswith(f"tandem: DATA_DIR={not_a_dir}: "), line
    assert "set DATA_DIR to a directory" in line


def test_a_data_dir_held_by_another_process_names_data_dir(tmp_path: Path) -> None:
    first = Server({}, tmp_path / "data", tmp_path / "first.log").start()
    try:
        line = failure_line(run_server(tmp_path, PORT=str(free_port()), DATA_DIR=str(tmp_path / "data")))
        assert line.startswith(f"tandem: DATA_DIR={tmp_path / 'data'}: "), line
        assert "another Tandem process" in line
    finally:
        first.kill()


async def test_a_misspelt_dotenv_key_is_named_with_the_setting_it_meant(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PROT=4128\nNODE_ENV=production\nTANDEM_HOTS=x\n")
    server = Server({"LOG_LEVEL": "INFO"}, tmp_path / "data", tmp_path / "server.log").start()
    try:
        await eventually(lambda: len(log_lines(server, "server.listening")), 1)  # warnings come first
        warnings = {w["key"]: w for w in log_lines(server, "config.unknown_setting")}
        assert warnings["PROT"]["did_you_mean"] == "PORT" and warnings["PROT"]["line"] == 1
        assert warnings["TANDEM_HOTS"]["did_you_mean"] == "HOST"
        assert "NODE_ENV" not in warnings  # another tool's key: left alone
        assert "4128" not in server.output()  # values are never logged
    finally:
        server.kill()


async def test_the_start_up_line_gives_a_url_a_person_can_open(tmp_path: Path) -> None:
    server = Server({"LOG_LEVEL": "INFO"}, tmp_path / "data", tmp_path / "server.log")
    server.env["HOST"] = "0.0.0.0"
    server.start()
    try:
        await eventually(lambda: len(log_lines(server, "server.listening")), 1)
        (listening,) = log_lines(server, "server.listening")
        assert listening["url"] == f"http://localhost:{server.port}/"
    finally:
        server.kill()


async def test_the_open_file_limit_is_raised_to_the_hard_limit_and_a_short_one_is_named(tmp_path: Path) -> None:
    """Every WebSocket is a file: Tandem raises its soft limit to the hard one and says
    so in `server.listening`; a hard limit below MAX_SOCKETS is a warning with both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard != resource.RLIM_INFINITY, "this test needs a finite hard RLIMIT_NOFILE"
    more = hard + 1000  # more sockets than the process can ever hold
    server = Server({"LOG_LEVEL": "INFO", "MAX_SOCKETS": str(more)}, tmp_path / "data", tmp_path / "server.log")
    low = max(1024, soft // 2)
    server.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # started with a low soft limit
    server.start()
    try:
        await eventually(lambda: len(log_lines(server, "server.listening")), 1)
        (listening,) = log_lines(server, "server.listening")
        assert listening["file_limit"] == hard
        (warning,) = log_lines(server, "server.file_limit")
        assert warning["level"] == "warning"
        assert warning["file_limit"] == hard and warning["max_sockets"] == more
    finally:
        server.kill()


async def test_an_unreachable_redis_is_named_in_the_log_with_its_password_masked(tmp_path: Path) -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    server = Server({"LOG_LEVEL": "INFO", "REDIS_URL": url}, tmp_path / "data", tmp_path / "server.log").start()
    try:
        await eventually(lambda: len(log_lines(server, "store.error")) > 0, True, within=10)
        down = log_lines(server, "store.error")[0]
        assert down["store"] == url.replace("hunter2-secret", "***"), down
        assert "hunter2" not in server.output()
    finally:
        server.kill()
