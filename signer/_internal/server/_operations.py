"""Which policy operation each RPC needs: :data:`OPERATION_OF`, the one table (issue 13).

A call is known by its RPC's name, the last part of its gRPC method (``Sign`` for
``/signer.v1.SignerService/Sign``, :func:`rpc_name`). The interceptor sets :data:`RPC` for the
call and records the call in the audit log under that name; the servicer asks the policy for
``OPERATION_OF[name]``. So the name a record shows is the name whose grant was asked for, and no
RPC names its operation in a string of its own (a typo there compiled, and denied).

Every RPC of ``signer.v1.SignerService`` has an entry (a unit test holds the table to the
service's descriptor); the health and reflection services are public
(:data:`signer._internal.server.PUBLIC_PREFIXES`) and have none.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from types import MappingProxyType

from signer._internal.policy import Operation

OPERATION_OF: Mapping[str, Operation] = MappingProxyType(
    {
        "CreateKey": Operation.CREATE,  # in a scope the grant names (Policy.allows_new)
        "GetKey": Operation.READ,
        "GetPublicKey": Operation.READ,
        # A listing shows the keys the caller may read; a caller with no read grant at all is
        # refused (PERMISSION_DENIED) rather than shown an empty list.
        "ListKeys": Operation.READ,
        "GetJWKS": Operation.READ,
        "Sign": Operation.SIGN,
        "SignBatch": Operation.SIGN,
        "SignJWT": Operation.SIGN,
        "Verify": Operation.VERIFY,
        "RotateKey": Operation.ROTATE,
        # Choosing which version signs is what a rotation does: one grant for both.
        "SetPrimaryVersion": Operation.ROTATE,
        "DisableKeyVersion": Operation.DISABLE,
        # Undoing a disable is the same grant: whoever may stop a version may start it again.
        "EnableKeyVersion": Operation.DISABLE,
        "ScheduleKeyVersionDestruction": Operation.DESTROY,
        # Cancelling a destruction is the same grant as scheduling it.
        "CancelKeyVersionDestruction": Operation.DESTROY,
        # No key yet: any import grant at all (Policy.allows_any); the token it returns is bound
        # to the caller.
        "GetImportParameters": Operation.IMPORT,
        # A new key: import in its scope. A new version of an existing key becomes its primary,
        # as a rotation does: import and rotate on it (the servicer's ImportKeyVersion).
        "ImportKeyVersion": Operation.IMPORT,
    }
)

# The RPC of the call being served (set by CallInterceptor for its task).
RPC: contextvars.ContextVar[str] = contextvars.ContextVar("rpc")


def rpc_name(method: str) -> str:
    """The RPC's name in a gRPC method (``/package.Service/Name``)."""
    return method.rsplit("/", 1)[-1]
