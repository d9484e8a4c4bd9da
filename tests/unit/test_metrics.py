"""signer._internal.metrics: the series, their bounded labels, the no-op path, the listener, the
``[metrics]`` setting, and the recording points that need no token host (the interceptor, the
audit writer). The token's (up, reconnects, logins) and a real scrape are in
tests/integration/test_metrics.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from signer._internal import config, metrics
from signer._internal.audit import AuditLog, SQLiteAuditStore
from signer._internal.metrics import OFF, Exported, Listener, parse_address
from signer._internal.policy import Caller
from signer._internal.server import CallInterceptor
from signer.errors import ConfigError, NotFound, SignerError, Unavailable
from signer.v1 import signer_pb2 as pb
from tests.conftest import free_port
from tests.unit.audit.fakes import SoftKey, event, write

CALLS = "signer_rpc_calls_total"


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


def test_off_records_nothing_and_needs_no_prometheus_client() -> None:
    """The path when ``[metrics] listen`` is not set: every method does nothing."""
    assert metrics.for_address("") is OFF
    assert not OFF.enabled
    OFF.call("Sign", "OK", "local", 0.001, None)
    OFF.token_connected("signing", True)
    OFF.login("signing", "ok")
    OFF.audit_committed(3, 0.001)
    OFF.checkpoint(True)
    OFF.policy_reload(False)
    OFF.issuers_published(True, 1)
    OFF.watch_token("signing", lambda: True)
    OFF.watch_lanes(lambda: 1)
    OFF.watch_audit(lambda: 1)
    assert isinstance(metrics.for_address("127.0.0.1:9464"), Exported)


def test_each_assembly_has_a_registry_of_its_own() -> None:
    """Two in one process (the tests run several servers): no clash, no shared counts."""
    a, b = Exported(), Exported()
    a.call("Sign", "OK", "local", 0.001, None)
    assert a.value(CALLS, rpc="Sign", code="OK", caller="local") == 1
    assert b.value(CALLS, rpc="Sign", code="OK", caller="local") is None
    assert b.value("process_cpu_seconds_total") is not None  # the process collector


def test_calls_by_rpc_status_and_caller_kind() -> None:
    m = Exported()
    m.call("Sign", "OK", "local", 0.0004, None)
    m.call("Sign", "OK", "local", 0.003, None)
    m.call("Sign", "NOT_FOUND", "mtls", 0.0001, None)
    m.call("GetKey", "OK", "local", 0.0002, None)
    assert m.value(CALLS, rpc="Sign", code="OK", caller="local") == 2
    assert m.value(CALLS, rpc="Sign", code="NOT_FOUND", caller="mtls") == 1
    assert m.value("signer_sign_duration_seconds_count", rpc="Sign") == 3
    assert m.value("signer_sign_duration_seconds_bucket", rpc="Sign", le="0.0005") == 2
    assert m.value("signer_sign_duration_seconds_count", rpc="SignBatch") == 0
    # Only Sign and SignBatch have a histogram.
    assert m.value("signer_sign_duration_seconds_count", rpc="GetKey") is None


def test_labels_come_from_fixed_sets_whatever_they_are_given() -> None:
    """Nothing a caller chooses becomes a label value: an RPC outside the descriptor is
    ``other``, a status outside gRPC's ``UNKNOWN``, a caller kind outside the three
    ``anonymous``."""
    m = Exported()
    for i in range(50):
        m.call(f"/evil/Method{i}", f"CODE{i}", f"uid:{i}", 0.001, None)
    assert m.value(CALLS, rpc="other", code="UNKNOWN", caller="anonymous") == 50
    series = [s for f in m.registry.collect() if f.name == "signer_rpc_calls" for s in f.samples]
    assert len([s for s in series if s.name == CALLS]) == 1
    assert metrics.rpc_names() >= {"Sign", "SignBatch", "CreateKey", "Check"}
    assert "OK" in metrics.code_names().values()


def test_sign_batch_items_by_their_own_status() -> None:
    m = Exported()
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    response = pb.SignBatchResponse(
        results=[pb.SignBatchResult(signature=b"s")] * 3
        + [pb.SignBatchResult(error={"code": not_found, "message": "no"})]
    )
    m.call("SignBatch", "OK", "local", 0.01, response)
    assert m.value("signer_sign_batch_items_total", code="OK") == 3
    assert m.value("signer_sign_batch_items_total", code="NOT_FOUND") == 1
    assert m.value("signer_sign_duration_seconds_count", rpc="SignBatch") == 1


def test_events_and_levels() -> None:
    m = Exported()
    up, queued = [True], [0]
    m.watch_token("signing", lambda: up[0])
    m.watch_lanes(lambda: queued[0])
    m.watch_audit(lambda: queued[0] * 2)
    assert m.value("signer_token_up", connection="signing") == 1
    assert m.value("signer_token_reconnects_total", connection="signing") == 0
    up[0], queued[0] = False, 7
    assert m.value("signer_token_up", connection="signing") == 0  # read when scraped
    assert m.value("signer_lanes_queued_jobs") == 7
    assert m.value("signer_audit_queued_records") == 14
    m.token_connected("signing", again=False)
    m.token_connected("signing", again=True)
    assert m.value("signer_token_reconnects_total", connection="signing") == 1
    m.login("signing", "ok")
    m.login("admin", "incorrect")
    assert m.value("signer_token_logins_total", connection="signing", result="ok") == 1
    assert m.value("signer_token_logins_total", connection="admin", result="incorrect") == 1
    m.audit_committed(5, 0.002)
    assert m.value("signer_audit_records_total") == 5
    assert m.value("signer_audit_commit_duration_seconds_count") == 1
    m.checkpoint(True)
    m.checkpoint(False)
    assert m.value("signer_audit_checkpoints_total", result="written") == 1
    assert m.value("signer_audit_checkpoints_total", result="failed") == 1
    m.policy_reload(True)
    assert m.value("signer_policy_reloads_total", result="ok") == 1
    assert m.value("signer_issuer_publications_total", result="failed") == 0
    m.issuers_published(True, 2)
    m.issuers_published(False, 0)
    assert m.value("signer_issuer_publications_total", result="ok") == 1
    assert m.value("signer_issuer_publications_total", result="failed") == 1
    assert m.value("signer_issuer_documents_written_total") == 2
    assert m.value("signer_policy_reloads_total", result="refused") == 0


# --- the interceptor -------------------------------------------------------------------------


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise grpc.aio.AbortError()


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method


def _call(
    m: Exported,
    outcome: Any,
    caller: Caller | None,
    kind: str = "local",
    method: str = "/signer.v1.SignerService/Sign",
) -> None:
    async def inner(request: object, context: object) -> object:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def continuation(_details: object) -> object:
        return grpc.unary_unary_rpc_method_handler(inner)

    async def run() -> None:
        interceptor = CallInterceptor(lambda c: caller, "how", metrics=m, kind=kind)
        handler = await interceptor.intercept_service(continuation, _Details(method))
        with contextlib.suppress(grpc.aio.AbortError):
            await handler.unary_unary("request", _Context())

    asyncio.run(run())


def test_the_interceptor_counts_every_outcome_with_the_status_it_answers() -> None:
    m = Exported()
    alice = Caller.unix(1000, "alice")
    _call(m, "signed", alice)
    _call(m, NotFound("key 'k' not found"), alice, kind="mtls")
    _call(m, RuntimeError("a bug"), alice)
    _call(m, "never runs", None)  # no caller: UNAUTHENTICATED, anonymous
    _call(m, "serving", None, method="/grpc.health.v1.Health/Check")
    assert m.value(CALLS, rpc="Sign", code="OK", caller="local") == 1
    assert m.value(CALLS, rpc="Sign", code="NOT_FOUND", caller="mtls") == 1
    assert m.value(CALLS, rpc="Sign", code="INTERNAL", caller="local") == 1
    assert m.value(CALLS, rpc="Sign", code="UNAUTHENTICATED", caller="anonymous") == 1
    assert m.value(CALLS, rpc="Check", code="OK", caller="anonymous") == 1
    assert m.value("signer_sign_duration_seconds_count", rpc="Sign") == 4


def test_a_call_the_audit_log_could_not_record_counts_as_answered() -> None:
    """The status counted is the one the caller gets: a signature whose record failed is
    UNAVAILABLE, not OK."""
    m = Exported()

    async def audit(*_args: object) -> None:
        raise Unavailable("the audit log cannot be written")

    async def inner(request: object, context: object) -> object:
        return "signed"

    async def continuation(_details: object) -> object:
        return grpc.unary_unary_rpc_method_handler(inner)

    async def run() -> None:
        interceptor = CallInterceptor(lambda c: Caller.unix(1000, "alice"), "how", audit, metrics=m)
        handler = await interceptor.intercept_service(
            continuation, _Details("/signer.v1.SignerService/Sign")
        )
        with pytest.raises(grpc.aio.AbortError):
            await handler.unary_unary("request", _Context())

    asyncio.run(run())
    assert m.value(CALLS, rpc="Sign", code="UNAVAILABLE", caller="local") == 1
    assert m.value(CALLS, rpc="Sign", code="OK", caller="local") is None


def test_a_call_whose_caller_has_gone_counts_as_cancelled() -> None:
    """The call finishes (and is recorded with its own outcome), but its caller was told
    CANCELLED (or DEADLINE_EXCEEDED), not OK: it is counted CANCELLED, its batch items not at
    all."""
    m = Exported()
    calls: set[asyncio.Task[Any]] = set()

    async def run() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        async def inner(request: object, context: object) -> object:
            started.set()
            await release.wait()
            return pb.SignBatchResponse(results=[pb.SignBatchResult(signature=b"s")])

        async def continuation(_details: object) -> object:
            return grpc.unary_unary_rpc_method_handler(inner)

        interceptor = CallInterceptor(
            lambda c: Caller.unix(1000, "alice"), "how", calls=calls, metrics=m
        )
        handler = await interceptor.intercept_service(
            continuation, _Details("/signer.v1.SignerService/SignBatch")
        )
        waiting = asyncio.ensure_future(handler.unary_unary("request", _Context()))
        await started.wait()
        waiting.cancel()  # as gRPC does when the caller cancels or its deadline passes
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert calls  # the call itself goes on
        release.set()
        await asyncio.gather(*calls)

    asyncio.run(run())
    assert m.value(CALLS, rpc="SignBatch", code="CANCELLED", caller="local") == 1
    assert m.value(CALLS, rpc="SignBatch", code="OK", caller="local") is None
    assert m.value("signer_sign_duration_seconds_count", rpc="SignBatch") == 1
    assert m.value("signer_sign_batch_items_total", code="OK") is None


# --- the audit writer ------------------------------------------------------------------------


def test_the_audit_writer_counts_commits_records_and_checkpoints(tmp_path: Path) -> None:
    m = Exported()
    log = AuditLog(
        SQLiteAuditStore(tmp_path / "audit.db"),
        checkpoint_every=4,
        checkpoint_interval=60,
        metrics=m,
    )
    m.watch_audit(lambda: log.queued)
    log.start(SoftKey().make, tmp_path / "audit.db.key.pem")
    for i in range(1, 10):
        assert write(log, event(i)) == i
    assert m.value("signer_audit_records_total") == 9
    assert m.value("signer_audit_commit_duration_seconds_count") == 9  # one call at a time
    assert m.value("signer_audit_checkpoints_total", result="written") == 2  # at 4 and 8
    assert m.value("signer_audit_queued_records") == 0
    log.close()  # a last checkpoint, over the 9th
    assert m.value("signer_audit_checkpoints_total", result="written") == 3


def test_a_checkpoint_that_cannot_be_signed_is_counted_failed(tmp_path: Path) -> None:
    m = Exported()
    log = AuditLog(
        SQLiteAuditStore(tmp_path / "audit.db"),
        checkpoint_every=2,
        checkpoint_interval=60,
        metrics=m,
    )

    def no_key(*_args: object) -> Any:
        raise Unavailable("token unavailable")

    # The writer answers a record's call before it tries the checkpoint that record is due:
    # the attempt is awaited by the log's change listener, which it calls after counting.
    tried = threading.Event()

    def failed() -> float:
        return m.value("signer_audit_checkpoints_total", result="failed") or 0.0

    log.on_change(lambda: tried.set() if failed() else None)
    log.start(no_key, tmp_path / "audit.db.key.pem")
    for i in range(1, 3):
        write(log, event(i))
    assert tried.wait(30)
    assert failed() >= 1  # and retried after: more may have failed since
    assert m.value("signer_audit_checkpoints_total", result="written") == 0
    log.close()


# --- the listener and its setting ------------------------------------------------------------


def test_the_listener_serves_the_registry_and_stops() -> None:
    m = Exported()
    m.call("Sign", "OK", "local", 0.001, None)
    address = f"127.0.0.1:{free_port()}"
    listener = Listener(address, m.registry)
    try:
        text = scrape(address)
    finally:
        listener.stop()
    assert 'signer_rpc_calls_total{caller="local",code="OK",rpc="Sign"} 1.0' in text
    assert "# TYPE signer_sign_duration_seconds histogram" in text
    assert "process_resident_memory_bytes" in text
    # Stopped: the port is free again, for a service started anew.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", listener.port))


def test_a_port_in_use_stops_the_start_naming_the_setting() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SignerError, match=rf"cannot listen on metrics.listen 127.0.0.1:{port}"):
            Listener(f"127.0.0.1:{port}", Exported().registry)


def test_a_silent_client_holds_the_listener_for_its_timeout_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One thread serves scrapes one at a time: a client that connects and says nothing is
    dropped after the timeout (else one such connection would end all scraping, and a
    thread per connection would let any local user grow the service's threads)."""
    monkeypatch.setattr(metrics, "SCRAPE_TIMEOUT_SECONDS", 0.3)
    address = f"127.0.0.1:{free_port()}"
    listener = Listener(address, Exported().registry)
    try:
        with socket.create_connection(("127.0.0.1", listener.port)):
            t0 = time.monotonic()
            assert "signer_rpc_calls" in scrape(address)
            assert time.monotonic() - t0 < 5
    finally:
        listener.stop()


def _served(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once the listener's thread has begun serving a connection."""
    serving = threading.Event()
    setup = metrics._Quiet.setup

    def noted(handler: metrics._Quiet) -> None:
        serving.set()
        setup(handler)

    monkeypatch.setattr(metrics._Quiet, "setup", noted)
    return serving


def test_a_slow_drip_client_is_cut_off_after_the_deadline_in_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The deadline counts from the accept, not per read: a client that sends a byte of its
    request line every 50 ms (each read well within any per-read timeout) is cut off after
    SCRAPE_TIMEOUT_SECONDS, and a scrape waiting behind it is then served. (A timeout per read
    let such a client hold the one serving thread for as long as it liked.)"""
    monkeypatch.setattr(metrics, "SCRAPE_TIMEOUT_SECONDS", 0.5)
    serving = _served(monkeypatch)
    address = f"127.0.0.1:{free_port()}"
    listener = Listener(address, Exported().registry)
    done, cut = threading.Event(), threading.Event()

    def drip() -> None:
        with socket.create_connection(("127.0.0.1", listener.port)) as s:
            try:
                s.sendall(b"G")
                while not done.wait(0.05):
                    s.sendall(b"E")
            except OSError:  # reset or broken pipe: the listener cut it off
                cut.set()

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        assert serving.wait(5)  # the dripper's connection is the one being served
        t0 = time.monotonic()
        assert "signer_rpc_calls" in scrape(address)
        assert time.monotonic() - t0 < 4
        assert cut.wait(5)
    finally:
        done.set()
        dripper.join(5)
        listener.stop()


def test_stop_returns_at_once_while_a_client_is_connected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service's stop (Server.stop, on the event loop) calls Listener.stop: it cuts off the
    connection being served rather than waiting for it, and frees the port. The client here
    sends one byte and then nothing, for longer than the test runs."""
    monkeypatch.setattr(metrics, "SCRAPE_TIMEOUT_SECONDS", 60.0)
    serving = _served(monkeypatch)
    listener = Listener(f"127.0.0.1:{free_port()}", Exported().registry)
    with socket.create_connection(("127.0.0.1", listener.port)) as client:
        client.sendall(b"G")
        assert serving.wait(5)
        t0 = time.monotonic()
        listener.stop()
        assert time.monotonic() - t0 < 3
        client.settimeout(5)
        assert client.recv(100) == b""  # closed by the listener
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", listener.port))


def test_the_listener_makes_no_dns_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """http.server's bind asks socket.getfqdn for the host's name, which can wait on DNS (and so
    hold up the service's start) for a name nothing uses."""

    def getfqdn(name: str = "") -> str:
        raise AssertionError(f"getfqdn({name!r})")

    monkeypatch.setattr(socket, "getfqdn", getfqdn)
    address = f"127.0.0.1:{free_port()}"
    listener = Listener(address, Exported().registry)
    try:
        assert "signer_rpc_calls" in scrape(address)
    finally:
        listener.stop()


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6(), reason="no IPv6 loopback on this machine")
def test_an_ipv6_listener_is_ipv6_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``[::]:port`` must not take IPv4 connections as well (net.ipv6.bindv6only is 0 by
    default): IPV6_V6ONLY is set before the bind. (Linux reports it set once bound to a
    specific address such as ::1 whatever was asked, so the option is read as the bind is
    made; the test binds ::1 instead of [::], to open no port on every interface.)"""
    v6only: list[int] = []
    bind = socket.socket.bind

    def to_loopback(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_INET6:
            v6only.append(self.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            address = ("::1", *address[1:])
        bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", to_loopback)
    listener = Listener(f"[::]:{free_port()}", Exported().registry)
    try:
        assert v6only == [1]
        assert "signer_rpc_calls" in scrape(f"[::1]:{listener.port}")
    finally:
        listener.stop()


@pytest.mark.parametrize(
    ("listen", "want"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9000", ("::1", 9000))],
)
def test_addresses(listen: str, want: tuple[str, int]) -> None:
    assert parse_address(listen) == want


@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        ("9464", "must be host:port"),
        (":9464", "must be host:port"),
        ("localhost:9464", "must name an IP address"),
        ("::1:9464", "only they, go in brackets"),
        ("[127.0.0.1]:9464", "only they, go in brackets"),
        ("127.0.0.1:0", "port from 1 to 65535"),
        ("127.0.0.1:65536", "port from 1 to 65535"),
        ("127.0.0.1:９４６４", "port from 1 to 65535"),  # noqa: RUF001 (full-width digits)
        ("unix:/run/x.sock", "must name an IP address"),
    ],
)
def test_a_bad_address_is_refused_naming_its_line(
    tmp_path: Path, listen: str, fragment: str
) -> None:
    path = tmp_path / "signer.toml"
    path.write_text(f'[server]\npolicy_file = ""\n\n[metrics]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError, match=fragment) as caught:
        config.load(path, env={})
    assert "metrics.listen" in caught.value.message
    assert f"({path} line 5)" in caught.value.message


def test_metrics_are_off_unless_set(tmp_path: Path) -> None:
    assert config.load(env={}).metrics.listen == ""
    on = config.load(env={"SIGNER_METRICS_LISTEN": "127.0.0.1:9464"})
    assert on.metrics.listen == "127.0.0.1:9464"
    path = tmp_path / "signer.toml"
    path.write_text(config.dump(on))
    assert config.load(path, env={}) == on
