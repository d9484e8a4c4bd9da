"""The gRPC server: callers, authorisation, servicer, errors, health, reflection, shutdown.

The service never listens on a network. Local callers reach it through the Unix socket served
by :class:`signer._internal.relay.PeerRelay` (their uid from SO_PEERCRED); remote callers through
the mTLS
front, which connects to a socket of its own (``server.front_socket``) and names the verified
client certificate in headers that are believed there and nowhere else. Each listener gets its
own gRPC server with a :class:`CallInterceptor` that knows how its callers are identified.

The servicer translates between protobuf and :mod:`signer._internal.keyring` and asks the policy
before
each call; every call into the service runs on a thread pool sized to the token's session pool,
so PKCS#11 and SQLite never block the event loop. :class:`CallInterceptor` is the one place our
errors become gRPC statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import grp
import hashlib
import json
import logging
import pwd
import resource
import secrets
import signal
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from signer._internal import policy as policy_mod
from signer._internal.audit import (
    AUDIT_ALGORITHM,
    AuditLog,
    AuditPaused,
    Event,
    MakeKey,
    Signing,
    SQLiteAuditStore,
    witnesses,
)
from signer._internal.config import Config
from signer._internal.files import share_with_group
from signer._internal.front import ISSUER_HEADER, SERIAL_HEADER, SUBJECT_HEADER
from signer._internal.keyring import BATCH_CHUNK, Clock, Signer, utcnow
from signer._internal.lanes import Lanes
from signer._internal.logs import Every
from signer._internal.policy import Caller, Policy
from signer._internal.relay import Limits, PeerRelay, created_with_mode
from signer._internal.store import SQLiteStore
from signer._internal.throttle import REFUSALS, InFlight, RefusalThrottle
from signer._internal.token import Pin, Token, object_uri
from signer._internal.token.pin import perturb_freed_memory
from signer._wire import status_name, status_of
from signer.errors import (
    ConfigError,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    SignerError,
    Unauthenticated,
    Unavailable,
    shown,
)
from signer.keys import (
    DEFAULT_SCOPE,
    Key,
    Padding,
    SigFormat,
    State,
    Version,
    check_name,
    check_scope,
    public_jwk_json,
    public_pem,
    valid_name,
)
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# Sessions of the administrative connection: enough for the admin pool's threads to queue on
# (the token host serves one connection's calls in order anyway).
ADMIN_SESSIONS = 2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SignerService"].full_name


_STATE_TO_PB = {
    State.ENABLED: pb.ENABLED,
    State.DISABLED: pb.DISABLED,
    State.DESTRUCTION_SCHEDULED: pb.DESTRUCTION_SCHEDULED,
    State.DESTROYED: pb.DESTROYED,
}


# The authenticated caller of the call being served (set by CallInterceptor for its task).
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller")
# Callable without an identity: load balancers' health checks and server reflection.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
Identify = Callable[[grpc.aio.ServicerContext], Caller | None]
Audit = Callable[[str, Caller | None, Any, Any, SignerError | None, bool], Awaitable[None]]
# Appended to the status of a call that finished after its caller had gone (cancelled, or past
# its deadline): the outcome happened, but the caller was told CANCELLED or DEADLINE_EXCEEDED.
CALLER_GONE = " (caller gone)"
# Request fields whose SHA-256 the audit log records (never the bytes themselves).
_PAYLOAD_FIELDS = ("message", "digest", "wrapped_key", "claims")


def audit_event(
    now: datetime,
    method: str,
    caller: Caller | None,
    request: Any,
    response: Any,
    error: SignerError | None,
    gone: bool = False,
) -> Event:
    """What the audit log keeps of one call: never its payload, only its digest. ``gone``: the
    caller stopped waiting before the answer (its status then says so)."""
    payload = b""
    for name in _PAYLOAD_FIELDS:
        value = getattr(request, name, b"")
        if isinstance(value, bytes) and value:
            payload = value
            break
    items = getattr(request, "items", None)
    if items is not None and not payload:
        # A batch: the digest of the items' digests, in order (a caller can recompute it).
        payload = b"".join(hashlib.sha256(item.message or item.digest).digest() for item in items)
    # The version the call used or made: a signature's, or a key's primary (a rotation, an
    # import, a creation), else the one the request named.
    version = 0
    if response is not None:
        version = getattr(response, "version", 0) or getattr(response, "primary_version", 0)
    return Event(
        time=now,
        caller=caller.identity if caller is not None else "unauthenticated",
        operation=method.rsplit("/", 1)[-1],
        key=_recorded_name(str(getattr(request, "name", ""))),
        version=int(version or getattr(request, "version", 0) or 0),
        payload_sha256=hashlib.sha256(payload).hexdigest() if payload else "",
        status=("OK" if error is None else status_name(error)) + (CALLER_GONE if gone else ""),
    )


def _recorded_name(name: str) -> str:
    """A key name as the record keeps it: as given when valid, else bounded (a caller with no
    grant at all must not be able to write 600,000 characters into every record)."""
    return name if not name or valid_name(name) else shown(name)


# A log line a caller can trigger at will is written at most this often per kind.
LOG_EVERY_SECONDS = 5.0
# Whom calls with no authenticated caller are counted under (places, refusals).
UNAUTHENTICATED = "(unauthenticated)"


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Names the caller (``identify``; none: UNAUTHENTICATED), records the outcome, and maps
    :class:`SignerError` to its status; anything else to INTERNAL with a bland message.

    Each call runs in a task of its own that the caller cannot cancel. gRPC cancels a handler
    whose caller went away (a cancelled call, a deadline that passed), but work already handed
    to a thread goes on and may create, change or use a key: so the call finishes regardless and
    its outcome is recorded, marked as one its caller did not receive (issue 11). ``calls``
    holds every call still running, for a shutdown that waits for them."""

    def __init__(
        self,
        identify: Identify,
        how: str,
        audit: Audit | None = None,
        calls: set[asyncio.Task[Any]] | None = None,
        throttle: RefusalThrottle | None = None,
        gate: Callable[[Caller], None] | None = None,
        in_flight: InFlight | None = None,
        paused: Callable[[], None] | None = None,
    ) -> None:
        self._identify = identify
        self._how = how  # for the UNAUTHENTICATED message
        self._audit = audit
        self._calls: set[asyncio.Task[Any]] = set() if calls is None else calls
        self._throttle = throttle
        # Raise before a call runs: ``gate`` UNAUTHENTICATED for a revoked certificate (the
        # refusal is recorded); ``paused`` AuditPaused while no outcome could be recorded (the
        # refusal is counted, not recorded).
        self._gate = gate
        self._paused = paused
        self._in_flight = in_flight
        self._said = Every(LOG_EVERY_SECONDS)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # health Watch and reflection streams pass through untouched
        inner = handler.unary_unary
        method = handler_call_details.method
        public = method.startswith(PUBLIC_PREFIXES)
        parse = handler.request_deserializer

        async def outcome(raw: Any, context: Any, gone: _Gone) -> tuple[Any, SignerError | None]:
            GONE.set(gone)
            request, malformed = _parsed(parse, raw)
            caller: Caller | None = None
            response: Any = None
            error: SignerError | None = None
            # A running call holds its place until its record is written.
            identity = UNAUTHENTICATED
            with contextlib.ExitStack() as running:
                try:
                    if not public:
                        caller = self._identify(context)
                        if caller is not None:
                            identity = caller.identity
                            CALLER.set(caller)
                        # Throttled, or the log cannot record: not recorded one by one.
                        refused = self._refused_before_running(identity, caller)
                        if refused is not None:
                            return None, refused  # counted, for one record later
                        # Every call that will be recorded holds a place first, refused ones
                        # too (a revoked certificate, no caller at all): what a burst can make
                        # the log write is bounded by the places and the refusal budget.
                        running.enter_context(self._running(identity, caller))
                        if caller is None:
                            raise Unauthenticated(f"no authenticated caller: {self._how}")
                        if self._gate is not None:
                            self._gate(caller)  # a revoked certificate
                    if malformed is not None:
                        raise malformed
                    response = await inner(request, context)
                except SignerError as exc:
                    # Once per caller, method and status every few seconds: a caller can fail
                    # calls at will (each one is in the audit log, which is where to count them).
                    held = self._said.due(f"{identity} {method} {status_name(exc)}")
                    if held is not None:
                        log.info(
                            "rpc failed",
                            extra={"method": method, "code": status_name(exc),
                                   "error": exc.message, "like_it_unlogged": held},
                        )  # fmt: skip
                    error = exc
                except grpc.aio.AbortError:
                    raise
                except Exception:
                    log.exception("rpc crashed", extra={"method": method})
                    error = Internal("internal error (see the service log)")
                if error is not None and not public and isinstance(error, REFUSALS):
                    # Counted before its record is awaited: a burst arriving meanwhile meets
                    # the throttle once the budget is spent, not after every record is written.
                    self._count_refusal(identity)
                if self._audit is not None and not public:
                    try:
                        # Recorded before the answer leaves; if it cannot be, there is no
                        # answer but UNAVAILABLE (a signature already made is dropped).
                        await self._audit(method, caller, request, response, error, gone.gone)
                    except SignerError as exc:
                        error = exc
            return response, error

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            gone = _Gone()
            call = asyncio.ensure_future(outcome(request, context, gone))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)
            try:
                response, error = await asyncio.shield(call)
            except asyncio.CancelledError:
                if not call.done():
                    gone.gone = True
                    held = self._said.due(f"gone {method}")
                    if held is not None:
                        log.warning(
                            "caller gone before the answer: the call finishes and is recorded",
                            extra={"method": method, "like_it_unlogged": held},
                        )
                raise
            if error is not None:
                await context.abort(status_of(error), error.message)
            return response

        # The request is parsed in the call (_parsed), not by gRPC: gRPC answers bytes that are
        # not the method's request UNKNOWN ("Unexpected DecodeError"), unrecorded and uncounted;
        # they are a caller's bad input like any other (issue 12).
        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    @contextlib.contextmanager
    def _running(self, identity: str, caller: Caller | None) -> Iterator[None]:
        """Counts the call as running while inside; RESOURCE_EXHAUSTED if it may not run."""
        if self._in_flight is None:
            yield
            return
        busy = self._in_flight.enter(identity)
        if busy is not None:
            raise ResourceExhausted(f"{caller.display if caller else identity}: {busy}")
        try:
            yield
        finally:
            self._in_flight.leave(identity)

    def _refused_before_running(self, identity: str, caller: Caller | None) -> SignerError | None:
        """A refusal not recorded on its own: the caller is throttled (one record counts its
        calls when that ends), or the audit log cannot record (one record counts them when it
        can again). Other refusals (a revoked certificate) raise later, and are recorded."""
        wait = self._throttle.wait(identity) if self._throttle is not None else 0.0
        if wait:
            assert self._throttle is not None
            return ResourceExhausted(
                f"{caller.display if caller else identity}: {self._throttle.budget} calls "
                f"refused in {self._throttle.window:g} s; its calls are refused for "
                f"{wait:.0f} s more"
            )
        if self._paused is not None:
            try:
                self._paused()
            except AuditPaused as exc:
                return exc
        return None

    def _count_refusal(self, identity: str) -> None:
        if self._throttle is not None and self._throttle.refused(identity):
            log.warning(
                "caller throttled: too many refused calls",
                extra={"caller": identity, "seconds": self._throttle.window},
            )


def _parsed(parse: Callable[[bytes], Any] | None, raw: Any) -> tuple[Any, SignerError | None]:
    """The request, or (None, INVALID_ARGUMENT naming the request type) for bytes that are not
    one: the call is then refused after its caller is known, and recorded."""
    if parse is None:
        return raw, None
    try:
        return parse(raw), None
    except Exception as exc:  # google.protobuf.message.DecodeError, whatever the parser says
        cls = getattr(parse, "__self__", None)
        descriptor = getattr(cls, "DESCRIPTOR", None)
        what = getattr(descriptor, "full_name", "request message")
        # "Error parsing message with type 'X': Wire format was corrupt": the parser's words,
        # never the caller's bytes.
        reason = str(exc).rsplit(": ", 1)[-1] if ": " in str(exc) else "it does not parse"
        return None, InvalidArgument(f"the request is not a valid {what}: {reason[:100]}")


class _Gone:
    """Set when a call's caller stopped waiting for it (cancelled, or past its deadline)."""

    gone = False


# The call being served's: whether its caller has gone (long calls stop early then).
GONE: contextvars.ContextVar[_Gone | None] = contextvars.ContextVar("gone", default=None)


def local_caller(relay: PeerRelay) -> Identify:
    """Callers of the Unix socket: the uid (and user name) the relay read with SO_PEERCRED."""

    def identify(context: grpc.aio.ServicerContext) -> Caller | None:
        creds = relay.credentials(context.peer())
        if creds is None:
            return None
        uid = creds[0]
        try:
            user: str | None = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = None
        return Caller.unix(uid, user)

    return identify


def front_caller(context: grpc.aio.ServicerContext) -> Caller | None:
    """Callers through the mTLS front: the client certificate nginx verified, by its subject,
    issuer and serial. Only the front can connect to the socket whose server uses this."""
    headers = {key: str(value) for key, value in context.invocation_metadata() or ()}
    subject = headers.get(SUBJECT_HEADER)
    issuer = headers.get(ISSUER_HEADER)
    serial = headers.get(SERIAL_HEADER)
    if not (subject and issuer and serial):
        return None  # the front names all three of a certificate it verified
    return Caller.x509(subject, issuer, serial)


def _ts(t: datetime | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


class SignerServicer(pb_grpc.SignerServiceServicer):
    def __init__(
        self,
        signer: Signer,
        token: Token,
        lanes: Lanes,
        admin: ThreadPoolExecutor,
        policy: Callable[[], Policy],
        changes: ThreadPoolExecutor | None = None,
    ) -> None:
        self._signer = signer
        self._token = token
        self._lanes = lanes
        self._admin = admin
        self._changes = changes or admin
        self._policy = policy

    # Where blocking work runs. The lanes serve the signing path: quick calls share a lane's
    # batch, a SignBatch chunk takes a lane alone. State changes have a small pool of their
    # own (_run_change). Everything else (key generation, import, listings) runs on the admin
    # pool, so that two RSA-4096 key generations (seconds each) cannot take both lanes.
    # (p11-kit's token host serves one connection's calls in order: there a generation delays
    # the signatures behind it anyway.)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._admin, functools.partial(fn, *args))

    async def _run_change(self, fn: Callable[..., T], *args: Any) -> T:
        """A state change (set primary, disable, enable, schedule or cancel a destruction):
        quick, store-only, and what an operator reaches for in an emergency, so on a pool of
        its own, never queued behind key generations a caller has piled onto the admin pool
        (review of issue 12: 128 RSA-4096 rotations held a Disable for minutes)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._changes, functools.partial(fn, *args))

    async def _run_quick(self, fn: Callable[..., T], *args: Any) -> T:
        """One signature, one verification, one metadata read: may share a lane's batch."""
        self._token.check_answering()  # not behind lanes stuck in a token that does not answer
        return await self._lanes.run(functools.partial(fn, *args), quick=True)

    # --- authorisation ------------------------------------------------------------------------

    async def _allow(self, operation: str, name: str) -> None:
        """PERMISSION_DENIED unless the caller may ``operation`` key ``name``. The answer is the
        same whether or not the key exists, unless a grant names the key by pattern: callers
        learn nothing of keys they cannot see. A malformed name is INVALID_ARGUMENT first, so
        that nothing unchecked reaches the store, a message or the log."""
        check_name(name)
        scope = self._signer.cached_scope(name)
        if scope is None:
            scope = await self._run_quick(self._signer.scope_of, name)
        caller = CALLER.get()
        if not self._policy().allows(caller, operation, name, scope):
            raise PermissionDenied(f"{caller.display} may not {operation} key {name!r}")

    async def _allow_new(self, operation: str, name: str, scope: str) -> None:
        """For a key about to be created (create, import of a new key) in ``scope``."""
        check_name(name)
        check_scope(scope)
        caller = CALLER.get()
        if not self._policy().allows_new(caller, operation, name, scope or DEFAULT_SCOPE):
            raise PermissionDenied(
                f"{caller.display} may not {operation} key {name!r} in scope "
                f"{scope or DEFAULT_SCOPE!r}"
            )

    # --- conversions --------------------------------------------------------------------------

    def _version_pb(self, v: Version) -> pb.KeyVersion:
        return pb.KeyVersion(
            name=v.name,
            version=v.version,
            algorithm=v.algorithm,
            state=_STATE_TO_PB[v.state],
            create_time=_ts(v.created),
            destroy_time=_ts(v.destroy_at),
            pkcs11_uri=""
            if v.state is State.DESTROYED
            else object_uri(self._token.label, f"{v.name}/v{v.version}", v.key_id),
        )

    def _key_pb(self, k: Key) -> pb.Key:
        return pb.Key(
            name=k.name,
            algorithm=k.algorithm,
            primary_version=k.primary,
            versions=[self._version_pb(v) for v in k.versions],
            create_time=_ts(k.created),
            scope=k.scope,
            labels=k.labels,
        )

    @staticmethod
    def _input(request: Any) -> tuple[bytes | None, bytes | None]:
        which = request.WhichOneof("input")
        return (
            request.message if which == "message" else None,
            request.digest if which == "digest" else None,
        )

    @staticmethod
    def _fmt(value: int) -> SigFormat:
        return SigFormat.RAW if value == pb.RAW else SigFormat.DER

    @staticmethod
    def _pad(value: int) -> Padding:
        return Padding.PKCS1V15 if value == pb.PKCS1V15 else Padding.PSS

    # --- RPCs ---------------------------------------------------------------------------------

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Any) -> pb.Key:
        await self._allow_new("create", request.name, request.scope)
        key = await self._run(
            self._signer.create_key,
            request.name,
            request.algorithm,
            request.scope,
            dict(request.labels),
        )
        return self._key_pb(key)

    async def GetKey(self, request: pb.GetKeyRequest, context: Any) -> pb.Key:
        await self._allow("read", request.name)
        return self._key_pb(await self._run_quick(self._signer.get_key, request.name))

    def _may_read_any(self) -> tuple[Caller, Policy]:
        """A caller with no read grant at all is refused a listing (rather than given an empty
        one), so its calls count against its refusal budget like any other refusal."""
        caller, policy = CALLER.get(), self._policy()
        if not policy.allows_any(caller, "read"):
            raise PermissionDenied(f"{caller.display} may not read keys")
        return caller, policy

    async def ListKeys(self, request: pb.ListKeysRequest, context: Any) -> pb.ListKeysResponse:
        caller, policy = self._may_read_any()

        def visible(k: Key) -> bool:
            return policy.allows(caller, "read", k.name, k.scope)

        keys, token = await self._run(
            self._signer.list_keys, request.page_size, request.page_token, visible
        )
        return pb.ListKeysResponse(keys=[self._key_pb(k) for k in keys], next_page_token=token)

    async def GetPublicKey(self, request: pb.GetPublicKeyRequest, context: Any) -> pb.PublicKey:
        await self._allow("read", request.name)
        v, alg = await self._run_quick(self._signer.public_key, request.name, request.version)
        out = pb.PublicKey(name=v.name, version=v.version, algorithm=alg.name)
        if request.format == pb.JWK:
            out.jwk = public_jwk_json(v.public_key_der, alg, f"{v.name}/{v.version}")
        else:
            out.pem = public_pem(v.public_key_der)
        return out

    async def Sign(self, request: pb.SignRequest, context: Any) -> pb.SignResponse:
        await self._allow("sign", request.name)
        message, digest = self._input(request)
        r = await self._run_quick(
            self._signer.sign,
            request.name,
            request.version,
            message,
            digest,
            self._fmt(request.signature_format),
            self._pad(request.rsa_padding),
        )
        return pb.SignResponse(
            signature=r.signature,
            version=r.version,
            algorithm=r.algorithm,
            signature_algorithm=r.signature_algorithm,
        )

    async def Verify(self, request: pb.VerifyRequest, context: Any) -> pb.VerifyResponse:
        await self._allow("verify", request.name)
        message, digest = self._input(request)
        valid, version = await self._run_quick(
            self._signer.verify,
            request.name,
            request.version,
            message,
            digest,
            request.signature,
            self._fmt(request.signature_format),
            self._pad(request.rsa_padding),
        )
        return pb.VerifyResponse(valid=valid, version=version)

    async def RotateKey(self, request: pb.RotateKeyRequest, context: Any) -> pb.Key:
        await self._allow("rotate", request.name)
        return self._key_pb(await self._run(self._signer.rotate, request.name))

    async def SetPrimaryVersion(self, request: pb.SetPrimaryVersionRequest, context: Any) -> pb.Key:
        await self._allow("rotate", request.name)
        return self._key_pb(
            await self._run_change(self._signer.set_primary, request.name, request.version)
        )

    async def DisableKeyVersion(self, request: pb.KeyVersionRequest, context: Any) -> pb.KeyVersion:
        await self._allow("disable", request.name)
        return self._version_pb(
            await self._run_change(self._signer.disable, request.name, request.version)
        )

    async def EnableKeyVersion(self, request: pb.KeyVersionRequest, context: Any) -> pb.KeyVersion:
        await self._allow("disable", request.name)
        return self._version_pb(
            await self._run_change(self._signer.enable, request.name, request.version)
        )

    async def ScheduleKeyVersionDestruction(
        self, request: pb.ScheduleKeyVersionDestructionRequest, context: Any
    ) -> pb.KeyVersion:
        await self._allow("destroy", request.name)
        return self._version_pb(
            await self._run_change(
                self._signer.schedule_destruction,
                request.name,
                request.version,
                request.waiting_period_seconds,
            )
        )

    async def CancelKeyVersionDestruction(
        self, request: pb.KeyVersionRequest, context: Any
    ) -> pb.KeyVersion:
        await self._allow("destroy", request.name)
        return self._version_pb(
            await self._run_change(self._signer.cancel_destruction, request.name, request.version)
        )

    async def SignBatch(self, request: pb.SignBatchRequest, context: Any) -> pb.SignBatchResponse:
        await self._allow("sign", request.name)
        items = [self._input(item) for item in request.items]
        # The signing path, so on the lanes: the plan (hashing up to 1,000 items) and each chunk
        # as a job of its own, so that calls queued meanwhile go between them.
        self._token.check_answering()
        plan = await self._lanes.run(
            functools.partial(
                self._signer.plan_batch,
                request.name,
                request.version,
                items,
                self._fmt(request.signature_format),
                self._pad(request.rsa_padding),
            )
        )
        for start in range(0, len(plan.jobs), BATCH_CHUNK):
            if (gone := GONE.get()) is not None and gone.gone:  # nobody will see the rest
                plan.abandon(start)
                break
            await self._lanes.run(functools.partial(self._signer.sign_chunk, plan, start))
        r = plan.result()
        return pb.SignBatchResponse(
            results=[
                pb.SignBatchResult(error={"code": status_of(x).value[0], "message": x.message})
                if isinstance(x, SignerError)
                else pb.SignBatchResult(signature=x)
                for x in r.results
            ],
            version=r.version,
            algorithm=r.algorithm,
            signature_algorithm=r.signature_algorithm,
        )

    async def SignJWT(self, request: pb.SignJWTRequest, context: Any) -> pb.SignJWTResponse:
        await self._allow("sign", request.name)
        r = await self._run_quick(self._signer.sign_jwt, request.name, request.claims)
        return pb.SignJWTResponse(token=r.token, kid=r.kid, alg=r.alg, version=r.version)

    async def GetJWKS(self, request: pb.GetJWKSRequest, context: Any) -> pb.GetJWKSResponse:
        caller, policy = self._may_read_any()

        def visible(k: Key) -> bool:
            return policy.allows(caller, "read", k.name, k.scope)

        jwks = await self._run(self._signer.jwks, request.scope, visible)
        return pb.GetJWKSResponse(jwks=json.dumps(jwks, sort_keys=True))

    async def GetImportParameters(
        self, request: pb.GetImportParametersRequest, context: Any
    ) -> pb.ImportParameters:
        caller = CALLER.get()
        if not self._policy().allows_any(caller, "import"):
            raise PermissionDenied(f"{caller.display} may not import keys")
        p = await self._run(self._signer.get_import_parameters, caller.identity)
        return pb.ImportParameters(
            import_token=p.token.token,
            wrapping_public_key_pem=public_pem(p.token.public_key_der),
            wrapping_algorithm=p.wrapping_algorithm,
            expire_time=_ts(p.token.expires),
            supported_algorithms=p.supported_algorithms,
            two_step_wrapping_algorithm=p.two_step_wrapping_algorithm,
        )

    async def ImportKeyVersion(self, request: pb.ImportKeyVersionRequest, context: Any) -> pb.Key:
        name, scope = check_name(request.name), check_scope(request.scope)
        caller, policy = CALLER.get(), self._policy()

        def authorise(existing: Key | None) -> None:
            # Decided under the key's lock, on the key as it is then. A new version of an
            # existing key becomes its primary, as a rotation does: it needs both grants. The
            # refusal is the same whether or not the key exists.
            if existing is None:
                ok = policy.allows_new(caller, "import", name, scope or DEFAULT_SCOPE)
            else:
                ok = all(
                    policy.allows(caller, op, name, existing.scope) for op in ("import", "rotate")
                )
            if not ok:
                raise PermissionDenied(f"{caller.display} may not import key {name!r}")

        key = await self._run(
            functools.partial(
                self._signer.import_key_version,
                name,
                request.algorithm,
                request.import_token,
                request.wrapped_key,
                scope,
                dict(request.labels),
                request.public_key_der,
                caller=caller.identity,
                authorise=authorise,
            )
        )
        return self._key_pb(key)


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
    ) -> None:
        """``policy`` and ``audit``: parts given rather than built from ``cfg`` (the policy
        file, the audit log). Nothing in the service passes them; the benchmarks do, to measure
        what authorisation and the audit log cost. A given policy is kept on SIGHUP."""
        self.cfg = cfg
        self.policy_from_file = policy is None
        self.token = Token(cfg.token, Pin(cfg.token.pin_file))
        # Slow token work (key generation, wrapping keys, unwrapping) on a connection of its
        # own where the module gives one, so that it never holds up a signature.
        self.admin_token = (
            Token(
                replace(cfg.token, sessions=ADMIN_SESSIONS),
                Pin(cfg.token.pin_file),
                follows=self.token,
            )
            if cfg.token.admin_connection
            else self.token
        )
        self.store = SQLiteStore(cfg.store.path)
        self.signer = Signer(cfg, self.token, self.store, clock, self.admin_token)
        # The signing path's blocking work runs on lanes; the executor takes the administrative
        # calls (see SignerServicer._run), start-up, the reaper and shutdown.
        self.lanes = Lanes(cfg.token.lanes, name="token")
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="signer")
        self.changes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="change")
        self.health = health_aio.HealthServicer()
        self.policy: Policy = self._load_policy() if policy is None else policy
        self.audit: Recorder = (
            AuditLog(
                SQLiteAuditStore(cfg.audit.path),
                cfg.audit.checkpoint_every,
                cfg.audit.checkpoint_interval_seconds,
                cfg.audit.max_unsigned_records,
                witnesses(cfg.audit),
                clock=self.signer.now,
            )
            if audit is None
            else audit
        )
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
            return False
        self.policy = new
        log.info("policy reloaded", extra={"grants": len(new.grants), "file": new.source})
        return True

    def _grpc_server(self, identify: Identify, how: str) -> grpc.aio.Server:
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
                )
            ],
            options=[
                ("grpc.max_receive_message_length", grpc_limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
        )
        servicer = SignerServicer(
            self.signer, self.token, self.lanes, self.executor, lambda: self.policy, self.changes
        )
        pb_grpc.add_SignerServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
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
        event = audit_event(self.signer.now(), method, caller, request, response, error, gone)
        await self.audit.record(event)

    def _audit_key(
        self, recorded: tuple[bytes, bytes] | None, pinned: bytes | None
    ) -> tuple[Signing, bytes] | None:
        """The audit key (signer._internal.audit's MakeKey): the recorded one; else the pinned one,
        found
        in the token by its public key (a first checkpoint cut short after the pin was written),
        None if the token holds no such audit key; else a new pair generated in the token."""
        if recorded is not None:
            key_id, public_der = recorded
        elif pinned is not None:
            token = self.signer.slow_token()
            found = {o.key_id for o in token.objects()
                     if o.label == "signer-audit-key" and o.public_der == pinned}  # fmt: skip
            held = [k for k in sorted(found)
                    if token.holds_private_half(k, AUDIT_ALGORITHM, pinned)]  # fmt: skip
            if not held:
                return None
            key_id, public_der = held[0], pinned
            log.info("pinned audit key adopted", extra={"key_id": key_id.hex()})
        else:
            key_id = secrets.token_bytes(16)
            public_der = self.signer.slow_token().generate(
                AUDIT_ALGORITHM, key_id, "signer-audit-key"
            )
            log.info("audit key generated in the token", extra={"key_id": key_id.hex()})
        return Signing(self.token.sign, key_id), public_der

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.audit.on_change(lambda: self._availability_changed(True))
        self.audit.start(self._audit_key, self.cfg.audit.pinned_key)
        local = self._grpc_server(
            local_caller(self.relay), f"connect to {self.cfg.server.listen} (a local user)"
        )
        _listen(local, self.relay.address, 0o600)
        self._servers.append(local)
        if self.cfg.server.front_socket:
            front = self._grpc_server(
                front_caller, "the TLS front gave no verified client certificate"
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
        log.info(
            "algorithms offered", extra={"algorithms": ",".join(self.signer.offered_algorithms())}
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
            log.error("lanes replaced: stuck in calls that never returned",
                      extra={"lanes": replaced})  # fmt: skip

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
                self.signer.now(),
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
                await self.run_blocking(self.signer.reap)
            except SignerError as exc:
                log.warning("reaper failed", extra={"error": exc.message})
            except Exception:
                log.exception("reaper crashed")
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        """Refuses new calls, drains in-flight ones (up to ``grace_seconds``), then closes."""
        self._stopping = True
        for task in (self._reaper, self._summaries):
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
