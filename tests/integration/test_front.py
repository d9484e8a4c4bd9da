"""The mTLS front: real nginx, its TLS key in the TLS token, proxying to the service's Unix socket.

Callers here use real TLS 1.3 with client certificates from a development CA; the endpoint's
private key was generated in the token (``signer hsm init``) and nginx signs every handshake
through libp11 and p11-kit-client.so.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, Protocol

import grpc
import pkcs11
import pytest
from cryptography import x509
from pkcs11 import Attribute, ObjectClass

from signer._internal import config as config_mod
from signer._internal import hsm
from signer._internal.front import ISSUER_HEADER, SERIAL_HEADER, SUBJECT_HEADER, Front
from signer._internal.pki import DevCA
from signer.client import ClientTLS, SignerClient
from signer.errors import PermissionDenied, SignerError, Unauthenticated, Unavailable
from tests.conftest import (
    SIGNER_BIN,
    ServiceFactory,
    TokenHostHandle,
    UniqueName,
    gone_soon,
    wait_until,
)
from tests.integration.fronts import Deployment, front_config

pytestmark = pytest.mark.integration


def test_sign_over_mtls_and_verify_with_openssl(
    deployment: Deployment, unique_name: UniqueName, tmp_path: Path
) -> None:
    name = unique_name()
    with deployment.client() as c:
        c.create_key(name, "ec-p256")
        sig = c.sign(name, message=b"over mTLS")
        assert c.verify(name, sig.signature, message=b"over mTLS")
        (tmp_path / "pub.pem").write_text(c.public_key(name).pem)
    (tmp_path / "msg").write_bytes(b"over mTLS")
    (tmp_path / "sig").write_bytes(sig.signature)
    done = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig", "msg"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_the_endpoint_presents_the_certificate_over_the_token_key(deployment: Deployment) -> None:
    """openssl s_client completes a TLS 1.3 handshake whose CertificateVerify was signed in the
    token: the certificate is over the public half of the token's key, so nothing else could."""
    cert, key = deployment.pki.client_files("payments")
    # Bytes, not text: after the handshake nginx's HTTP/2 preface arrives and s_client prints
    # it raw. stdin stays open until the handshake is reported: an immediate EOF can end
    # s_client before it prints the session on a busy machine.
    proc = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-connect",
            deployment.address,
            "-tls1_3",
            "-alpn",
            "h2",
            "-CAfile",
            str(deployment.pki.cert),
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-verify_return_error",
            "-showcerts",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    out = ""
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        out += line
        if line.strip().startswith("Verify return code"):
            break
    proc.communicate(timeout=30)
    assert "Verify return code: 0 (ok)" in out, out
    assert "ALPN protocol: h2" in out
    pem = out.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END", 1)[0]
    served = x509.load_pem_x509_certificate(
        f"-----BEGIN CERTIFICATE-----{pem}-----END CERTIFICATE-----\n".encode()
    )
    token_public = deployment.pki.server_cert.read_bytes()
    assert served == x509.load_pem_x509_certificate(token_public)


def test_no_client_certificate_is_unauthenticated(deployment: Deployment) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=deployment.pki.cert.read_bytes())
    channel = grpc.secure_channel(deployment.address, creds)
    with (
        SignerClient(channel=channel, timeout=10) as c,
        pytest.raises(Unauthenticated, match="a client certificate signed by the configured"),
    ):
        c.list_keys()


def test_a_certificate_from_another_ca_is_unauthenticated(
    deployment: Deployment, tmp_path: Path
) -> None:
    other = DevCA.ensure(tmp_path / "other-ca")
    cert, key = other.issue_client("payments", "acme")  # same subject, wrong issuer
    tls = ClientTLS(deployment.pki.cert, cert, key)
    with SignerClient(deployment.address, tls=tls, timeout=10) as c, pytest.raises(Unauthenticated):
        c.list_keys()


def test_a_client_that_does_not_trust_the_endpoint_does_not_connect(
    deployment: Deployment, tmp_path: Path
) -> None:
    other = DevCA.ensure(tmp_path / "other-ca")
    cert, key = deployment.pki.client_files("payments")
    tls = ClientTLS(other.cert, cert, key)
    with (
        SignerClient(deployment.address, tls=tls, timeout=5) as c,
        pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        c.list_keys()


# --- what the service is told about the caller -------------------------------------------------


class _Echo(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped (Any) to mypy
    """Answers every call with the request metadata it received, as JSON."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
            return json.dumps(dict(context.invocation_metadata())).encode()

        return grpc.unary_unary_rpc_method_handler(echo)


class EchoFront(Protocol):
    """The ``echo_front`` fixture: a call through the front, with these headers, to a service
    that answers with the headers it received."""

    def __call__(self, metadata: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]: ...


@pytest.fixture
def echo_front(token_host: TokenHostHandle, pki: DevCA, tmp_path: Path) -> Iterator[EchoFront]:
    socket = tmp_path / "echo.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((_Echo(),))
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    cfg = config_mod.Config(front=front_config(token_host, pki, socket, tmp_path / "front"))
    front = Front(cfg)
    front.start()

    def call(metadata: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
        cert, key = pki.client_files("payments")
        creds = ClientTLS(pki.cert, cert, key).credentials()
        with grpc.secure_channel(cfg.front.listen, creds) as ch:
            rpc = ch.unary_unary("/echo.Echo/Metadata")
            out: dict[str, Any] = json.loads(rpc(b"", metadata=metadata, timeout=10))
            return out

    try:
        yield call
    finally:
        front.stop()
        server.stop(0)


def test_the_front_names_the_verified_caller(echo_front: EchoFront, pki: DevCA) -> None:
    seen = echo_front()
    cert = x509.load_pem_x509_certificate(pki.client_files("payments")[0].read_bytes())
    assert seen[SUBJECT_HEADER] == "O=acme,CN=payments"
    assert seen[ISSUER_HEADER] == "CN=signer development CA"
    assert int(seen[SERIAL_HEADER], 16) == cert.serial_number


def test_identity_headers_sent_by_a_client_are_replaced(echo_front: EchoFront) -> None:
    forged = ((SUBJECT_HEADER, "CN=admin"), (ISSUER_HEADER, "CN=anyone"), (SERIAL_HEADER, "01"))
    seen = echo_front(forged)
    assert seen[SUBJECT_HEADER] == "O=acme,CN=payments"
    assert seen[ISSUER_HEADER] == "CN=signer development CA"
    assert seen[SERIAL_HEADER] != "01"


# --- where the TLS key is, and is not -----------------------------------------------------------


def _proc(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


def test_the_front_holds_no_key_file_and_no_pin_in_argv_or_environment(
    deployment: Deployment, token_host: TokenHostHandle
) -> None:
    pid = deployment.front.pid
    assert pid is not None
    pin = token_host.paths.tls_pin.read_bytes().strip()
    maps = _proc(pid, "maps").decode()
    assert "p11-kit-client.so" in maps
    assert "libsofthsm2" not in maps, "the TLS front must not load the token itself"
    assert pin not in _proc(pid, "cmdline")
    assert pin not in _proc(pid, "environ")
    conf = (Path(deployment.front.workdir) / "nginx.conf").read_text()
    assert pin.decode() not in conf
    assert "PRIVATE KEY" not in conf
    limits = _proc(pid, "limits").decode()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core


def test_the_tls_key_was_generated_in_the_token_and_cannot_leave_it(
    token_host: TokenHostHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P11_KIT_SERVER_ADDRESS", token_host.paths.tls_server_address)
    lib = pkcs11._pkcs11.lib(config_mod.P11KIT_CLIENT_MODULE)
    try:
        token = lib.get_token(token_label=hsm.TLS_LABEL)
        pin = token_host.paths.tls_pin.read_bytes().strip().decode("ascii")
        with token.open(user_pin=pin) as session:
            (key,) = session.get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: hsm.TLS_KEY_LABEL}
            )
            assert key[Attribute.SENSITIVE]
            assert key[Attribute.ALWAYS_SENSITIVE]
            assert not key[Attribute.EXTRACTABLE]
            assert key[Attribute.NEVER_EXTRACTABLE]
            assert key[Attribute.LOCAL], "generated in the token, not imported"
            # The TLS token holds the TLS key pair and nothing else: no signing key.
            labels = {o[Attribute.LABEL] for o in session.get_objects()}
            assert labels == {hsm.TLS_KEY_LABEL}
    finally:
        lib.finalize()


def test_the_signing_token_socket_does_not_offer_the_tls_key(own_session: pkcs11.Session) -> None:
    found = list(own_session.get_objects({Attribute.LABEL: hsm.TLS_KEY_LABEL}))
    assert found == []


def test_the_service_sockets_are_created_with_their_modes(deployment: Deployment) -> None:
    front = Path(deployment.front.cfg.front.upstream.removeprefix("unix:"))
    assert front.stat().st_mode & 0o777 == 0o600
    local = Path(deployment.service.address.removeprefix("unix:"))
    assert local.stat().st_mode & 0o777 == 0o660


def test_the_front_socket_is_for_the_front_only(deployment: Deployment) -> None:
    """The identity headers are believed on the front's socket and nowhere else, which is why
    only the front's user may reach it (0600 above). A call there without them is refused."""
    upstream = deployment.front.cfg.front.upstream
    with SignerClient(upstream, timeout=10) as c, pytest.raises(Unauthenticated):
        c.list_keys()


def test_the_service_knows_the_caller_by_certificate(
    deployment: Deployment, unique_name: UniqueName
) -> None:
    """The policy grants the certificate's subject, not the uid nginx runs as: a call through
    the front is the certificate's (so the audit log says), and a uid calling the service
    itself is refused."""
    name = unique_name()
    with deployment.client() as c:
        c.create_key(name, "ec-p256", scope="consumer")
    audit = deployment.service.server.cfg.audit.path

    def callers() -> list[str]:
        with sqlite3.connect(audit) as db:
            rows = db.execute(
                "SELECT caller FROM records WHERE operation = 'CreateKey' AND key = ?", (name,)
            ).fetchall()
        return [str(caller) for (caller,) in rows]

    assert wait_until(lambda: callers() != [], 10)
    [caller] = callers()
    assert caller.startswith("x509:O=acme,CN=payments (issuer "), caller
    # The same service, called as a uid (this process's own: no grant names any uid).
    direct = SignerClient(deployment.service.address, timeout=10)
    with direct, pytest.raises(PermissionDenied):
        direct.create_key(unique_name(), "ec-p256", scope="consumer")


def test_the_front_dies_with_whoever_started_it(
    token_host: TokenHostHandle, pki: DevCA, tmp_path: Path
) -> None:
    """Like the token host: a killed run leaves no nginx holding the TLS token's PIN."""
    socket = tmp_path / "nobody.sock"
    front = front_config(token_host, pki, socket, tmp_path / "front")
    toml = tmp_path / "signer.toml"
    toml.write_text(config_mod.dump(config_mod.Config(front=front)))
    script = (
        "import os, sys\n"
        "from signer._internal import config\n"
        "from signer._internal.front import Front\n"
        "front = Front(config.load(sys.argv[1]))\n"
        "front.start()\n"
        "print(front.pid, flush=True)\n"
        "os._exit(0)\n"  # dies without stopping it
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(toml)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert gone_soon(int(out.stdout.split()[-1])), "nginx outlived the process that started it"


def test_signer_front_serve_runs_until_sigterm(
    deployment_parts: tuple[Path, config_mod.Config, DevCA], tmp_path: Path
) -> None:
    """`signer front serve --config` in the foreground, as a unit file would run it."""
    toml, cfg, ca = deployment_parts
    proc = subprocess.Popen(
        [str(SIGNER_BIN), "front", "serve", "--config", str(toml)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        cert, key = ca.client_files("payments")
        tls = ClientTLS(ca.cert, cert, key)

        def answers() -> bool:
            try:
                with SignerClient(cfg.front.listen, tls=tls, timeout=2) as c:
                    c.list_keys()
                return True
            except PermissionDenied:
                return True  # the service answered through the front (payments has no grant)
            except SignerError:
                return proc.poll() is not None

        assert wait_until(answers, 30)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "TLS front serving mTLS on" in output


@pytest.fixture
def deployment_parts(
    service_factory: ServiceFactory, token_host: TokenHostHandle, pki: DevCA, tmp_path: Path
) -> tuple[Path, config_mod.Config, DevCA]:
    socket = tmp_path / "run" / "front.sock"
    service_factory(server={"front_socket": str(socket)})
    front = front_config(token_host, pki, socket, tmp_path / "front")
    toml = tmp_path / "signer.toml"
    toml.write_text(config_mod.dump(config_mod.Config(front=front)))
    return toml, config_mod.Config(front=front), pki
