"""The deployment files, checked without a Docker engine.

The Dockerfile's final stage is replayed into a directory and its CMD and
HEALTHCHECK run there with its ENV; `docker-compose config` validates the
compose file. (.env.example and docs/configuration.md's settings table: tests/test_config.py.)
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import ROOT, free_port, wait_listening


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.image}"
        return found[-1]


def dockerfile_stages(path: Path = ROOT / "Dockerfile") -> list[Stage]:
    """Instructions per stage; comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            image, _, alias = args.partition(" AS ")
            stages.append(Stage(image.strip(), alias.strip() or None))
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    command = json.loads(args)
    assert isinstance(command, list) and all(isinstance(part, str) for part in command), args
    return command


def image_env(stage: Stage) -> dict[str, str]:
    """The stage's ENV, with $VAR expanded against what is set so far."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    for args in stage.all("ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", args):
            env[key] = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m.group(1) or m.group(2), ""), value)
    return env


def test_dockerfile_is_multi_stage_slim_non_root_with_probe_signal_port_and_volume() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    assert all("slim" in stage.image for stage in stages), [stage.image for stage in stages]
    runtime = stages[-1]
    user = runtime.last("USER").split(":")[0]
    assert user not in ("root", "0"), user
    assert runtime.last("EXPOSE").split() == ["3001"]
    assert runtime.last("STOPSIGNAL") == "SIGTERM"
    env = image_env(runtime)
    assert env["PORT"] == "3001" and env["LOG_FORMAT"] == "json"
    assert env["DATA_DIR"] in exec_form(runtime.last("VOLUME"))
    # Runtime dependencies only: the dev requirements are never installed.
    text = (ROOT / "Dockerfile").read_text()
    assert "requirements-dev" not in text and "--require-hashes" in text and "requirements.lock" in text
    copies = runtime.all("COPY")
    assert any(args.startswith("--from=") for args in copies), "the runtime stage takes the built dependencies"
    assert not any(" . " in f" {args} " for args in copies), "the whole build context is never copied"
    healthcheck = runtime.last("HEALTHCHECK")
    command = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python" and "/health/live" in command[-1]
    assert not {"curl", "wget"} & set(re.findall(r"\w+", healthcheck))
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", ".env", "tests", "data"):
        assert path in ignored, path


def stage_files(stage: Stage, into: Path) -> Path:
    """Replay the stage's COPY lines from the build context; return its WORKDIR."""
    workdir = into / stage.last("WORKDIR").lstrip("/")
    workdir.mkdir(parents=True)
    for args in stage.all("COPY"):
        if args.startswith("--from="):
            continue  # the virtualenv: here, the test's own
        *sources, dest = args.split()
        target = workdir / dest
        for source in sources:
            matches = sorted(glob.glob(str(ROOT / source)))
            assert matches, f"COPY {source}: nothing in the build context"
            for match in map(Path, matches):
                if match.is_dir():
                    shutil.copytree(match, target, dirs_exist_ok=True)
                else:
                    destination = target / match.name if dest.endswith("/") or len(matches) > 1 else target
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(match, destination)
    return workdir


def run_healthcheck(command: list[str], env: dict[str, str], cwd: Path) -> int:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, timeout=10).returncode


def test_image_start_and_healthcheck_commands_work_outside_docker(tmp_path: Path) -> None:
    runtime = dockerfile_stages()[-1]
    workdir = stage_files(runtime, tmp_path / "image")
    env = image_env(runtime)
    # /opt/venv/bin of the image is this virtualenv; /data is a writable directory here.
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    port = free_port()
    env.update(LANG="C.UTF-8", PORT=str(port), DATA_DIR=str(tmp_path / "data"))
    start = exec_form(runtime.last("CMD"))
    check = exec_form(runtime.last("HEALTHCHECK").split(" CMD ", 1)[1])
    log = tmp_path / "image.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(start, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(proc, port, log)
        assert run_healthcheck(check, env, workdir) == 0, log.read_text()
        proc.send_signal(getattr(signal, runtime.last("STOPSIGNAL")))
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert run_healthcheck(check, env, workdir) != 0, "the healthcheck fails when nothing answers"
    for line in log.read_text().splitlines():
        assert isinstance(json.loads(line), dict), line  # LOG_FORMAT=json from the image's ENV


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("docker-compose is needed to validate docker-compose.yml: apt-get install -y docker-compose")


def test_compose_file_passes_docker_compose_config() -> None:
    compose = [*compose_command(), "--env-file", str(ROOT / ".env.example"), "-f", str(ROOT / "docker-compose.yml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    result = subprocess.run([*compose, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    services = subprocess.run(
        [*compose, "config", "--services"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    ).stdout.split()
    assert sorted(services) == ["lb", "postgres", "redis", "tandem-1", "tandem-2"], services
    blocks = re.split(r"\n  (?=[\w-]+:\n)", result.stdout.split("\nservices:\n", 1)[1].split("\nvolumes:\n")[0])
    by_name = {block.split(":", 1)[0].strip(): block for block in blocks}
    for name in services:
        assert "healthcheck:" in by_name[name], name
    for name in ("tandem-1", "tandem-2", "lb"):
        depends = by_name[name].split("depends_on:", 1)[1]
        assert depends.count("condition: service_healthy") >= 2, name
    assert (ROOT / "deploy" / "haproxy.cfg").is_file()
