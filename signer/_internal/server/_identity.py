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
