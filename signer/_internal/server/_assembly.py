"""The service assembled, and its lifetime: :class:`Server`, :func:`serve`.

:class:`Server` builds the token connections, the store, the keyring, the policy and the audit
log (or takes the policy and audit log it is given), one gRPC server per listener (the local
socket behind the relay, the front's socket) each with its :class:`._interceptor.CallInterceptor`,
health and reflection; it starts them, reloads the policy on SIGHUP, follows the token's and the
audit log's availability into health, replaces lanes stuck in a token that went away, runs the
reaper and the throttle's summaries, and shuts down draining calls in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import grp
import logging
import resource
import secrets
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from signer._internal import metrics as metrics_mod
from signer._internal import policy as policy_mod
from signer._internal.audit import (
    AUDIT_ALGORITHM,
    AuditLog,
    AuditPaused,
    Event,
    MakeKey,
    Signing,
    open_audit_store,
    witnesses,
)
from signer._internal.config import Config
from signer._internal.files import share_with_group
from signer._internal.issuers import Publisher
from signer._internal.keyring import Clock, Keyring, utcnow
from signer._internal.lanes import Lanes
from signer._internal.policy import Caller, Policy
from signer._internal.relay import Limits, PeerRelay, created_with_mode
from signer._internal.server._identity import Identify, front_caller, local_caller
from signer._internal.server._interceptor import CallInterceptor, audit_event
from signer._internal.server._servicer import SignerServicer
from signer._internal.store import open_store
from signer._internal.throttle import InFlight, RefusalThrottle
from signer._internal.token import Pin, Token
from signer._internal.token.pin import perturb_freed_memory
from signer._wire import status_name
from signer.errors import (
    ConfigError,
    ResourceExhausted,
    SignerError,
    Unauthenticated,
    Unavailable,
)
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc

log = logging.getLogger("signer.server")  # named for the component: signer._internal.logs
T = TypeVar("T")

# Sessions of the administrative connection: enough for the admin pool's threads to queue on
# (the token host serves one connection's calls in order anyway).
ADMIN_SESSIONS = 2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SignerService"].full_name


class Recorder(Protocol):
    """What the server needs of an audit log: :class:`signer._internal.audit.AuditLog`'s
    interface. The service uses the one its configuration names; a server given another (the
    benchmarks' that keeps nothing, to measure what the log costs) uses that one instead."""

    @property
    def failure(self) -> str | None:
        """Why the log refuses every call for good, or None."""

    def start(self, make_key: MakeKey, pin_to: Path) -> None: ...

    def on_change(self, listener: Callable[[], None]) -> None: ...

    def check(self) -> None:
        """Raises :class:`AuditPaused` while no new call may start."""

    def paused(self) -> None:
        """Counts a call :meth:`check` refused."""

    async def record(self, event: Event) -> int: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class Server:
    """Assembles token, store, keyring, policy, audit log and the gRPC servers; owns their
    lifetimes."""

    def __init__(
        self,
        cfg: Config,
        clock: Clock = utcnow,
        *,
        policy: Policy | None = None,
        audit: Recorder | None = None,
        metrics: metrics_mod.Metrics | None = None,
    ) -> None:
        """``policy`` and ``audit``: parts given rather than built from ``cfg`` (the policy
        file, the audit log). Nothing in the service passes them; the benchmarks do, to measure
        what authorisation and the audit log cost. A given policy is kept on SIGHUP.
        ``metrics``: where the parts record (tests read it); by default an
        :class:`~signer._internal.metrics.Exported` of this server's own when
        ``metrics.listen`` is set (served there from :meth:`start`), else nothing is
        recorded."""
        self.cfg = cfg
        self.policy_from_file = policy is None
        self.metrics = (
            metrics if metrics is not None else metrics_mod.for_address(cfg.metrics.listen)
        )
        self.metrics_listener: metrics_mod.Listener | None = None
        self.token = Token(
            cfg.token,
            Pin(cfg.token.pin_file),
            metrics=self.metrics,
            connection=metrics_mod.SIGNING,
        )
        # Slow token work (key generation, wrapping keys, unwrapping) on a connection of its
        # own where the module gives one, so that it never holds up a signature.
        self.admin_token = (
            Token(
                replace(cfg.token, sessions=ADMIN_SESSIONS),
                Pin(cfg.token.pin_file),
                follows=self.token,
                metrics=self.metrics,
                connection=metrics_mod.ADMIN,
            )
            if cfg.token.admin_connection
            else self.token
        )
        self.store = open_store(cfg.store.path)
        self.keyring = Keyring(cfg, self.token, self.store, clock, self.admin_token)
        self.publisher = Publisher(cfg.jwt, self.keyring.jwks)
        # The signing path's blocking work runs on lanes; the executor takes the administrative
        # calls (see SignerServicer._run), start-up, the reaper and shutdown.
        self.lanes = Lanes(cfg.token.lanes, name="token")
        self.metrics.watch_lanes(lambda: self.lanes.queued)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="signer")
        self.changes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="change")
        self.health = health_aio.HealthServicer()
        self.policy: Policy = self._load_policy() if policy is None else policy
        self.audit: Recorder = (
            AuditLog(
                open_audit_store(cfg.audit.path, chain=cfg.audit.chain),
                cfg.audit.checkpoint_every,
                cfg.audit.checkpoint_interval_seconds,
                cfg.audit.max_unsigned_records,
                witnesses(cfg.audit),
                clock=self.keyring.now,
                metrics=self.metrics,
            )
            if audit is None
            else audit
        )
        if isinstance(self.audit, AuditLog):
            log_ = self.audit
            self.metrics.watch_audit(lambda: log_.queued)
        self.relay = PeerRelay(
            Path(_unix_path(cfg.server.listen)),
            int(cfg.server.socket_mode, 8),
            relay_limits(cfg),
        )
        self._servers: list[grpc.aio.Server] = []
        # Every call still running, including those whose caller has gone: shutdown waits for
        # them, so that each is recorded before the audit log closes.
        self._calls: set[asyncio.Task[Any]] = set()
        self.throttle = RefusalThrottle(
            cfg.server.refused_calls_budget, cfg.server.refusal_window_seconds
        )
        self._summaries: asyncio.Task[None] | None = None
        self.in_flight = InFlight(cfg.server.max_calls_per_caller, cfg.server.max_calls_in_flight)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._publishing: asyncio.Task[None] | None = None
        self._publish_now = asyncio.Event()
        self._health_lock = asyncio.Lock()
        self._stopping = False
        self._serving: bool | None = None

    def _load_policy(self) -> Policy:
        path = self.cfg.server.policy_file
        if not path:
            log.warning("no server.policy_file: every call will be refused (PERMISSION_DENIED)")
            return policy_mod.DENY_ALL
        return policy_mod.load(path)

    def reload_policy(self) -> bool:
        """SIGHUP: the new policy for calls that start from now on; a broken file is refused
        and the old policy kept. In-flight calls finish under the policy they started with.
        A server given its policy (:class:`Server`'s ``policy``) has no file: it keeps it."""
        if not self.policy_from_file:
            log.warning("policy not reloaded: this server was given its policy, not a file")
            return False
        try:
            new = self._load_policy()
        except ConfigError as exc:
            log.error("policy not reloaded; the previous one stays", extra={"error": exc.message})
            self.metrics.policy_reload(False)
            return False
        self.policy = new
        self.metrics.policy_reload(True)
        log.info("policy reloaded", extra={"grants": len(new.grants), "file": new.source})
        return True

    def _grpc_server(self, identify: Identify, how: str, kind: str) -> grpc.aio.Server:
        limit = self.cfg.server.max_message_bytes
        # gRPC's own limit sits above ours, so an oversized message gets our INVALID_ARGUMENT
        # naming the limit rather than a bare RESOURCE_EXHAUSTED. Answers are not limited: their
        # size is the service's own (a JWT over 64 KiB of claims is 87 KB, a 1,000-item
        # RSA-4096 batch 520 KB, whatever max_message_bytes is), and one refused by gRPC after
        # the call had signed and been recorded OK reached its caller as RESOURCE_EXHAUSTED
        # (issue 12).
        grpc_limit = 2 * limit + 64 * 1024
        server = grpc.aio.server(
            interceptors=[
                CallInterceptor(
                    identify,
                    how,
                    self._record,
                    self._calls,
                    self.throttle,
                    self._admit,
                    self.in_flight,
                    self._check_recording,
                    self.metrics,
                    kind,
                )
            ],
            options=[
                ("grpc.max_receive_message_length", grpc_limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
        )
        servicer = SignerServicer(
            self.keyring, self.token, self.lanes, self.executor, lambda: self.policy, self.changes
        )
        pb_grpc.add_SignerServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        return server

    async def _record(
        self,
        method: str,
        caller: Caller | None,
        request: Any,
        response: Any,
        error: SignerError | None,
        gone: bool,
    ) -> None:
        event = audit_event(self.keyring.now(), method, caller, request, response, error, gone)
        await self.audit.record(event)

    def _audit_key(
        self, recorded: tuple[bytes, bytes] | None, pinned: bytes | None
    ) -> tuple[Signing, bytes] | None:
        """The audit key (:data:`signer._internal.audit.MakeKey`): the recorded one; else the
        pinned one, found in the token by its public key (a first checkpoint cut short after the
        pin was written), None if the token holds no such audit key; else a new pair generated
        in the token."""
        if recorded is not None:
            key_id, public_der = recorded
        elif pinned is not None:
            token = self.keyring.slow_token()
            found = {
                o.key_id
                for o in token.objects()
                if o.label == "signer-audit-key" and o.public_der == pinned
            }
            held = [
                k for k in sorted(found) if token.holds_private_half(k, AUDIT_ALGORITHM, pinned)
            ]
            if not held:
                return None
            key_id, public_der = held[0], pinned
            log.info("pinned audit key adopted", extra={"key_id": key_id.hex()})
        else:
            key_id = secrets.token_bytes(16)
            public_der = self.keyring.slow_token().generate(
                AUDIT_ALGORITHM, key_id, "signer-audit-key"
            )
            log.info("audit key generated in the token", extra={"key_id": key_id.hex()})
        return Signing(self.token.sign, key_id), public_der

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.cfg.metrics.listen and isinstance(self.metrics, metrics_mod.Exported):
            # First: a listener that cannot bind stops the start before anything else runs.
            self.metrics_listener = metrics_mod.Listener(
                self.cfg.metrics.listen, self.metrics.registry
            )
            log.info("metrics listening", extra={"address": self.metrics_listener.address})
        self.audit.on_change(lambda: self._availability_changed(True))
        self.audit.start(self._audit_key, self.cfg.audit.pinned_key)
        local = self._grpc_server(
            local_caller(self.relay),
            f"connect to {self.cfg.server.listen} (a local user)",
            metrics_mod.LOCAL,
        )
        _listen(local, self.relay.address, 0o600)
        self._servers.append(local)
        if self.cfg.server.front_socket:
            front = self._grpc_server(
                front_caller,
                "the TLS front gave no verified client certificate",
                metrics_mod.MTLS,
            )
            front_mode = int(self.cfg.server.front_socket_mode, 8)
            _listen(
                front,
                f"unix:{self.cfg.server.front_socket}",
                front_mode,
                self.cfg.server.front_socket_group,
            )
            self._servers.append(front)
        await self._set_health(False)
        if self.cfg.server.perturb_freed_memory:
            # Freed C heap (the RPC buffer that carried the PIN, request payloads) is overwritten.
            perturb_freed_memory()
        self.token.on_availability(self._availability_changed)
        self.token.on_availability(self._answer_queued_if_down)
        self.token.on_abandon(self._replace_stuck_lanes)
        self.token.on_availability(lambda up: self.audit.wake() if up else None)
        if self.admin_token is not self.token:
            # The administrative connection logs in once the signing one is up: at once.
            self.token.on_availability(lambda up: self.admin_token.wake() if up else None)
        await self.run_blocking(self.token.start)
        if self.admin_token is not self.token:
            await self.run_blocking(self.admin_token.start)
        await self._refresh_health()
        for server in self._servers:
            await server.start()
        await self.relay.start()
        self._reaper = asyncio.create_task(self._reap_forever())
        self._summaries = asyncio.create_task(self._record_throttled_forever())
        if self.publisher.enabled:
            self.keyring.on_change(self._key_changed)
            self._publishing = asyncio.create_task(self._publish_forever())
        # Everything made to start (modules, gRPC, the keyring, the policy) moves to the
        # collector's permanent generation: a full collection then walks only what calls make.
        # Measured at 666 sig/s paced: the full collection every 20 to 30 s took 14 ms (every
        # call in flight waited on it), 0.3 to 0.4 ms after the freeze (issue 18).
        gc.freeze()
        log.info(
            "algorithms offered", extra={"algorithms": ",".join(self.keyring.offered_algorithms())}
        )
        log.info(
            "service listening",
            extra={
                "address": self.cfg.server.listen,
                "front_socket": self.cfg.server.front_socket,
                "pkcs11_module": self.cfg.token.module,
                "policy": self.policy.source,
            },
        )

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, fn)

    def _availability_changed(self, up: bool) -> None:
        # Called from the token's threads; health belongs to the event loop. The coroutine reads
        # the token's state when it runs, so notifications that arrive out of order cannot leave
        # a stale status behind.
        loop = self._loop
        if loop is not None and not loop.is_closed() and not self._stopping:
            asyncio.run_coroutine_threadsafe(self._refresh_health(), loop)

    async def _refresh_health(self) -> None:
        """SERVING while the token answers and the audit log takes records."""
        async with self._health_lock:
            if not self._stopping:
                recording = self.audit.failure is None and self._audit_refusing() is None
                await self._set_health(self.token.available and recording)

    def _replace_stuck_lanes(self, since: float) -> None:
        """Lanes stuck for good in calls on a connection the token layer gave up: their calls
        are answered UNAVAILABLE (nothing was signed that anyone will see), new lanes serve."""
        replaced = self.lanes.replace_stuck(
            since,
            lambda: Unavailable("token unavailable: the token host went away during this call"),
        )
        if replaced:
            log.error(
                "lanes replaced: stuck in calls that never returned", extra={"lanes": replaced}
            )

    def _answer_queued_if_down(self, up: bool) -> None:
        """The token stopped answering: calls queued for a lane are answered now, not left
        behind lanes that may be stuck in it. (When it is down, they fail fast by themselves.)"""
        if up:
            return
        try:
            self.token.check_answering()
        except SignerError as exc:
            failed = self.lanes.fail_queued(functools.partial(type(exc), exc.message))
            if failed:
                log.warning(
                    "calls queued for the token answered",
                    extra={"calls": failed, "error": exc.message},
                )

    def _admit(self, caller: Caller) -> None:
        """Before a call runs: a revoked certificate is refused."""
        revoked = self.policy.revocation(caller)
        if revoked is not None:
            raise Unauthenticated(revoked)

    def _check_recording(self) -> None:
        """Before any call runs, even an unauthenticated one: refused while the audit log
        could not record it (counted, not recorded one by one)."""
        try:
            self.audit.check()
        except AuditPaused:
            self.audit.paused()
            raise

    def _audit_refusing(self) -> str | None:
        try:
            self.audit.check()
        except Unavailable as exc:
            return exc.message
        return None

    async def _set_health(self, up: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if up
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)
        if up != self._serving:
            self._serving = up
            log.info("health", extra={"serving": up})

    async def _record_throttled(self, everyone: bool = False) -> None:
        """One record per caller whose throttling ended: how many of its calls were refused
        meanwhile (operation ``Throttled``, the count as its version). Not while the log
        refuses calls: the counts wait for it."""
        if self._audit_refusing() is not None and not everyone:
            return
        for caller, calls in self.throttle.ended(everyone):
            log.warning("caller no longer throttled", extra={"caller": caller, "refused": calls})
            event = Event(
                self.keyring.now(),
                caller,
                "Throttled",
                "",
                calls,
                "",
                status_name(ResourceExhausted),
            )
            try:
                await self.audit.record(event)
            except SignerError as exc:
                log.error("throttling not recorded", extra={"caller": caller, "error": exc.message})

    async def _record_throttled_forever(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.throttle.window))
            await self._record_throttled()

    async def _reap_forever(self) -> None:
        interval = self.cfg.keys.reaper_interval_seconds
        while True:
            try:
                await self.run_blocking(self.keyring.reap)
            except SignerError as exc:
                log.warning("reaper failed", extra={"error": exc.message})
            except Exception:
                log.exception("reaper crashed")
            await asyncio.sleep(interval)

    def _key_changed(self) -> None:
        # From the thread that changed the key; the publisher runs on the event loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._publish_now.set)

    async def _publish_forever(self) -> None:
        """The issuers' documents, at start, every publish interval (which also catches what
        time alone changes: a next version becoming primary, a retired one's grace ending, a
        change made by another replica) and at once after a key change made here."""
        interval = self.cfg.jwt.publish_interval_seconds
        while True:
            self._publish_now.clear()
            try:
                # Failures are the publisher's to log, issuer by issuer; the files already
                # there stay served and the next tick tries again.
                done = await self.run_blocking(self.publisher.publish)
                self.metrics.issuers_published(done.failed == 0, done.written)
            except Exception:
                log.exception("publisher crashed")
                self.metrics.issuers_published(False, 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish_now.wait(), interval)

    async def stop(self) -> None:
        """Refuses new calls, drains in-flight ones (up to ``grace_seconds``), then closes."""
        self._stopping = True
        for task in (self._reaper, self._summaries, self._publishing):
            if task is not None:
                task.cancel()
        if self._servers:
            async with self._health_lock:
                await self._set_health(False)
            self.relay.close()  # no new local connections; open ones drain below
            await asyncio.gather(
                *(server.stop(self.cfg.server.grace_seconds) for server in self._servers)
            )
            self._servers = []
        if self._calls:
            # Calls whose callers have gone are still running; each is recorded when it ends.
            _, running = await asyncio.wait(
                list(self._calls), timeout=self.cfg.server.grace_seconds
            )
            if running:
                log.error(
                    "calls still running as the audit log closes: their outcomes may not be "
                    "recorded",
                    extra={"calls": len(running)},
                )
        await self._record_throttled(everyone=True)
        await self.relay.stop()
        # Calls gRPC gave up on may still be running in the pool: they finish before the token
        # and the store they use are closed.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.lanes.shutdown)
        await loop.run_in_executor(None, functools.partial(self.executor.shutdown, wait=True))
        await loop.run_in_executor(None, functools.partial(self.changes.shutdown, wait=True))
        self.audit.close()  # a last checkpoint, signed while the token is still open
        if self.admin_token is not self.token:
            self.admin_token.close()
        self.token.close()
        self.store.close()
        if self.metrics_listener is not None:
            # Last: what the service did up to its stop can still be scraped meanwhile.
            self.metrics_listener.stop()
            self.metrics_listener = None
        log.info("service stopped")

    async def wait(self) -> None:
        await asyncio.gather(*(server.wait_for_termination() for server in self._servers))


async def _serve(cfg: Config, policy: Policy | None, audit: Recorder | None) -> None:
    server = Server(cfg, policy=policy, audit=audit)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_policy)
    await stop.wait()
    log.info("shutting down")
    await server.stop()


def _unix_path(address: str) -> str:
    return address.removeprefix("unix://").removeprefix("unix:")


def _listen(server: grpc.aio.Server, address: str, socket_mode: int, group: str = "") -> None:
    """Binds Unix socket ``address``, created with ``socket_mode`` from the start (umask), not
    chmod-ed after a window in which anyone could connect. ``group``: the socket is that
    group's too (the front's own user reaches this socket and no other; its directory must let
    the group pass, as ``signer run``'s does)."""
    path = Path(_unix_path(address))
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    with created_with_mode(socket_mode):
        port = server.add_insecure_port(address)
    if port == 0:
        raise SignerError(f"cannot listen on {address}")
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"server.front_socket_group: no group {group!r}") from None
        share_with_group(path, gid, socket_mode)


def harden_process(cfg: Config) -> None:
    """What the service process sets about itself. Core dumps stay on (RLIMIT_CORE as inherited:
    a dump of this process holds no key and is how crashes get debugged); which memory they
    carry is chosen here rather than inherited. Its descriptor limit is raised to the most it
    may have, for the connections :func:`relay_limits` allows."""
    if cfg.server.coredump_filter:
        Path("/proc/self/coredump_filter").write_text(cfg.server.coredump_filter)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# Descriptors kept back from local connections: the gRPC servers, the front's connections, the
# token's, the databases, the log.
RESERVED_FDS = 256


def relay_limits(cfg: Config) -> Limits:
    """The local connection limits of ``cfg``, the total kept within the descriptor limit
    (three descriptors per relayed connection)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = max(1, (soft - RESERVED_FDS) // 3)
    total = min(cfg.server.max_connections, room)
    if total < cfg.server.max_connections:
        log.warning(
            "fewer local connections than configured: the descriptor limit is low",
            extra={"max_connections": total, "nofile": soft},
        )
    return Limits(
        per_uid=min(cfg.server.max_connections_per_uid, total),
        total=total,
        idle_seconds=cfg.server.idle_connection_seconds,
    )


def serve(cfg: Config, *, policy: Policy | None = None, audit: Recorder | None = None) -> int:
    """``signer serve``: runs until SIGTERM/SIGINT, then shuts down gracefully. ``policy``,
    ``audit``: as :class:`Server`'s (the benchmarks' bare server; ``signer serve`` passes
    neither)."""
    harden_process(cfg)
    asyncio.run(_serve(cfg, policy, audit))
    return 0
