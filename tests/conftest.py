"""Fixtures shared by every test group. Fixtures are factories where a test may want several.

The integration fixtures start real things: a SoftHSM2 token served by a real ``p11-kit server``
(one per test session, in a temporary directory), and the real gRPC service on a real loopback
socket, either in a thread of the test process (``service_factory``, with an injectable clock)
or as its own process (``service_process_factory``, for tests that inspect or kill it).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest

from signer._internal import config as config_mod
from signer._internal import hsm
from signer._internal.front import ENGINE_PATH
from signer._internal.policy import grant_everything
from signer._internal.server import Server
from signer.client import SignerClient
from tests import postgres

REPO = Path(__file__).resolve().parent.parent
SIGNER_BIN = Path(sys.executable).parent / "signer"

# Set by `make test` (and its unit, integration and crash slices): there, and in CI, a test
# that would skip fails instead. A test skips only where someone ran pytest by hand without
# what it needs, and says what is missing and how to get it.
MUST_RUN = "SIGNER_TESTS_MUST_RUN"


def _skips_fail() -> bool:
    return bool(os.environ.get(MUST_RUN) or os.environ.get("CI"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Where every test must run, a skip (of the test or of a fixture it needs) is a failure
    that says what was missing."""
    report = yield
    if report.skipped and _skips_fail() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"would have skipped, and every test must run here ({MUST_RUN} or CI is set): {reason}"
        )
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Skipped tests did not run: say so where it cannot be missed (the reasons are above)."""
    skipped = len(terminalreporter.stats.get("skipped", []))
    if skipped:
        terminalreporter.write_sep(
            "!",
            f"{skipped} SKIPPED: these tests did NOT run; 'make test' runs every one",
            red=True,
            bold=True,
        )


def _require_tools() -> None:
    """The integration suite needs the token host's tools; say loudly what is missing."""
    missing = [t for t in ("p11-kit", "openssl", "nginx") if shutil.which(t) is None]
    missing += [
        m
        for m in (config_mod.SOFTHSM_MODULE, config_mod.P11KIT_CLIENT_MODULE, ENGINE_PATH)
        if not Path(m).exists()
    ]
    if missing:
        pytest.skip(
            f"integration tests need {', '.join(missing)}: run 'make test', which installs them "
            "(Debian packages: see APT_PACKAGES in the Makefile)"
        )


def require_postgres() -> Path:
    """PostgreSQL's server binaries and psycopg, for the tests of the PostgreSQL store (issue
    16); says what is missing and what installs it."""
    bin_dir = postgres.bindir()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip(
            "the PostgreSQL store's tests need PostgreSQL's initdb and pg_ctl (Debian package "
            f"{postgres.DEBIAN_PACKAGE}, or ${postgres.BINDIR_ENV}): run 'make test', which "
            "installs it (see APT_PACKAGES in the Makefile)"
        )
    try:
        import psycopg_pool  # noqa: F401
    except ImportError:
        pytest.skip(
            "the PostgreSQL store's tests need psycopg and psycopg-pool (the service extra): "
            "run 'make test', which installs them"
        )
    return bin_dir


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[postgres.Cluster]:
    """One throwaway PostgreSQL cluster for the session (tests/postgres.py), removed at its
    end with its data; tests share it through a schema each (:func:`pg_dsn`)."""
    cluster = postgres.Cluster(require_postgres())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


_pg_schemas = itertools.count(1)


@pytest.fixture
def pg_dsn(pg_cluster: postgres.Cluster) -> Iterator[str]:
    """The DSN of an empty schema of this test's own (first on its search_path), dropped after
    it. A schema, not a database: CREATE SCHEMA takes 0.3 ms, CREATE DATABASE 45 to 240 ms,
    which made the PostgreSQL half of the store's tests three times the SQLite half."""
    import psycopg
    from psycopg import sql

    name = f"t{next(_pg_schemas)}"
    schema = sql.Identifier(name)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
    yield pg_cluster.dsn(search_path=name)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))


@pytest.fixture
def pg_connect(pg_dsn: str) -> Iterator[Callable[[], Any]]:
    """``pg_connect()``: an autocommit connection to the test's schema (a psycopg
    Connection), closed after the test: what a test does underneath the service."""
    import psycopg

    opened: list[Any] = []

    def make() -> Any:
        conn = psycopg.connect(pg_dsn, autocommit=True)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


def signer_cli(*args: str, address: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The ``signer`` command, as a caller runs it, against the service at ``address``."""
    return subprocess.run(
        [str(SIGNER_BIN), *args, "--address", address],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def need_tool(tool: str) -> str:
    """Where ``tool`` is, or a loud skip naming what installs it (make test does)."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is needed to take real cores: run 'make test', which installs gdb")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FakeClock:
    """An injectable clock: ``clock.advance(days=8)`` instead of sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, **kwargs: float) -> None:
        with self._lock:
            self.now += timedelta(**kwargs)


@dataclass
class TokenHostHandle:
    host: hsm.TokenHost
    root: Path

    @property
    def paths(self) -> hsm.HsmPaths:
        return self.host.paths

    def stop(self) -> None:
        self.host.stop()

    def start(self) -> None:
        self.host.start()

    def token_config(self, **overrides: Any) -> config_mod.TokenConfig:
        values: dict[str, Any] = {
            "module": config_mod.P11KIT_CLIENT_MODULE,
            "server_address": self.paths.server_address,
            "uri": f"pkcs11:token={hsm.DEFAULT_LABEL}",
            "pin_file": str(self.paths.user_pin),
            "health_interval_seconds": 0.2,
        }
        values.update(overrides)
        return config_mod.TokenConfig(**values)


@pytest.fixture(scope="session")
def token_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenHostHandle]:
    """One real token host (SoftHSM2 behind p11-kit server) for the whole test session."""
    _require_tools()
    root = tmp_path_factory.mktemp("hsm")
    hsm.init(root)
    host = hsm.TokenHost(root)
    host.start()
    handle = TokenHostHandle(host, root)
    yield handle
    host.stop()


@dataclass
class RunningService:
    """A real gRPC service in a thread of this process, on a real Unix socket."""

    server: Server
    address: str
    clock: FakeClock
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    clients: list[SignerClient] = field(default_factory=list)
    stopped: bool = False

    def client(self, timeout: float = 30.0) -> SignerClient:
        c = SignerClient(self.address, timeout=timeout)
        self.clients.append(c)
        return c

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Runs a coroutine on the service's event loop and waits for it."""
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def blocking(self, fn: Callable[[], Any]) -> Any:
        return self.call(self.server.run_blocking(fn))

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for c in self.clients:
            c.close()
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


# Unix socket paths are limited to 107 bytes: tests keep theirs short, under one directory.
_SOCKETS = Path(tempfile.mkdtemp(prefix="signer-tests-"))
atexit.register(shutil.rmtree, _SOCKETS, True)


class KernelDumpSettings:
    """The safety net of the tests that really set the kernel's ``core_pattern`` (the dump gate,
    tests/integration/test_dump_gate.py): each pattern they set is noted here, and if the session
    ends (or the process exits) with one of them still set, the pattern and pipe limit the session
    started with are put back. A pattern some other session set is left alone. A test gate left
    over from a killed run (its wrapper in a ``signer-gate-PID-`` temporary directory, PID no
    longer running) counts as ``core``; one whose session still runs is that session's."""

    PATTERN = Path("/proc/sys/kernel/core_pattern")
    PIPE_LIMIT = Path("/proc/sys/kernel/core_pipe_limit")
    TEST_PREFIX = "signer-gate-"

    def __init__(self) -> None:
        self.ours: set[str] = set()
        try:
            self.pattern = self.PATTERN.read_text().rstrip("\n")
            self.pipe_limit = self.PIPE_LIMIT.read_text().strip()
        except OSError:
            self.pattern, self.pipe_limit = "core", "0"
        if self.left_over(self.pattern):
            self.ours.add(self.pattern)
            self.pattern, self.pipe_limit = "core", "0"
            self.restore()

    @classmethod
    def prefix(cls) -> str:
        """This process's temporary directories for a gate: ``signer-gate-PID-``."""
        return f"{cls.TEST_PREFIX}{os.getpid()}-"

    def left_over(self, pattern: str) -> bool:
        if not pattern.startswith("|"):
            return False
        for part in Path(pattern[1:].split()[0]).parts:
            if part.startswith(self.TEST_PREFIX):
                pid = part.removeprefix(self.TEST_PREFIX).split("-")[0]
                return pid.isdigit() and not Path(f"/proc/{pid}").exists()
        return False

    def note(self, pattern: str) -> None:
        self.ours.add(pattern)

    def restore(self) -> None:
        with contextlib.suppress(OSError):
            if self.PATTERN.read_text().rstrip("\n") in self.ours:
                self.PIPE_LIMIT.write_text(self.pipe_limit)
                self.PATTERN.write_text(self.pattern)


KERNEL_DUMP_SETTINGS = KernelDumpSettings()
atexit.register(KERNEL_DUMP_SETTINGS.restore)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    KERNEL_DUMP_SETTINGS.restore()


def socket_address() -> str:
    return f"unix:{_SOCKETS}/s{next(_ids)}.sock"


def allow_me(tmp_path: Path) -> Path:
    """A policy granting the user running the tests every operation on every key."""
    path = tmp_path / "policy-allow-me.toml"
    path.write_text(grant_everything([f"uid:{os.getuid()}"]))
    return path


def make_config(
    tmp_path: Path, token: config_mod.TokenConfig, **sections: dict[str, Any]
) -> config_mod.Config:
    server: dict[str, Any] = {
        "listen": socket_address(),
        "grace_seconds": 5.0,
        "policy_file": str(allow_me(tmp_path)),
    }
    server.update(sections.get("server", {}))
    keys: dict[str, Any] = {"reaper_interval_seconds": 3600.0}
    keys.update(sections.get("keys", {}))
    n = next(_ids)
    audit: dict[str, Any] = {"path": str(tmp_path / f"audit-{n}.db")}
    audit.update(sections.get("audit", {}))
    return config_mod.Config(
        server=config_mod.ServerConfig(**server),
        token=token,
        store=config_mod.StoreConfig(path=str(tmp_path / f"signer-{n}.db")),
        keys=config_mod.KeysConfig(**keys),
        audit=config_mod.AuditConfig(**audit),
        metrics=config_mod.MetricsConfig(**sections.get("metrics", {})),
        jwt=config_mod.JwtConfig(**sections.get("jwt", {})),
    )


_ids = itertools.count()


def start_service(cfg: config_mod.Config, clock: FakeClock) -> RunningService:
    """Starts the real server on its own event loop in a thread; the caller must stop() it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-service", daemon=True)
    thread.start()
    server = Server(cfg, clock=clock)
    svc = RunningService(server, cfg.server.listen, clock, loop, thread)
    svc.call(server.start())
    return svc


class ServiceFactory(Protocol):
    """The ``service_factory`` fixture's type."""

    def __call__(
        self,
        token: config_mod.TokenConfig | None = None,
        clock: FakeClock | None = None,
        **sections: dict[str, Any],
    ) -> RunningService: ...


@pytest.fixture
def service_factory(token_host: TokenHostHandle, tmp_path: Path) -> Iterator[ServiceFactory]:
    """``service_factory(token=..., server={...}, keys={...})`` starts a service in a thread."""
    started: list[RunningService] = []

    def start(
        token: config_mod.TokenConfig | None = None,
        clock: FakeClock | None = None,
        **sections: dict[str, Any],
    ) -> RunningService:
        cfg = make_config(tmp_path, token or token_host.token_config(), **sections)
        svc = start_service(cfg, clock or FakeClock(datetime.now(UTC)))
        started.append(svc)
        return svc

    yield start
    for svc in reversed(started):
        svc.stop()


@pytest.fixture
def service(service_factory: ServiceFactory) -> RunningService:
    return service_factory()


@pytest.fixture
def client(service: RunningService) -> SignerClient:
    return service.client()


_names = itertools.count()


class UniqueName(Protocol):
    """The ``unique_name`` fixture's type: ``unique_name()`` or ``unique_name("prefix")``."""

    def __call__(self, prefix: str = ...) -> str: ...


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> UniqueName:
    """Key names unique across the session (the token is shared by every test)."""
    base = request.node.name.lower()
    base = "".join(ch if ch.isalnum() else "-" for ch in base)[:40].strip("-")

    def make(prefix: str = "k") -> str:
        return f"{prefix}-{base}-{next(_names)}"

    return make


@dataclass
class ServiceProcess:
    proc: subprocess.Popen[bytes]
    address: str
    config_path: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self) -> SignerClient:
        return SignerClient(self.address, timeout=30.0)

    def stop(self, sig: int = 15, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            return self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_toml(path: Path, cfg: config_mod.Config) -> Path:
    path.write_text(config_mod.dump(cfg))
    return path


def wait_until(pred: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


class ServiceProcessFactory(Protocol):
    """The ``service_process_factory`` fixture's type."""

    def __call__(
        self, token: config_mod.TokenConfig | None = None, **sections: dict[str, Any]
    ) -> ServiceProcess: ...


@pytest.fixture
def service_process_factory(
    token_host: TokenHostHandle, tmp_path: Path
) -> Iterator[ServiceProcessFactory]:
    """Starts ``signer serve`` as its own process and waits until it answers health checks."""
    procs: list[ServiceProcess] = []

    def start(
        token: config_mod.TokenConfig | None = None, **sections: dict[str, Any]
    ) -> ServiceProcess:
        cfg = make_config(tmp_path, token or token_host.token_config(), **sections)
        n = len(procs)
        cfg_path = write_toml(tmp_path / f"signer-{n}.toml", cfg)
        log_path = tmp_path / f"signer-{n}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(SIGNER_BIN), "serve", "--config", str(cfg_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        sp = ServiceProcess(proc, cfg.server.listen, cfg_path, log_path)
        procs.append(sp)
        if not wait_until(lambda: _serving(sp.address) or proc.poll() is not None, 30):
            raise AssertionError(f"service did not start:\n{sp.log()}")
        if proc.poll() is not None:
            raise AssertionError(f"service exited with {proc.returncode}:\n{sp.log()}")
        return sp

    yield start
    for sp in procs:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait()


def _serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def health_status(address: str, service: str = "") -> str:
    """The health service's answer for ``service``, by name (SERVING, NOT_SERVING, ...)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone_soon(pid: int, timeout: float = 15.0) -> bool:
    """Whether ``pid`` exits (or is a zombie) within ``timeout``; kills it if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, 9)
        return False
    return True


def python_for_others() -> list[str]:
    """A Python that another user can run, with this checkout's packages on its path: the
    interpreter itself if everyone may execute it (a system Python), else the system's own of
    the same version (pyenv keeps its interpreters under an owner-only home)."""
    import stat

    def world_runnable(path: Path) -> bool:
        return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))

    candidates = [Path(sys.executable).resolve(), Path("/usr/bin/python3").resolve()]
    for python in candidates:
        if python.exists() and world_runnable(python):
            version = subprocess.run(
                [str(python), "-c", "import sys; print(sys.version_info[:2])"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            if version == str(sys.version_info[:2]):
                return [str(python)]
    pytest.fail(f"no Python {sys.version_info[:2]} that another user may run: {candidates}")


def as_user(user: Any) -> dict[str, Any]:
    """subprocess arguments that run a command as ``user`` (a pwd entry), with this checkout's
    packages importable by :func:`python_for_others`."""
    import site

    path = os.pathsep.join([*site.getsitepackages(), str(REPO)])
    return {
        "env": {"PYTHONPATH": path},
        "user": user.pw_uid,
        "group": user.pw_gid,
        "extra_groups": [],
        "cwd": "/",
    }


def run_as(
    user: Any, script: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -c script args...`` as ``user``."""
    return subprocess.run(
        [*python_for_others(), "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **as_user(user),
    )


@contextlib.contextmanager
def log_lines(logger: str = "", formatter: logging.Formatter | None = None) -> Iterator[list[str]]:
    """Every record ``logger`` (and those below it) emits meanwhile, at any level: its message,
    or the line ``formatter`` makes of it. The service under test runs in this process."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record) if formatter else record.getMessage())

    handler = Capture(level=logging.DEBUG)
    if formatter is not None:
        handler.setFormatter(formatter)
    target = logging.getLogger(logger)
    old = target.level
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        target.removeHandler(handler)
        target.setLevel(old)
