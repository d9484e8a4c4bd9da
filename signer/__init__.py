"""An HSM-backed signing service with memory-hygiene guarantees: the client.

What a caller of the service needs is here, and this is the surface that stays stable::

    import signer

    with signer.SignerClient("unix:var/run/signer.sock") as c:
        sig = c.sign("payments", message=b"hello")
        try:
            c.get_key("ghost")
        except signer.NotFound:
            ...

The errors are the classes a status from the service comes back as (:mod:`signer._wire`), their
root :class:`SignerError`, and :class:`TokenRejected`, which :func:`verify_jwt` raises on the
relying party's side. The rest of the public modules are imported by name: :mod:`signer.keys`
(algorithms), :mod:`signer.jose`, :mod:`signer.wrapping`, :mod:`signer.scan` (the dump scanner,
``signer[scan]``) and :mod:`signer.errors` (the whole tree, local errors included). The service
itself lives in ``signer._internal`` (``signer[service]``): nothing here imports it, PKCS#11 or
the scanner's engines.
"""

from typing import TYPE_CHECKING, Any

from signer.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SignerError,
    TokenRejected,
    Unauthenticated,
    Unavailable,
)

if TYPE_CHECKING:
    from signer.client import DEFAULT_ADDRESS, ClientTLS, Signature, SignerClient
    from signer.jose import verify_jwt

# The client's names are imported when first used (PEP 562), so that ``import signer.errors``,
# ``signer.keys`` or the scanner does not load gRPC and the generated code: the short-lived
# process that holds the PIN while it provisions a key (signer._internal.token.keygen) imports
# this package too, and should hold no more code than it needs.
_LAZY = {
    "DEFAULT_ADDRESS": "signer.client",
    "ClientTLS": "signer.client",
    "Signature": "signer.client",
    "SignerClient": "signer.client",
    "verify_jwt": "signer.jose",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'signer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDRESS",
    "AlreadyExists",
    "ClientTLS",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Signature",
    "SignerClient",
    "SignerError",
    "TokenRejected",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "verify_jwt",
]
