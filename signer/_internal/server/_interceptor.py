"""Around every call: :class:`CallInterceptor`.

It names the caller (:mod:`._identity`), admits the call or not (a revoked certificate, an
audit log that cannot record, a caller throttled for its refusals, no place left in flight),
runs it in a task its caller cannot cancel, records its outcome in the audit log
(:func:`audit_event`: never the payload, only its digest) before the answer leaves, and answers
an error with the status :func:`signer._wire.status_of` gives it (the one table, which
SignBatch's per-item statuses and the CLI read too).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any

import grpc

from signer._internal.audit import AuditPaused, Event
from signer._internal.logs import Every
from signer._internal.metrics import ANONYMOUS, LOCAL, OFF, Metrics
from signer._internal.policy import Caller
from signer._internal.server._identity import CALLER, UNAUTHENTICATED, Identify
from signer._internal.server._operations import RPC, rpc_name
from signer._internal.throttle import REFUSALS, InFlight, RefusalThrottle
from signer._wire import status_name, status_of
from signer.errors import (
    Internal,
    InvalidArgument,
    ResourceExhausted,
    SignerError,
    Unauthenticated,
    shown,
)
from signer.keys import valid_name

log = logging.getLogger("signer.server")  # named for the component: signer._internal.logs

# Callable without an identity: load balancers' health checks and server reflection.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Records a call's outcome: (method, caller, request, response, error, caller gone).
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
    # import, a creation) or, while one waits to become primary, its next (an issuer's key's
    # rotation made that one), else the one the request named.
    version = 0
    if response is not None:
        version = (
            getattr(response, "version", 0)
            or getattr(response, "next_primary_version", 0)
            or getattr(response, "primary_version", 0)
        )
    return Event(
        time=now,
        caller=caller.identity if caller is not None else "unauthenticated",
        operation=rpc_name(method),  # the RPC: its grant is OPERATION_OF[operation]
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


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Names the caller (``identify``; none: UNAUTHENTICATED), records the outcome, and maps
    :class:`SignerError` to its status; anything else to INTERNAL with a bland message.

    Each call runs in a task of its own that the caller cannot cancel. gRPC cancels a handler
    whose caller went away (a cancelled call, a deadline that passed), but work already handed
    to a thread goes on and may create, change or use a key: so the call finishes regardless and
    its outcome is recorded, marked as one its caller did not receive (issue 11). ``calls``
    holds every call still running, for a shutdown that waits for them. ``metrics`` counts
    each call's outcome once it is recorded, with the status its caller was answered, its caller
    counted as ``kind`` (the listener's: local, mtls) or anonymous when there is none. A call
    whose caller stopped waiting is counted CANCELLED, whatever its own outcome (the audit log
    has that): its caller got no answer from the service (it saw CANCELLED, or
    DEADLINE_EXCEEDED when its deadline passed). Not counted: calls gRPC answers before this
    interceptor runs (an unknown method, a message over the size limit), and a handler's own
    ``context.abort`` (re-raised as it is; the service's handlers raise SignerError instead)."""

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
        metrics: Metrics = OFF,
        kind: str = LOCAL,
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
        self._metrics = metrics
        self._kind = kind

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
        rpc = rpc_name(method)
        public = method.startswith(PUBLIC_PREFIXES)
        parse = handler.request_deserializer

        async def outcome(
            raw: Any, context: Any, gone: _Gone
        ) -> tuple[Any, SignerError | None, Caller | None]:
            GONE.set(gone)
            RPC.set(rpc)
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
                            return None, refused, caller  # counted, for one record later
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
                            extra={
                                "method": method,
                                "code": status_name(exc),
                                "error": exc.message,
                                "like_it_unlogged": held,
                            },
                        )
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
            return response, error, caller

        async def measured(raw: Any, context: Any, gone: _Gone) -> tuple[Any, SignerError | None]:
            """The call's outcome, counted (after its record: the status it is answered)."""
            began = time.perf_counter()
            response, error, caller = await outcome(raw, context, gone)
            # A caller gone was told CANCELLED (or DEADLINE_EXCEEDED), not the service's answer.
            answered = "OK" if error is None else status_name(error)
            code = "CANCELLED" if gone.gone else answered
            self._metrics.call(
                rpc,
                code,
                ANONYMOUS if caller is None else self._kind,
                time.perf_counter() - began,
                None if gone.gone else response,  # a batch's items: only if they were answered
            )
            return response, error

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            gone = _Gone()
            call = asyncio.ensure_future(measured(request, context, gone))
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
