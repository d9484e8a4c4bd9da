"""The compose stack (compose.yaml) from the images `make images` builds, driven by pytest-docker.

One stack per test session, in a compose project of its own (``signertest<pid>``: its own
containers and volumes, so tokens, PINs and cores of one run never meet another's). Host
networking: the front, Prometheus and the metrics listener get free ports, passed to compose as
the variables compose.yaml reads; the dev client's certificate lands in a temporary directory.

pytest-docker with Debian 12's docker-compose (v1.29; compose v2 is not packaged for Debian 12):
its default setup, ``up --build --wait``, is v2's (v1 has no ``--wait``, and the images are
``make images``' job), so setup is ``up -d`` and :func:`stack` waits for the health checks
itself. Containers are looked up with ``docker-compose ps -q SERVICE`` (v1 and v2 name them
differently). Without an engine or the images, the tests skip saying what to run, and under
``make test`` (SIGNER_TESTS_MUST_RUN) that skip is a failure (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pytest_docker.plugin import get_docker_services

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
PROJECT = f"signertest{os.getpid()}"
TAG = os.environ.get("SIGNER_TAG", "dev")
IMAGES = [f"signer-{name}:{TAG}" for name in ("token-host", "service", "front", "prometheus")]
# Throwaway containers that read the volumes (make images BASE=...: the same base).
BASE_IMAGE = os.environ.get("SIGNER_BASE_IMAGE", "signer-base:bookworm")
# Long-running services and their health checks (the one-shot jobs hsm-init and pki excepted).
SERVICES = ("token-host", "service", "front", "prometheus")
HEALTHY_WITHIN_SECONDS = 120.0
# A container that reads the stack's volumes as root, with no network.
THROWAWAY = ("docker", "run", "--rm", "--network", "none", "--user", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


@dataclass(frozen=True)
class Stack:
    """The running stack: where its front and Prometheus listen, the dev client's files."""

    project: str
    front: str
    prometheus: str
    metrics: str
    clients: Path
    issuers: str  # the front's issuers server, host:port

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def container(self, service: str) -> str:
        """The id of SERVICE's container (``docker-compose ps -q``, not a guessed name)."""
        ids = self.compose("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def inspect(self, service: str) -> dict[str, object]:
        data = json.loads(docker("inspect", self.container(service)).stdout)
        assert isinstance(data, list)
        first = data[0]
        assert isinstance(first, dict)
        return first

    def state(self, service: str, field: str) -> str:
        return docker("inspect", "-f", f"{{{{{field}}}}}", self.container(service)).stdout.strip()

    def volume(self, name: str) -> str:
        return f"{self.project}_{name}"

    def read_volume(self, name: str, path: str) -> bytes:
        """A file from one of the stack's volumes, read as root in a throwaway container."""
        mount = f"{self.volume(name)}:/v:ro"
        done = subprocess.run(
            [*THROWAWAY, "-v", mount, BASE_IMAGE, "cat", f"/v/{path}"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        return done.stdout

    def wait_healthy(self, services: tuple[str, ...] = SERVICES) -> float:
        """Seconds until every one of ``services`` is healthy; fails with their logs if not."""
        t0 = time.monotonic()
        while time.monotonic() < t0 + HEALTHY_WITHIN_SECONDS:
            if all(self.state(s, ".State.Health.Status") == "healthy" for s in services):
                return time.monotonic() - t0
            time.sleep(0.5)
        logs = self.compose("logs", "--no-color", "--tail", "30", check=False).stdout
        pytest.fail(f"not healthy in {HEALTHY_WITHIN_SECONDS:g} s: {services}\n{logs}")


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """An engine and the images, or a skip that says what to run (a failure under make test)."""
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no Docker engine answers: `make docker-engine` starts one")
    missing = [
        image
        for image in [*IMAGES, BASE_IMAGE]
        if docker("image", "inspect", image, check=False).returncode != 0
    ]
    if missing:
        pytest.skip(f"images {missing} missing: `make images` builds them")
    remove_abandoned_stacks()


def remove_abandoned_stacks() -> None:
    """Stacks of earlier test runs whose process is gone (killed before its teardown): their
    restart policies bring them back whenever the engine starts, holding CPU, memory and ports
    (one from a killed run came back 2 hours later when `make images` started the engine)."""
    listed = docker(
        "ps", "-a", "--format", '{{.Label "com.docker.compose.project"}}', check=False
    ).stdout.split()
    for project in sorted(set(listed)):
        pid = project.removeprefix("signertest")
        if project == PROJECT or not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        subprocess.run(
            ["docker-compose", "-p", project, "-f", str(COMPOSE_FILE), "down", "-v", "-t", "5"],
            capture_output=True,
            check=False,
            timeout=120,
        )


# The stack lives as long as this package's tests, not the session (pytest-docker's own
# docker_services is session-scoped): left up, it held its ports, memory and CPU through every
# later test, and a port it had freed while its front restarted was taken back from under the
# integration tests' nginx (clean-clone CI: "Address already in use").
@pytest.fixture(scope="package")
def stack_env(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Free ports and a clients directory, as the variables compose.yaml reads."""
    stack = Stack(
        project=PROJECT,
        front=f"127.0.0.1:{free_port()}",
        prometheus=f"127.0.0.1:{free_port()}",
        metrics=f"127.0.0.1:{free_port()}",
        clients=tmp_path_factory.mktemp("clients"),
        issuers=f"127.0.0.1:{free_port()}",
    )
    env = {
        "SIGNER_TAG": TAG,
        "SIGNER_FRONT_LISTEN": stack.front,
        "PROMETHEUS_LISTEN": stack.prometheus,
        "SIGNER_METRICS": stack.metrics,
        "SIGNER_CLIENTS_DIR": str(stack.clients),
        "SIGNER_ISSUERS_LISTEN": stack.issuers,
        "SIGNER_ISSUERS": f"tokens=https://localhost:{stack.issuers.rpartition(':')[2]}/tokens",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield stack
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return "docker-compose"  # Debian 12's v1.29 (compose v2 is not packaged there)


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return PROJECT


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --remove-orphans"]  # the project's volumes (tokens, PINs, cores) too


@pytest.fixture(scope="package")
def stack(
    stack_env: Stack,
    docker_compose_command: str,
    docker_compose_file: str,
    docker_compose_project_name: str,
    docker_cleanup: list[str],
) -> Iterator[Stack]:
    """The stack, up and healthy (token host, service, front through mTLS, Prometheus); down
    (volumes too) once this package's tests are done."""
    with get_docker_services(
        docker_compose_command,
        docker_compose_file,
        docker_compose_project_name,
        ["up -d"],  # v1 has no --wait: wait_healthy waits for the health checks
        docker_cleanup,
    ):
        took = stack_env.wait_healthy()
        print(f"stack {stack_env.project} healthy {took:.1f} s after up -d")
        yield stack_env
