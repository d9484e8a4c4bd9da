"""The compose stack from the images (issue 15): what a platform team deploys, tested as such.

Calls go from the host through the front (nginx, mTLS, its key in the TLS token) to the service
and the token host, all in containers. The tests run in file order on one stack; the ones that
restart or crash a container wait for it to be healthy again before they return.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from signer.client import ClientTLS, SignerClient
from signer.errors import SignerError, Unauthenticated, Unavailable
from tests.containers.conftest import BASE_IMAGE, IMAGES, THROWAWAY, Stack, docker

pytestmark = [pytest.mark.containers, pytest.mark.slow]

KEY = "demo"


def client(stack: Stack, timeout: float = 10.0) -> SignerClient:
    c = stack.clients
    tls = ClientTLS(ca=c / "ca.pem", cert=c / "dev.pem", key=c / "dev.key")
    return SignerClient(stack.front, tls=tls, timeout=timeout)


@pytest.fixture(scope="module")
def signer(stack: Stack) -> Iterator[SignerClient]:
    """A dev client through the front, and the key the tests sign with."""
    with client(stack) as c:
        c.create_key(KEY, "ec-p256", scope="demo")
        yield c


def health(stack: Stack, credentials: grpc.ChannelCredentials) -> str:
    with grpc.secure_channel(stack.front, credentials) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_health_through_the_front_with_mtls(stack: Stack) -> None:
    c = stack.clients
    credentials = grpc.ssl_channel_credentials(
        (c / "ca.pem").read_bytes(), (c / "dev.key").read_bytes(), (c / "dev.pem").read_bytes()
    )
    assert health(stack, credentials) == "SERVING"


def _stranger(tmp_path: Path) -> tuple[bytes, bytes]:
    """A client certificate (CN=dev, as the dev client's) from a CA the front does not trust."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, cert.public_bytes(serialization.Encoding.PEM)


def test_the_front_refuses_a_client_without_a_good_certificate(
    stack: Stack, signer: SignerClient, tmp_path: Path
) -> None:
    ca = (stack.clients / "ca.pem").read_bytes()
    # No certificate: nginx answers UNAUTHENTICATED itself; the service never sees the call.
    assert health(stack, grpc.ssl_channel_credentials(ca)) == "UNAUTHENTICATED"
    with (
        SignerClient(
            stack.front, channel=grpc.secure_channel(stack.front, grpc.ssl_channel_credentials(ca))
        ) as anonymous,
        pytest.raises(Unauthenticated, match="client certificate signed by the configured CA"),
    ):
        anonymous.sign(KEY, message=b"no certificate")
    # A certificate the front's CA did not sign, with the dev client's subject: refused too.
    key, cert = _stranger(tmp_path)
    assert health(stack, grpc.ssl_channel_credentials(ca, key, cert)) in {
        "UNAUTHENTICATED",
        "UNAVAILABLE",  # the handshake itself refused
    }
    # And the right one still works.
    assert signer.sign(KEY, message=b"with the dev certificate").signature


def test_sign_verify_round_trip_with_openssl(
    stack: Stack, signer: SignerClient, tmp_path: Path
) -> None:
    msg, sig, pub = tmp_path / "msg", tmp_path / "sig.der", tmp_path / "pub.pem"
    msg.write_bytes(b"through the front, in containers")
    sig.write_bytes(signer.sign(KEY, message=msg.read_bytes()).signature)
    pub.write_text(signer.public_key(KEY).pem)
    done = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(msg)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout.strip() == "Verified OK", done


def test_the_issuer_is_served_to_a_standard_verifier(stack: Stack, signer: SignerClient) -> None:
    """The issuers' port (no client certificate): the service's published files through the
    volume issuers, read by PyJWT's PyJWKClient from the issuer's URL alone. (The issuer's own
    key: an issuer's keys sign JWTs only, so not the key the other tests sign with.)"""
    ctx = ssl.create_default_context(cafile=str(stack.clients / "ca.pem"))
    issuer = f"https://localhost:{stack.issuers.rpartition(':')[2]}/tokens"
    signer.create_key("issuer-tokens", "ec-p256", scope="tokens")
    token = signer.sign_jwt(
        "issuer-tokens", {"aud": "portal", "exp": int(time.time()) + 300}, set_issuer=True
    )

    def discovery() -> dict[str, str] | None:
        try:
            with urllib.request.urlopen(
                f"{issuer}/.well-known/openid-configuration", context=ctx, timeout=5
            ) as reply:
                meta: dict[str, str] = json.load(reply)
        except OSError:
            return None
        # Written after the JWKS: once it names the key's algorithm, the JWKS holds the key.
        return meta if meta["id_token_signing_alg_values_supported"] else None

    deadline = time.monotonic() + 30
    while (meta := discovery()) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert meta is not None
    assert meta["issuer"] == issuer
    keys = jwt.PyJWKClient(meta["jwks_uri"], ssl_context=ctx)
    claims = jwt.decode(
        token,
        keys.get_signing_key_from_jwt(token).key,
        algorithms=["ES256"],
        audience="portal",
        issuer=issuer,
    )
    assert claims["iss"] == issuer


def _query(stack: Stack, expr: str) -> list[dict[str, object]]:
    url = f"http://{stack.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as reply:  # the stack's own, on loopback
        data = json.load(reply)
    assert data["status"] == "success", data
    result = data["data"]["result"]
    assert isinstance(result, list)
    return result


def _value(stack: Stack, expr: str) -> float | None:
    result = _query(stack, expr)
    return float(str(result[0]["value"][1])) if result else None  # type: ignore[index]


def _scraped(stack: Stack, series: dict[str, float], within: float = 40.0) -> dict[str, float]:
    """Polls Prometheus until every series in ``series`` is at least its value (a scrape every
    5 s; the first one only ~5 s after start); returns what it saw last."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + within
    while True:
        seen = {expr: _value(stack, expr) or 0.0 for expr in series}
        if all(seen[expr] >= want for expr, want in series.items()):
            return seen
        if time.monotonic() > deadline:
            return seen
        time.sleep(1)


def test_metrics_scraped_by_the_stacks_prometheus(stack: Stack, signer: SignerClient) -> None:
    """The stack's Prometheus scrapes the service's metrics listener; after signs through the
    front, its query API has the series of issue 15 with the values the calls made."""
    before = _value(stack, 'sum(signer_rpc_calls_total{rpc="Sign",code="OK",caller="mtls"})') or 0
    signs = 7
    for i in range(signs):
        signer.sign(KEY, message=f"metrics {i}".encode())
    want = {
        'up{job="prometheus"}': 1,
        'up{job="signer"}': 1,
        'sum(signer_rpc_calls_total{rpc="Sign",code="OK",caller="mtls"})': before + signs,
        'sum(signer_sign_duration_seconds_count{rpc="Sign"})': before + signs,
        'signer_token_up{connection="signing"}': 1,
        "signer_audit_records_total": before + signs,
        'sum(signer_rpc_calls_total{rpc="CreateKey",code="OK",caller="mtls"})': 1,
    }
    seen = _scraped(stack, want)
    print("scraped:", seen)
    assert all(seen[expr] >= value for expr, value in want.items()), (want, seen)
    # Labels from fixed sets only: no key name, caller identity or scope in any series.
    names = _query(stack, '{__name__=~"signer_.+"}')
    labels = {k for series in names for k in series["metric"]}  # type: ignore[attr-defined]
    assert labels <= {
        "__name__",
        "job",
        "instance",
        "rpc",
        "code",
        "caller",
        "connection",
        "result",
        "le",
    }
    assert not any(KEY in json.dumps(series["metric"]) for series in names)


def test_token_host_restart_under_load(stack: Stack, signer: SignerClient) -> None:
    """Calls fail UNAVAILABLE while the token host restarts, then succeed again; the service's
    container is not restarted (it reconnects); the front restarts itself (its watchdog)."""
    started = stack.state("service", ".State.StartedAt")
    results: list[tuple[float, str]] = []
    stop = threading.Event()

    def load() -> None:
        with client(stack, timeout=5) as c:
            while not stop.is_set():
                try:
                    c.sign(KEY, message=b"under load")
                    results.append((time.monotonic(), "OK"))
                except SignerError as exc:
                    results.append((time.monotonic(), type(exc).__name__))
                    time.sleep(0.05)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1.5)
        t0 = time.monotonic()
        docker("restart", "-t", "5", stack.container("token-host"))
        deadline = t0 + 90
        while time.monotonic() < deadline:
            after = [s for ts, s in results if ts > t0]
            if "Unavailable" in after and after[-3:] == ["OK"] * 3:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join()
    after = [s for ts, s in results if ts > t0]
    failed = [ts for ts, s in results if ts > t0 and s != "OK"]
    summary = {s: after.count(s) for s in set(after)}
    # The load's HTTP/2 connection was made before the restart; a new one needs a new handshake,
    # signed with the front's key in the restarted TLS token (libp11 keeps the dead token
    # host's session: the front's watchdog restarts it).
    c = stack.clients
    fresh = time.monotonic()
    while (
        status := health(
            stack,
            grpc.ssl_channel_credentials(
                (c / "ca.pem").read_bytes(),
                (c / "dev.key").read_bytes(),
                (c / "dev.pem").read_bytes(),
            ),
        )
    ) != "SERVING" and time.monotonic() < fresh + 60:
        time.sleep(0.5)
    down = failed[-1] - failed[0] if failed else 0.0
    print(
        f"token host restart: {summary}; calls failed for {down:.1f} s; a new mTLS connection "
        f"{status} {time.monotonic() - fresh:.1f} s after; front restarts: "
        f"{stack.state('front', '.RestartCount')} (watchdog)"
    )
    assert status == "SERVING"
    assert Unavailable.__name__ in after, summary
    assert after[-1] == "OK", summary
    assert set(after) <= {"OK", Unavailable.__name__}, summary
    assert stack.state("service", ".State.StartedAt") == started
    stack.wait_healthy()


def _core_pattern() -> str:
    return Path("/proc/sys/kernel/core_pattern").read_text().strip()


def _take_core(stack: Stack, out: Path) -> Path | None:
    """Moves the core in the service's cores volume (its cwd, /var/crash) to ``out``."""
    take = 'set -- /c/core*; [ -s "$1" ] && cp --sparse=always "$1" /out/core && rm -f /c/core*'
    volumes = ["-v", f"{stack.volume('service-cores')}:/c", "-v", f"{out}:/out"]
    done = subprocess.run(
        [*THROWAWAY, *volumes, BASE_IMAGE, "sh", "-c", take],
        capture_output=True,
        check=False,
        timeout=120,
    )
    return out / "core" if done.returncode == 0 else None


def _wait_exited(stack: Stack, started: str, within: float = 60.0) -> None:
    """Until the service container has restarted: its process is gone, its core complete."""
    deadline = time.monotonic() + within
    while stack.state("service", ".State.StartedAt") == started:
        assert time.monotonic() < deadline, "the service's container did not restart"
        time.sleep(0.2)


def test_service_sigsegv_core_is_scanned_and_clean(
    stack: Stack, signer: SignerClient, tmp_path: Path
) -> None:
    """The service crashed with SIGSEGV: its core is scanned for the service's PIN with the crash
    harness's scanner; a positive control (a process in the same container holding that PIN,
    crashed the same way) is caught, and a marker (a payload the service just signed) proves the
    core holds the service's memory; the service's own core has zero findings.

    Assumes the host's core_pattern writes cores into the crashing process's working directory
    (``core``, as on these machines, or ``core.%p``): the service's is the service-cores volume.
    With a pipe (systemd-coredump, the dump gate) the core goes to the host's collector instead;
    this test asserts the pattern and does not change it (tests/integration/test_dump_gate.py
    changes it while it runs, and restores it: the two must not run at the same time).
    """
    from signer.scan import Scanner, load_secrets

    pattern = _core_pattern()
    needs = "cores written to the crashing process's working directory ('core', 'core.%p')"
    assert not pattern.startswith("|"), f"core_pattern is {pattern!r}: this test needs {needs}"
    assert "/" not in pattern, f"core_pattern is {pattern!r}: this test needs {needs}"
    svc = stack.container("service")
    pin = tmp_path / "user.pin"
    pin.write_bytes(stack.read_volume("service-pin", "user.pin"))
    pin.chmod(0o600)
    scanner = Scanner(load_secrets([pin]))
    try:
        # Positive control: a process of the service's image and user, holding the PIN.
        control_dir = tmp_path / "control"
        control_dir.mkdir()
        docker(
            "exec",
            "-w",
            "/var/crash",
            svc,
            "sh",
            "-c",
            'ulimit -c unlimited; exec python3 -c "import os, signal; '
            "pin = open('/run/signer/pins/service/user.pin', 'rb').read(); "
            'os.kill(os.getpid(), signal.SIGSEGV)"',
            check=False,
        )
        control_core = _take_core(stack, control_dir)
        assert control_core is not None, "the control wrote no core: the collector lost it"
        control = scanner.scan(control_core)
        assert any(f.secret_id == "user.pin" for f in control.findings), control.to_dict()

        # The service itself, after signing the marker.
        marker = f"marker-{time.time_ns()}-signed-in-the-container".encode()
        signer.sign(KEY, message=marker)
        started = stack.state("service", ".State.StartedAt")
        # PID 1 is the init (tini, `init: true`): the service is its child. `docker kill -s SEGV`
        # would signal the init, which ignores it.
        pid = docker("exec", svc, "cat", "/proc/1/task/1/children").stdout.split()[0]
        docker("exec", svc, "sh", "-c", f"kill -SEGV {pid}")  # the shell's kill: no procps
        _wait_exited(stack, started)
        core_dir = tmp_path / "service"
        core_dir.mkdir()
        core = _take_core(stack, core_dir)
        assert core is not None, f"the service wrote no core (core_pattern {_core_pattern()!r})"
        result = scanner.scan(core, markers={"payload": marker})
        print(
            f"service core {core.stat().st_size >> 20} MiB: {len(result.findings)} findings, "
            f"markers {result.markers_found}; control {len(control.findings)} findings"
        )
        assert result.markers_found.get("payload", 0) > 0, result.to_dict()
        assert result.findings == [], result.to_dict()
    finally:
        for f in tmp_path.rglob("core"):
            f.unlink()
        pin.unlink()
    stack.wait_healthy()


def _core_limits(stack: Stack, service: str) -> dict[str, str]:
    """Every process in SERVICE's container ("PID NAME"): its 'Max core file size' line."""
    script = (
        "for d in /proc/[0-9]*; do [ -r $d/limits ] || continue; "
        'echo "${d#/proc/} $(cat $d/comm): $(grep "Max core file size" $d/limits)"; done'
    )
    out = docker("exec", stack.container(service), "sh", "-c", script).stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


@pytest.mark.parametrize("service", ["token-host", "front"])
def test_token_host_and_front_write_no_core(
    stack: Stack, signer: SignerClient, service: str
) -> None:
    """RLIMIT_CORE 0, soft and hard, for every process of the token host (p11-kit server and the
    p11-kit-remote of each connection: SoftHSM2 and the tokens' keys are in their memory) and
    of the front (the TLS token's PIN and TLS session keys)."""
    signer.sign(KEY, message=b"a connection to each token")
    limits = _core_limits(stack, service)
    assert limits, service
    if service == "token-host":
        assert {"p11-kit-server", "p11-kit-remote"} <= {p.split()[1] for p in limits}, limits
    else:
        assert "nginx" in {p.split()[1] for p in limits}, limits
    for name, line in limits.items():
        assert line.split()[4:6] == ["0", "0"], (name, line)


def test_containers_are_non_root_read_only_and_capability_free(stack: Stack) -> None:
    for service in ("token-host", "service", "front", "prometheus"):
        info = stack.inspect(service)
        config, host = info["Config"], info["HostConfig"]
        assert isinstance(config, dict)
        assert isinstance(host, dict)
        assert config["User"] not in ("", "0", "root", "0:0"), service
        assert host["ReadonlyRootfs"] is True, service
        assert host["CapDrop"] == ["ALL"], service
        assert not host["CapAdd"], service
        assert "no-new-privileges:true" in host["SecurityOpt"], service


def _pins(stack: Stack) -> dict[str, bytes]:
    return {
        "user.pin": stack.read_volume("service-pin", "user.pin"),
        "tls.pin": stack.read_volume("front-pin", "tls.pin"),
        "so.pin": stack.read_volume("hsm-data", "so.pin"),
        "tls-so.pin": stack.read_volume("hsm-data", "tls-so.pin"),
    }


def _search_saved(image: str, needles: dict[str, bytes]) -> dict[str, int]:
    """How often each needle occurs in `docker save IMAGE` (every layer, uncompressed tars, and
    the image's configuration and history)."""
    counts = dict.fromkeys(needles, 0)
    overlap = max(len(n) for n in needles.values()) - 1
    with subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        tail = b""
        while chunk := proc.stdout.read(1 << 22):
            window = tail + chunk
            for name, needle in needles.items():
                # Occurrences that end inside this chunk (the tail was searched before).
                start = max(0, len(tail) - len(needle) + 1)
                counts[name] += window.count(needle, start)
            tail = window[-overlap:] if overlap else b""
    assert proc.returncode == 0, image
    return counts


def test_no_pin_in_any_image_layer_or_environment(stack: Stack) -> None:
    """The stack's four PINs (made when it came up) are in no layer, configuration or history of
    any image, nor in any container's environment. The search is shown to work on the same
    stream: a string known to be in an image's layer is found."""
    pins = _pins(stack)
    assert all(len(p) >= 24 and b"\n" not in p for p in pins.values()), "PIN files: no newline"
    control = b"directories.tokendir = /var/lib/signer/hsm/tokens"  # softhsm/softhsm2.conf
    for image in [*IMAGES, BASE_IMAGE]:
        counts = _search_saved(image, {**pins, "control": control})
        found = {name: n for name, n in counts.items() if n and name != "control"}
        assert not found, f"{image}: {found}"
        if image.startswith("signer-token-host"):
            assert counts["control"] > 0, "the search did not find a string in a layer"
    for service in ("token-host", "service", "front", "prometheus"):
        config = stack.inspect(service)["Config"]
        assert isinstance(config, dict)
        env = "\n".join(config["Env"] or []).encode()
        assert not [name for name, pin in pins.items() if pin in env], service
    assert not any(
        pin in os.environ.get(name, "").encode() for name in os.environ for pin in pins.values()
    )
