"""Scenario "transport": what the mTLS design, authorisation and the audit log cost, against
the same service reached directly (and, for the last two, run without them).

One service process (``signer serve``, ec-p256 key, the real token host) behind two ways in:

* ``unix``: its Unix socket, no TLS (what local callers use);
* ``mtls-front``: TLS 1.3 with client certificates, terminated by nginx whose key is in the TLS
  token, then HTTP/2 over the Unix socket to the service (what remote callers use).

Measured with the load generator of every signing scenario (:mod:`benchmarks.loadgen`; per
client): Sign latency at concurrency 1 (p50/p99 over ``seconds`` of calls, median of ``runs``),
throughput at concurrency 16, and new connections per second (a fresh mTLS channel and one call
each). For the handshake cost of keeping the TLS key in the token, the same nginx is also run
with an ordinary key file (``mtls-front-pem``): a handshake then signs in nginx's memory. For the
cost of authorisation and auditing, a second service on the same machine runs without them
(``unix-bare``, :mod:`benchmarks.bare_server`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.context import Context
from benchmarks.loadgen import run_load
from benchmarks.procs import answers, started, write_service_config
from benchmarks.report import ScenarioResult, Table, fmt_ratio
from signer._internal import config as config_mod
from signer._internal import hsm
from signer._internal.front import Front, front_config
from signer._internal.pki import DevCA
from signer._internal.policy import grant_everything
from signer.client import ClientTLS, SignerClient

NAME = "transport"
KEY = "bench-transport"
CLIENT = "bench"
MESSAGE = b"x" * 64


@dataclasses.dataclass(frozen=True)
class Route:
    name: str
    address: str
    tls: ClientTLS | None = None

    def client(self) -> SignerClient:
        return SignerClient(self.address, tls=self.tls, timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PemFront(Front):
    """The same nginx configuration with the key in a file: the ordinary way, for comparison."""

    def __init__(self, cfg: config_mod.Config, key_file: Path) -> None:
        super().__init__(cfg)
        self.key_file = key_file

    def render(self) -> str:
        text = super().render()
        start = text.index("ssl_certificate_key")
        end = text.index("\n", start)
        return f"{text[:start]}ssl_certificate_key {self.key_file};{text[end:]}"


def latency(route: Route, seconds: float) -> dict[str, float]:
    """Sign back to back from one caller (the load generator every signing scenario uses)."""
    load = run_load(route.address, KEY, 1, seconds, tls=route.tls, warmup=0.5)
    return {"p50_ms": load.percentile(0.5), "p99_ms": load.percentile(0.99)}


def throughput(route: Route, clients: int, seconds: float) -> float:
    load = run_load(route.address, KEY, clients, seconds, tls=route.tls, warmup=0.5)
    if load.errors:
        raise RuntimeError(f"{route.name}: {load.errors} calls failed")
    return load.per_second


def connections(route: Route, count: int) -> float:
    """New mTLS connections per second: a fresh channel, one GetKey, closed."""
    assert route.tls is not None
    creds = route.tls.credentials()
    began = time.perf_counter()
    for _ in range(count):
        with SignerClient(channel=grpc.secure_channel(route.address, creds), timeout=30) as c:
            c.get_key(KEY)
    return count / (time.perf_counter() - began)


@contextlib.contextmanager
def deployment(work: Path, bare: bool = False) -> Iterator[tuple[list[Route], Route]]:
    """Token host, service process on a Unix socket, the token-key front and a PEM-key front.
    ``bare``: the service without authorisation and audit log (what they cost)."""
    # Absolute: nginx resolves relative paths against its own prefix, not ours.
    root = work.absolute() / ("transport-bare" if bare else "transport")
    paths = hsm.init(root / "hsm")
    host = hsm.TokenHost(paths.root)
    host.start()
    ca = DevCA.ensure(root / "tls")
    ca.issue_server(paths.tls_public_key.read_bytes(), ["localhost", "127.0.0.1"])
    cert, key = ca.issue_client(CLIENT)
    tls = ClientTLS(ca.cert, cert, key)
    # The comparison front: an ordinary key file, and a certificate over it from the same CA.
    pem_dir = root / "pem"
    pem_dir.mkdir(mode=0o700)
    soft = ec.generate_private_key(ec.SECP256R1())
    key_file = pem_dir / "server.key"
    key_file.write_bytes(
        soft.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_file, 0o600)
    pem_ca = DevCA.ensure(pem_dir)
    pem_cert = pem_ca.issue_server(
        soft.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        ["localhost", "127.0.0.1"],
    )

    socket_path = root / "run" / "signer.sock"
    front_socket = root / "run" / "front.sock"
    policy = root / "policy.toml"
    policy.write_text(grant_everything([f"uid:{os.getuid()}", f"x509:CN={CLIENT}"]))
    toml = write_service_config(
        root / "signer.toml",
        listen=socket_path,
        paths=paths,
        policy=policy,
        store=root / "signer.db",
        audit=root / "audit.db",
        front_socket=front_socket,
    )
    command = (
        ["-m", "benchmarks.bare_server", "--config", str(toml)]
        if bare
        else ["-m", "signer", "serve", "--config", str(toml), "--log-level", "warning"]
    )

    def front_cfg(name: str, certificate: Path) -> config_mod.Config:
        return config_mod.Config(
            front=front_config(
                paths,
                ca,
                listen=f"127.0.0.1:{_free_port()}",
                upstream=front_socket,
                workdir=root / name,
                certificate=certificate,
            )
        )

    token_front = Front(front_cfg("front", ca.server_cert))
    pem_front = PemFront(front_cfg("front-pem", pem_cert), key_file)
    unix = Route("unix", f"unix:{socket_path}")
    try:
        with started([sys.executable, *command], answers(unix.address)):
            with unix.client() as c:
                c.create_key(KEY, "ec-p256")
            try:
                token_front.start()
                pem_front.start()
                routes = [unix, Route("mtls-front", token_front.cfg.front.listen, tls)]
                pem_tls = ClientTLS(pem_ca.cert, cert, key)
                # The PEM front trusts client certificates from the main CA too.
                yield routes, Route("mtls-front-pem", pem_front.cfg.front.listen, pem_tls)
            finally:
                pem_front.stop()
                token_front.stop()
    finally:
        host.stop()


def run(ctx: Context) -> ScenarioResult:
    seconds, handshakes, runs = 5.0, 200, 3
    data: dict[str, Any] = {"seconds": seconds, "handshakes": handshakes}
    results: dict[str, dict[str, list[float]]] = {}

    def record(route: str, metric: str, value: float) -> None:
        results.setdefault(route, {}).setdefault(metric, []).append(value)

    with (
        deployment(ctx.work) as (routes, pem_route),
        deployment(ctx.work, bare=True) as (bare_routes, _),
    ):
        bare = Route("unix-bare", bare_routes[0].address)
        for i in range(runs):
            ctx.progress(f"transport run {i + 1}/{runs} ...")
            for route in (*routes, bare):
                for metric, value in latency(route, seconds).items():
                    record(route.name, metric, value)
                record(route.name, "c16_per_s", throughput(route, 16, seconds))
            for route in (routes[1], pem_route):
                record(route.name, "connections_per_s", connections(route, handshakes))
    median: dict[str, dict[str, float]] = {
        route: {metric: statistics.median(v) for metric, v in metrics.items()}
        for route, metrics in results.items()
    }
    data["runs"] = results
    data["median"] = median
    unix, front, pem = median["unix"], median["mtls-front"], median["mtls-front-pem"]
    bare_m = median["unix-bare"]
    ratios: dict[str, float | None] = {
        "authz_audit_vs_bare_c1_p50": bare_m["p50_ms"] / unix["p50_ms"],
        "authz_audit_vs_bare_c16": unix["c16_per_s"] / bare_m["c16_per_s"],
        "mtls_front_vs_unix_c1_p50": unix["p50_ms"] / front["p50_ms"],
        "mtls_front_vs_unix_c16": front["c16_per_s"] / unix["c16_per_s"],
        "token_key_vs_pem_key_handshakes": front["connections_per_s"] / pem["connections_per_s"],
    }
    rows = []
    for name in ("unix-bare", "unix", "mtls-front", "mtls-front-pem"):
        m = median.get(name, {})

        def cell(metric: str, fmt: Callable[[float], str], m: dict[str, float] = m) -> str:
            return fmt(m[metric]) if metric in m else "-"

        rows.append(
            [
                name,
                cell("p50_ms", lambda v: f"{v:.2f}"),
                cell("p99_ms", lambda v: f"{v:.2f}"),
                cell("c16_per_s", lambda v: f"{v:,.0f}"),
                cell("connections_per_s", lambda v: f"{v:,.0f}"),
            ]
        )
    table = Table(
        f"Transport: Sign ec-p256, medians of {runs} runs",
        ["route", "p50 ms (c=1)", "p99 ms (c=1)", "sig/s (c=16)", "new mTLS connections/s"],
        rows,
    )
    per_sig_us = (1 / unix["c16_per_s"] - 1 / bare_m["c16_per_s"]) * 1e6
    notes = [
        "Authorisation and the audit log (unix against unix-bare, the same service without "
        f"either) cost {unix['p50_ms'] - bare_m['p50_ms']:.2f} ms at p50 per Sign at c=1 "
        f"({fmt_ratio(ratios['authz_audit_vs_bare_c1_p50'])}) and "
        f"{fmt_ratio(ratios['authz_audit_vs_bare_c16'])} of the throughput at c=16, "
        f"{per_sig_us:.0f} us of service time per signature.",
        f"mTLS through the front adds {front['p50_ms'] - unix['p50_ms']:.2f} ms at p50 "
        f"({fmt_ratio(ratios['mtls_front_vs_unix_c1_p50'])} of the Unix socket's speed at c=1; "
        f"{fmt_ratio(ratios['mtls_front_vs_unix_c16'])} of its throughput at c=16).",
        "A new connection through the front costs one signature in the TLS token: "
        f"{fmt_ratio(ratios['token_key_vs_pem_key_handshakes'])} of the connections per "
        "second of the same nginx with its key in a file. gRPC keeps connections open, so this "
        "is paid once per client connection, not per call.",
    ]
    return ScenarioResult(NAME, data, ratios, [table], notes)
