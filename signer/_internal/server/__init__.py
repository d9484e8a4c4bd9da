"""The gRPC server: who is calling, what each call may do and what it leaves on record, the RPCs,
and the service's assembly and lifetime.

The service never listens on a network. Local callers reach it through the Unix socket served
by :class:`signer._internal.relay.PeerRelay` (their uid from SO_PEERCRED); remote callers through
the mTLS front, which connects to a socket of its own (``server.front_socket``) and names the
verified client certificate in headers that are believed there and nowhere else. Each listener
gets its own gRPC server with a :class:`CallInterceptor` that knows how its callers are
identified.

Its parts, each a module here:

- ``_identity``: who is calling: :func:`local_caller` (SO_PEERCRED, through the relay),
  :func:`front_caller` (the front's headers), :data:`CALLER` for the call being served,
  :data:`UNAUTHENTICATED`.
- ``_interceptor``: :class:`CallInterceptor`, around every call: admission (a revoked
  certificate, an audit log that cannot record), places in flight, the refusal throttle, the
  audit record of each outcome (:func:`audit_event`), and each error answered with the status
  the one table gives it (:func:`signer._wire.status_of`).
- ``_operations``: :data:`OPERATION_OF`, which policy operation each RPC needs, written down
  once: the servicer's authorisation looks it up by the RPC the interceptor names (:data:`RPC`),
  the name the audit log records the call under.
- ``_servicer``: :class:`SignerServicer`, the RPCs: the policy asked, then the keyring
  (:mod:`signer._internal.keyring`) called off the event loop, the signing path on the lanes
  (:mod:`signer._internal.lanes`).
- ``_convert``: protobuf from and to the keyring's types.
- ``_assembly``: :class:`Server` (token connections, store, keyring, policy, audit log, the gRPC
  servers, health, reflection; start, SIGHUP reload, shutdown), :func:`serve`, the process's
  hardening and its connection limits.
"""

from signer._internal.server._assembly import (
    SERVICE_NAME,
    Recorder,
    Server,
    harden_process,
    serve,
)
from signer._internal.server._identity import CALLER
from signer._internal.server._interceptor import (
    PUBLIC_PREFIXES,
    CallInterceptor,
    audit_event,
)
from signer._internal.server._operations import OPERATION_OF, rpc_name
from signer._internal.server._servicer import SignerServicer

__all__ = [
    "CALLER",
    "OPERATION_OF",
    "PUBLIC_PREFIXES",
    "SERVICE_NAME",
    "CallInterceptor",
    "Recorder",
    "Server",
    "SignerServicer",
    "audit_event",
    "harden_process",
    "rpc_name",
    "serve",
]
