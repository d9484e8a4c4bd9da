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

from signer.client import DEFAULT_ADDRESS, ClientTLS, Signature, SignerClient
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
from signer.jose import verify_jwt

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
