"""Fixtures for tests that talk to the token host directly, besides the service."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
import pytest

from signer._internal import hsm
from signer._internal.config import P11KIT_CLIENT_MODULE, SOFTHSM_MODULE, TokenConfig
from signer._internal.pki import DevCA
from tests.conftest import (
    SIGNER_BIN,
    RunningService,
    ServiceFactory,
    TokenHostHandle,
    free_port,
)
from tests.integration.fronts import Deployment, deploy, dev_pki


@pytest.fixture
def own_session(token_host: TokenHostHandle, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A logged-in session of the test's own through p11-kit-client.so, independent of the service.

    A fresh ``_pkcs11.lib`` object is a fresh p11-kit client instance (its own connection, its
    own p11-kit-remote), so it neither shares nor disturbs the connection of a service running in
    this process.
    """
    monkeypatch.setenv("P11_KIT_SERVER_ADDRESS", token_host.paths.server_address)
    lib = pkcs11._pkcs11.lib(P11KIT_CLIENT_MODULE)
    try:
        token = lib.get_token(token_label=hsm.DEFAULT_LABEL)
        pin = token_host.paths.user_pin.read_bytes().strip().decode("ascii")
        session = token.open(user_pin=pin, rw=True)
        try:
            yield session
        finally:
            session.close()
    finally:
        lib.finalize()


@dataclass
class SignerRun:
    """A running ``signer run``: its state directory, its mTLS port, its metrics listener,
    what it has printed."""

    root: Path
    port: int
    proc: subprocess.Popen[str]
    metrics: str  # its metrics listener, host:port
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def signer_run() -> Iterator[SignerRun]:
    """``signer run`` until the test ends. Its state sits where others may pass through to it
    (so denials come from var/'s own modes, not from a closed parent)."""
    base = Path(tempfile.mkdtemp(prefix="signer-run-"))
    base.chmod(0o711)
    root, port = base / "var", free_port()
    metrics = f"127.0.0.1:{free_port()}"  # not make run's 9464, which a developer may be using
    issuers = f"127.0.0.1:{free_port()}"  # nor its 8443
    proc = subprocess.Popen(
        [
            str(SIGNER_BIN),
            "run",
            "--dir",
            str(root),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            metrics,
            "--issuers-listen",
            issuers,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = SignerRun(root, port, proc, metrics)
    ready = threading.Event()

    def watch() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            run.lines.append(line)
            if line.startswith("signer serving local callers"):
                ready.set()
        ready.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert ready.wait(120)
        assert proc.poll() is None, run.output
        yield run
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        assert proc.stdout is not None
        proc.stdout.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def inprocess_service(
    service_factory: ServiceFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> RunningService:
    """The service with SoftHSM2 loaded in its own process, not behind p11-kit (Debian's p11-kit
    does not pass CKM_EDDSA through): for Ed25519 alone (tests marked ``inprocess``)."""
    paths = hsm.init(tmp_path / "hsm-inprocess")
    # SoftHSM2 reads its configuration from the environment in C_Initialize.
    monkeypatch.setenv("SOFTHSM2_CONF", str(paths.conf))
    token = TokenConfig(
        module=SOFTHSM_MODULE, uri="pkcs11:token=signer", pin_file=str(paths.user_pin), sessions=8
    )
    assert not token.concurrent, "an in-process SoftHSM2 must get a serialised pool"
    return service_factory(token=token)


# Replicas behind the front (issue 16): their fixtures live in tests/integration/replicas.py.
from tests.integration.replicas import replica_pki, replica_set  # noqa: E402, F401


@pytest.fixture(scope="module")
def pki(token_host: TokenHostHandle, tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    """A development CA, the front's certificate over the TLS token's key, a client's."""
    return dev_pki(token_host, tmp_path_factory.mktemp("tls"))


@pytest.fixture
def deployment(
    service_factory: ServiceFactory, token_host: TokenHostHandle, pki: DevCA, tmp_path: Path
) -> Iterator[Deployment]:
    """The production shape: service on a Unix socket, nginx with mTLS in front of it."""
    with deploy(service_factory, token_host, pki, tmp_path) as d:
        yield d
