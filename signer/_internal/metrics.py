"""Prometheus metrics (issue 15): what the service counts, and the listener that serves them.

The parts that see an event call a method of a :class:`Metrics`: the interceptor (every call),
the token connection (logins, reconnects), the audit writer (commits, checkpoints), the server
(policy reloads). Levels (token up, queue depths) are read when scraped, from callables
registered once (:meth:`Metrics.watch_token` and friends), so the signing path pays nothing for
them. :data:`OFF`, a :class:`Metrics` whose methods do nothing, is what the parts get when
``[metrics] listen`` is not set: one method call per event, no lock, no import of
prometheus_client. :class:`Exported` records into a ``CollectorRegistry`` of its own, one per
server assembly (never prometheus_client's global one: tests run several servers in one
process, and a second registration of a name there is an error).

Series (units in the names, counters end in ``_total``)::

    signer_rpc_calls_total{rpc, code, caller}      calls, by RPC, gRPC status and caller kind
    signer_sign_duration_seconds{rpc}              histogram: Sign and SignBatch, in the service
    signer_sign_batch_items_total{code}            SignBatch items, by their own status
    signer_token_up{connection}                    1 while the token connection serves, else 0
    signer_token_reconnects_total{connection}      connections made again after the first
    signer_token_logins_total{connection, result}  C_Login attempts: ok, incorrect, expired, locked
    signer_lanes_queued_jobs                       signing-path jobs waiting for a lane
    signer_audit_queued_records                    audit records waiting for the writer
    signer_audit_commit_duration_seconds           histogram: one group commit of the audit log
    signer_audit_records_total                     audit records committed
    signer_audit_checkpoints_total{result}         checkpoints: written, failed
    signer_policy_reloads_total{result}            SIGHUP reloads: ok, refused (old policy kept)
    process_*                                      prometheus_client's process collector

Labels come only from fixed, bounded sets, so that no caller can grow the number of series:
``rpc`` is a method of the service's descriptor (or ``Check`` for health, ``other``), ``code``
a gRPC status name, ``caller`` the kind of listener (``local``: the Unix socket; ``mtls``:
through the TLS front; ``anonymous``: no authenticated caller, health checks included),
``connection`` ``signing`` or ``admin``, ``result`` one of the words above. Never a key name, a
caller's identity, a uid, a certificate subject or a scope: those are in the audit log, which is
where to count them per caller. Nothing here carries a secret.

The listener (:class:`Listener`) is its own TCP socket (``[metrics] listen``, host:port),
never the signing socket: one thread serving one scrape at a time, each connection given
``SCRAPE_TIMEOUT_SECONDS`` in all from its accept (not per read: a client sending a byte now and
then is cut off at the same time as one that says nothing), so a slow or silent client (or many
such) holds one thread for a while, not a thread each, and never for good. :meth:`Listener.stop`
cuts off the connection being served and waits for the thread ``STOP_SECONDS`` at most.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from signer.errors import ConfigError, SignerError, shown

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# Kinds of caller (the listener the call came through).
LOCAL, MTLS, ANONYMOUS = "local", "mtls", "anonymous"
_CALLERS = frozenset({LOCAL, MTLS, ANONYMOUS})
# The token connections (signer._internal.server.Server: the signing one, the administrative one).
SIGNING, ADMIN = "signing", "admin"
# An RPC name outside the known set (none is: gRPC answers an unknown method itself).
OTHER = "other"
# Seconds: a fraction of a millisecond (a P-256 signature on a quiet token host) to a few
# seconds (a 1,000-item RSA-4096 batch, a token host coming back).
LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
# A group commit: one SQLite transaction (fsync) of up to 1,024 records.
COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
# The RPCs whose latency is a histogram.
TIMED = frozenset({"Sign", "SignBatch"})
# A scrape connection's whole time, from its accept to its close (read when a Listener starts).
SCRAPE_TIMEOUT_SECONDS = 5.0
# How often the serving thread looks whether it is to stop, between connections; how long
# Listener.stop waits for it at most (it is a daemon thread: a process exiting does not wait).
POLL_SECONDS = 0.25
STOP_SECONDS = 2.0


class Metrics:
    """What the parts call when something happens. This base records nothing (:data:`OFF`)."""

    enabled = False

    def call(self, rpc: str, code: str, caller: str, seconds: float, response: Any) -> None:
        """A call ended with status ``code`` after ``seconds``; ``response``: its answer, or
        None."""

    def token_connected(self, connection: str, again: bool) -> None:
        """The token connection was made; ``again``: not for the first time."""

    def login(self, connection: str, result: str) -> None:
        """A C_Login: ``ok``, or what the token said (signer._internal.token._logins)."""

    def audit_committed(self, records: int, seconds: float) -> None:
        """A group commit of ``records`` records took ``seconds``."""

    def checkpoint(self, written: bool) -> None:
        """A checkpoint was signed and written, or could not be."""

    def policy_reload(self, ok: bool) -> None:
        """A SIGHUP reload: the new policy taken, or refused (the old one kept)."""

    def issuers_published(self, ok: bool, files: int) -> None:
        """A publication of the issuers' documents: ``files`` rewritten, or it failed (the old
        ones stay served)."""

    def watch_token(self, connection: str, available: Callable[[], bool]) -> None:
        """``available()`` is read at each scrape as ``signer_token_up``."""

    def watch_lanes(self, queued: Callable[[], int]) -> None:
        """``queued()`` is read at each scrape as ``signer_lanes_queued_jobs``."""

    def watch_audit(self, queued: Callable[[], int]) -> None:
        """``queued()`` is read at each scrape as ``signer_audit_queued_records``."""


OFF = Metrics()


def rpc_names() -> frozenset[str]:
    """The values ``rpc`` may take: the service's methods, by its descriptor, and health's
    ``Check`` (reflection and health's ``Watch`` are streams, which the interceptor leaves
    alone)."""
    from signer.v1 import signer_pb2 as pb

    methods = pb.DESCRIPTOR.services_by_name["SignerService"].methods
    return frozenset(m.name for m in methods) | {"Check"}


def code_names() -> dict[int, str]:
    """The values ``code`` may take: gRPC's status names, by number."""
    import grpc

    return {code.value[0]: code.name for code in grpc.StatusCode}


class Exported(Metrics):
    """Records into :attr:`registry`, its own ``CollectorRegistry``; thread-safe (the parts
    record from the event loop, the lanes, the token monitor and the audit writer)."""

    enabled = True

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.process_collector import ProcessCollector

        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        self._rpcs = rpc_names()
        self._codes = frozenset(code_names().values())
        self._code_of = code_names()
        self._calls = Counter(
            "signer_rpc_calls",
            "Calls by RPC, gRPC status and kind of caller (local, mtls, anonymous).",
            ("rpc", "code", "caller"),
            registry=r,
        )
        self._latency = Histogram(
            "signer_sign_duration_seconds",
            "Time in the service of a Sign or SignBatch call, audit record included.",
            ("rpc",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._items = Counter(
            "signer_sign_batch_items",
            "SignBatch items, by the status of each (OK: signed).",
            ("code",),
            registry=r,
        )
        self._up = Gauge(
            "signer_token_up",
            "1 while the token connection serves calls, else 0.",
            ("connection",),
            registry=r,
        )
        self._reconnects = Counter(
            "signer_token_reconnects",
            "Token connections made again after the first (the token host came back).",
            ("connection",),
            registry=r,
        )
        self._logins = Counter(
            "signer_token_logins",
            "C_Login attempts by result (ok, incorrect, expired, locked).",
            ("connection", "result"),
            registry=r,
        )
        self._lanes = Gauge(
            "signer_lanes_queued_jobs", "Signing-path jobs waiting for a lane.", registry=r
        )
        self._audit_queue = Gauge(
            "signer_audit_queued_records",
            "Audit records waiting for the writer's next group commit.",
            registry=r,
        )
        self._commit = Histogram(
            "signer_audit_commit_duration_seconds",
            "Time of one group commit of the audit log (one transaction).",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self._records = Counter("signer_audit_records", "Audit records committed.", registry=r)
        self._checkpoints = Counter(
            "signer_audit_checkpoints",
            "Audit checkpoints signed in the token and written, or failed.",
            ("result",),
            registry=r,
        )
        self._reloads = Counter(
            "signer_policy_reloads",
            "Policy reloads (SIGHUP): ok, or refused with the old policy kept.",
            ("result",),
            registry=r,
        )
        self._publications = Counter(
            "signer_issuer_publications",
            "Publications of the issuers' documents: ok, or failed (the old files stay served).",
            ("result",),
            registry=r,
        )
        self._published = Counter(
            "signer_issuer_documents_written",
            "Issuer documents (JWKS, OpenID configuration) rewritten because they changed.",
            registry=r,
        )
        # Label children by their values, filled as seen: a dict lookup per call rather than
        # prometheus_client's labels() (a lock and a tuple check each time). Bounded, as the
        # labels are.
        self._call_children: dict[tuple[str, str, str], Any] = {}
        self._latency_children = {rpc: self._latency.labels(rpc) for rpc in TIMED}
        # The series a reader looks for exist from the start, at 0.
        for connection in (SIGNING,):
            self._reconnects.labels(connection)
        for result in ("written", "failed"):
            self._checkpoints.labels(result)
        for result in ("ok", "refused"):
            self._reloads.labels(result)
        for result in ("ok", "failed"):
            self._publications.labels(result)

    def call(self, rpc: str, code: str, caller: str, seconds: float, response: Any) -> None:
        if rpc not in self._rpcs:
            rpc = OTHER
        if code not in self._codes:
            code = "UNKNOWN"
        if caller not in _CALLERS:
            caller = ANONYMOUS
        key = (rpc, code, caller)
        child = self._call_children.get(key)
        if child is None:
            child = self._call_children[key] = self._calls.labels(rpc, code, caller)
        child.inc()
        timed = self._latency_children.get(rpc)
        if timed is not None:
            timed.observe(seconds)
            if rpc == "SignBatch" and response is not None:
                self._count_items(response.results)

    def _count_items(self, results: Iterable[Any]) -> None:
        by_code: dict[int, int] = {}
        for result in results:
            code = result.error.code if result.HasField("error") else 0
            by_code[code] = by_code.get(code, 0) + 1
        for code, n in by_code.items():
            self._items.labels(self._code_of.get(code, "UNKNOWN")).inc(n)

    def token_connected(self, connection: str, again: bool) -> None:
        if again:
            self._reconnects.labels(connection).inc()

    def login(self, connection: str, result: str) -> None:
        self._logins.labels(connection, result).inc()

    def audit_committed(self, records: int, seconds: float) -> None:
        self._commit.observe(seconds)
        self._records.inc(records)

    def checkpoint(self, written: bool) -> None:
        self._checkpoints.labels("written" if written else "failed").inc()

    def policy_reload(self, ok: bool) -> None:
        self._reloads.labels("ok" if ok else "refused").inc()

    def issuers_published(self, ok: bool, files: int) -> None:
        self._publications.labels("ok" if ok else "failed").inc()
        self._published.inc(files)

    def watch_token(self, connection: str, available: Callable[[], bool]) -> None:
        self._up.labels(connection).set_function(lambda: 1.0 if available() else 0.0)
        self._reconnects.labels(connection)

    def watch_lanes(self, queued: Callable[[], int]) -> None:
        self._lanes.set_function(lambda: float(queued()))

    def watch_audit(self, queued: Callable[[], int]) -> None:
        self._audit_queue.set_function(lambda: float(queued()))

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value as a scrape would show it (``name`` in full, e.g.
        ``signer_rpc_calls_total``), None if there is no such series: for tests and the CLI."""
        return self.registry.get_sample_value(name, labels)


def for_address(listen: str) -> Metrics:
    """:class:`Exported` when ``listen`` is set, else :data:`OFF`."""
    return Exported() if listen else OFF


def parse_address(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); ConfigError naming
    ``metrics.listen`` for anything else. The host is an IP address, not a name: what a name
    resolves to may change, and which address the listener is on is the point."""
    where = "metrics.listen"
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ConfigError(
            f"{where} must be host:port, such as 127.0.0.1:9464 or [::1]:9464, got {shown(listen)}"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        version = 6
    else:
        version = 4
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{where} must name an IP address (IPv6 in brackets), such as 127.0.0.1:9464, "
            f"got {shown(listen)}"
        ) from None
    if address.version != version:
        raise ConfigError(
            f"{where}: IPv6 addresses, and only they, go in brackets ([::1]:9464), "
            f"got {shown(listen)}"
        )
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ConfigError(f"{where} must end in a port from 1 to 65535, got {shown(listen)}")
    return str(address), int(port_text)


class _Quiet(WSGIRequestHandler):
    """No line on stderr per scrape; each read bounded by the connection's deadline too."""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(cast(_Server, self.server).deadline)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(WSGIServer):
    """Serves one connection at a time (:meth:`handle_request`, in :class:`Listener`'s thread),
    each shut down ``deadline`` seconds after its accept whatever it is doing (a timer)."""

    # A restarted service binds again at once, whatever its last connections left in TIME_WAIT.
    allow_reuse_address = True
    # handle_request waits this long for a connection, then returns (to look at the stop flag).
    timeout = POLL_SECONDS
    deadline = SCRAPE_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()
        self._serving: socket.socket | None = None  # the connection being served
        self.stopping = threading.Event()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """HTTPServer's, less its ``socket.getfqdn(host)`` (a DNS lookup that can hold up the
        service's start, for a name nothing here uses) and, for IPv6, with ``IPV6_V6ONLY``:
        ``[::]`` means IPv6 only, not IPv4 as well, whatever the host's bindv6only."""
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if self.stopping.is_set():  # accepted as the listener stops: not served
                super().shutdown_request(request)
                return
            self._serving = request
        timer = threading.Timer(self.deadline, self.cut, (request,))
        timer.daemon = True
        timer.start()
        try:
            super().process_request(request, client_address)  # served, then shut and closed
        finally:
            timer.cancel()

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            # Before it is closed: a timer firing late must not shut down a reused descriptor.
            self._serving = None
        super().shutdown_request(request)

    def stop(self) -> None:
        """No connection served from now on, the one being served cut off."""
        with self._lock:
            self.stopping.set()
        self.cut()

    def cut(self, request: socket.socket | None = None) -> None:
        """Shut down the connection being served (``request``, if it still is; any if None):
        its blocked reads and writes return at once, and the handler ends."""
        with self._lock:
            serving = self._serving
            if serving is not None and (request is None or serving is request):
                with contextlib.suppress(OSError):
                    serving.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection cut off (or reset by its client) while served: nothing to report."""


class _Server6(_Server):
    address_family = socket.AF_INET6


class Listener:
    """Serves ``registry`` at ``/metrics`` (any path, as prometheus_client does) on
    ``host:port``, in one thread of its own, until :meth:`stop`."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        from prometheus_client import make_wsgi_app

        host, port = parse_address(listen)
        cls = _Server6 if ":" in host else _Server
        try:
            self._httpd = make_server(
                host, port, make_wsgi_app(registry), server_class=cls, handler_class=_Quiet
            )
        except OSError as exc:
            raise SignerError(
                f"cannot listen on metrics.listen {listen}: {exc.strerror or exc}"
            ) from None
        self._httpd.deadline = SCRAPE_TIMEOUT_SECONDS
        self.port: int = self._httpd.server_port
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._httpd.stopping.is_set():
            try:
                self._httpd.handle_request()  # one connection, or none within POLL_SECONDS
            except (OSError, ValueError):
                # The listening socket closed under it (a stop that did not wait for it).
                if self._httpd.stopping.is_set():
                    return
                raise

    def stop(self) -> None:
        """Stops serving within ``STOP_SECONDS``, a client in the middle of a scrape or not:
        the connection being served is cut off, the thread waited for that long at most, and
        the listening socket closed (the port free again)."""
        self._httpd.stop()
        self._thread.join(timeout=STOP_SECONDS)
        self._httpd.server_close()
