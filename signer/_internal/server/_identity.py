"""Who is calling: how each listener names the caller of a call, and that caller for the call
being served.

A local caller is known by the uid (and user name) the relay read with SO_PEERCRED on the Unix
socket; a remote caller by the client certificate the mTLS front verified, named in headers that
are believed only on the front's own socket. :class:`signer._internal.server.CallInterceptor`
asks the listener's :data:`Identify` and sets :data:`CALLER` for the call's task.
"""

from __future__ import annotations

import contextvars
import pwd
import time
from collections.abc import Callable

import grpc

from signer._internal.front import ISSUER_HEADER, SERIAL_HEADER, SUBJECT_HEADER
from signer._internal.policy import Caller
from signer._internal.relay import PeerRelay

# The authenticated caller of the call being served (set by CallInterceptor for its task).
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller")
# Whom calls with no authenticated caller are counted under (places, refusals).
UNAUTHENTICATED = "(unauthenticated)"
# How a listener names the caller of a call (its gRPC context): None when it cannot.
Identify = Callable[[grpc.aio.ServicerContext], Caller | None]


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


class UserNames:
    """uid -> user name, each looked up again after ``seconds``. ``getpwuid`` reads and parses
    the password database (NSS) on every call: once per call it took 4% of the service's
    samples at peak load, 11% of the event loop's (py-spy, issue 18). A rename or a removed
    user is seen within ``seconds``, as with nscd's or sssd's caches; the uid, which grants
    may name too, is the relay's SO_PEERCRED and never cached. Only the event loop calls it."""

    def __init__(
        self,
        seconds: float = 10.0,
        most: int = 1024,
        lookup: Callable[[int], str | None] = _user_name,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._seconds, self._most, self._lookup, self._clock = seconds, most, lookup, clock
        self._known: dict[int, tuple[str | None, float]] = {}

    def __call__(self, uid: int) -> str | None:
        now = self._clock()
        known = self._known.get(uid)
        if known is not None and now < known[1]:
            return known[0]
        if len(self._known) >= self._most:
            self._known.clear()  # a bound, not an eviction policy: uids that call are few
        name = self._lookup(uid)
        self._known[uid] = (name, now + self._seconds)
        return name


def local_caller(relay: PeerRelay) -> Identify:
    """Callers of the Unix socket: the uid (and user name) the relay read with SO_PEERCRED."""
    user_of = UserNames()

    def identify(context: grpc.aio.ServicerContext) -> Caller | None:
        creds = relay.credentials(context.peer())
        if creds is None:
            return None
        uid = creds[0]
        return Caller.unix(uid, user_of(uid))

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
