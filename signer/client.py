"""A typed Python client for the signer service.

    from signer.client import ClientTLS, SignerClient
    with SignerClient("unix:var/run/signer.sock") as c:        # a local caller, or over mTLS:
    # SignerClient("signer.internal:50051", tls=ClientTLS("ca.pem", "me.pem", "me.key"))
        c.create_key("payments", "ec-p256")
        sig = c.sign("payments", message=b"hello")
        assert c.verify("payments", sig.signature, message=b"hello")

gRPC errors come back as the :mod:`signer.errors` class of their status, with the server's
message; a signature that does not verify is ``False``, not an exception.

JWTs: ``c.sign_jwt(key, claims)`` and ``c.jwks(scope)``; :func:`verify_jwt` checks a token
against a JWKS *and the scope the verifier expects* (see :mod:`signer.jose`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import grpc

from signer import wrapping
from signer._wire import error_from
from signer.errors import SignerError, TokenRejected, Unavailable
from signer.jose import verify_jwt
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_ADDRESS",
    "ClientTLS",
    "Signature",
    "SignerClient",
    "TokenRejected",
    "verify_jwt",
]

# What ``make run`` serves to local callers; the TLS front listens on 127.0.0.1:50051.
DEFAULT_ADDRESS = "unix:var/run/signer.sock"


@dataclass(frozen=True)
class ClientTLS:
    """mTLS material: the CA that signed the service's certificate, and the caller's own
    certificate and key (its subject is the caller's identity)."""

    ca: str | Path
    cert: str | Path
    key: str | Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes(),
            private_key=Path(self.key).read_bytes(),
            certificate_chain=Path(self.cert).read_bytes(),
        )


Key = pb.Key
KeyVersion = pb.KeyVersion


@dataclass(frozen=True)
class Signature:
    signature: bytes
    version: int
    algorithm: str
    signature_algorithm: str


def _error(exc: grpc.RpcError) -> SignerError:
    code = exc.code()
    message = exc.details() or code.name
    if code == grpc.StatusCode.CANCELLED:
        # gRPC's server cancels calls it had not yet dispatched when it starts shutting down
        # (grpc/grpc#41785): for the caller that is "try again", not a bug.
        return Unavailable(f"the service cancelled the call ({message}); it may be shutting down")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"no answer within the call's deadline ({message})")
    return error_from(code, message)


_FORMATS = {"der": pb.DER, "raw": pb.RAW}
_PADDINGS = {"pss": pb.PSS, "pkcs1v15": pb.PKCS1V15}


class SignerClient:
    """A connection to one signer service; safe to share between threads."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        channel: grpc.Channel | None = None,
        timeout: float | None = 30.0,
        tls: ClientTLS | None = None,
    ) -> None:
        if channel is None:
            channel = (
                grpc.secure_channel(address, tls.credentials())
                if tls is not None
                else grpc.insecure_channel(address)
            )
        self._channel = channel
        self._stub = pb_grpc.SignerServiceStub(self._channel)
        self._timeout = timeout

    def __enter__(self) -> SignerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    # --- keys ---------------------------------------------------------------------------------

    def create_key(
        self, name: str, algorithm: str, scope: str = "", labels: dict[str, str] | None = None
    ) -> pb.Key:
        req = pb.CreateKeyRequest(name=name, algorithm=algorithm, scope=scope, labels=labels or {})
        key: pb.Key = self._call("CreateKey", req)
        return key

    def get_key(self, name: str) -> pb.Key:
        key: pb.Key = self._call("GetKey", pb.GetKeyRequest(name=name))
        return key

    def list_keys(self, page_size: int = 0, page_token: str = "") -> pb.ListKeysResponse:
        resp: pb.ListKeysResponse = self._call(
            "ListKeys", pb.ListKeysRequest(page_size=page_size, page_token=page_token)
        )
        return resp

    def iter_keys(self, page_size: int = 0) -> Iterator[pb.Key]:
        """Every key, following pages."""
        token = ""
        while True:
            page = self.list_keys(page_size, token)
            yield from page.keys
            token = page.next_page_token
            if not token:
                return

    def public_key(
        self, name: str, version: int = 0, format: Literal["pem", "jwk"] = "pem"
    ) -> pb.PublicKey:
        fmt = pb.JWK if format == "jwk" else pb.PEM
        resp: pb.PublicKey = self._call(
            "GetPublicKey", pb.GetPublicKeyRequest(name=name, version=version, format=fmt)
        )
        return resp

    def rotate(self, name: str, *, now: bool = False) -> pb.Key:
        """A new version; for a key in an issuer's scope it becomes primary after the lead
        time, unless ``now`` (verifiers with a cached JWKS then reject its tokens until they
        refetch)."""
        key: pb.Key = self._call("RotateKey", pb.RotateKeyRequest(name=name, now=now))
        return key

    def set_primary(self, name: str, version: int) -> pb.Key:
        key: pb.Key = self._call(
            "SetPrimaryVersion", pb.SetPrimaryVersionRequest(name=name, version=version)
        )
        return key

    def disable(self, name: str, version: int) -> pb.KeyVersion:
        v: pb.KeyVersion = self._call(
            "DisableKeyVersion", pb.KeyVersionRequest(name=name, version=version)
        )
        return v

    def enable(self, name: str, version: int) -> pb.KeyVersion:
        v: pb.KeyVersion = self._call(
            "EnableKeyVersion", pb.KeyVersionRequest(name=name, version=version)
        )
        return v

    def schedule_destruction(
        self, name: str, version: int, waiting_period_seconds: int = 0
    ) -> pb.KeyVersion:
        v: pb.KeyVersion = self._call(
            "ScheduleKeyVersionDestruction",
            pb.ScheduleKeyVersionDestructionRequest(
                name=name, version=version, waiting_period_seconds=waiting_period_seconds
            ),
        )
        return v

    def cancel_destruction(self, name: str, version: int) -> pb.KeyVersion:
        v: pb.KeyVersion = self._call(
            "CancelKeyVersionDestruction", pb.KeyVersionRequest(name=name, version=version)
        )
        return v

    # --- wrapped import -----------------------------------------------------------------------

    def get_import_parameters(self) -> pb.ImportParameters:
        """A new import token and the public half of its wrapping key (generated in the token)."""
        params: pb.ImportParameters = self._call(
            "GetImportParameters", pb.GetImportParametersRequest()
        )
        return params

    def import_key_version(self, request: pb.ImportKeyVersionRequest) -> pb.Key:
        """Sends an already wrapped key (see :func:`build_import_request`)."""
        key: pb.Key = self._call("ImportKeyVersion", request)
        return key

    def import_key(
        self,
        name: str,
        algorithm: str,
        private_key_pem: bytes,
        *,
        scope: str = "",
        labels: dict[str, str] | None = None,
        password: bytes | None = None,
        params: pb.ImportParameters | None = None,
    ) -> pb.Key:
        """Imports a private key: wrapped HERE for the token, so the service never sees it.

        A new ``name`` gets version 1; an existing one a new primary version. ``params`` reuses
        an import token (each new one costs the token an RSA-4096 key generation).
        """
        params = params or self.get_import_parameters()
        request = build_import_request(
            name, algorithm, private_key_pem, params, scope=scope, labels=labels, password=password
        )
        return self.import_key_version(request)

    # --- signatures ---------------------------------------------------------------------------

    # --- JWT --------------------------------------------------------------------------------

    def sign_jwt(
        self, name: str, claims: Mapping[str, Any] | bytes, *, set_issuer: bool = False
    ) -> str:
        """A compact JWT over ``claims`` (a mapping, serialised here, or JSON bytes as given),
        signed in the token with the key's primary version. ``set_issuer``: the service puts
        ``iss``, the issuer of the key's scope (README "Issuers over HTTPS")."""
        body = claims if isinstance(claims, bytes) else json.dumps(dict(claims)).encode()
        req = pb.SignJWTRequest(name=name, claims=body, set_issuer=set_issuer)
        resp: pb.SignJWTResponse = self._call("SignJWT", req)
        return resp.token

    def jwks(self, scope: str) -> dict[str, Any]:
        """The JWKS of ``scope`` (every JWK with ``scope``), for :func:`verify_jwt`."""
        resp: pb.GetJWKSResponse = self._call("GetJWKS", pb.GetJWKSRequest(scope=scope))
        jwks: dict[str, Any] = json.loads(resp.jwks)
        return jwks

    def sign(
        self,
        name: str,
        *,
        message: bytes | None = None,
        digest: bytes | None = None,
        version: int = 0,
        signature_format: Literal["der", "raw"] = "der",
        rsa_padding: Literal["pss", "pkcs1v15"] = "pss",
    ) -> Signature:
        """Signs ``message`` (hashed by the service) or a precomputed ``digest``."""
        req = pb.SignRequest(
            name=name,
            version=version,
            signature_format=_FORMATS[signature_format],
            rsa_padding=_PADDINGS[rsa_padding],
        )
        _set_input(req, message, digest)
        resp: pb.SignResponse = self._call("Sign", req)
        return Signature(resp.signature, resp.version, resp.algorithm, resp.signature_algorithm)

    def sign_batch(
        self,
        name: str,
        *,
        messages: list[bytes] | None = None,
        digests: list[bytes] | None = None,
        version: int = 0,
        signature_format: Literal["der", "raw"] = "der",
        rsa_padding: Literal["pss", "pkcs1v15"] = "pss",
    ) -> list[Signature | SignerError]:
        """Signs many messages (or digests) with one key version in one call; each item comes
        back as its :class:`Signature` or as the error it alone failed with."""
        items = [pb.SignBatchItem(message=m) for m in messages or ()]
        items += [pb.SignBatchItem(digest=d) for d in digests or ()]
        req = pb.SignBatchRequest(
            name=name,
            version=version,
            items=items,
            signature_format=_FORMATS[signature_format],
            rsa_padding=_PADDINGS[rsa_padding],
        )
        resp: pb.SignBatchResponse = self._call("SignBatch", req)
        out: list[Signature | SignerError] = []
        for r in resp.results:
            if r.WhichOneof("outcome") == "error":
                out.append(error_from(r.error.code, r.error.message))
            else:
                sig = Signature(r.signature, resp.version, resp.algorithm, resp.signature_algorithm)
                out.append(sig)
        return out

    def verify(
        self,
        name: str,
        signature: bytes,
        *,
        message: bytes | None = None,
        digest: bytes | None = None,
        version: int = 0,
        signature_format: Literal["der", "raw"] = "der",
        rsa_padding: Literal["pss", "pkcs1v15"] = "pss",
    ) -> bool:
        req = pb.VerifyRequest(
            name=name,
            version=version,
            signature=signature,
            signature_format=_FORMATS[signature_format],
            rsa_padding=_PADDINGS[rsa_padding],
        )
        _set_input(req, message, digest)
        resp: pb.VerifyResponse = self._call("Verify", req)
        return bool(resp.valid)


def build_import_request(
    name: str,
    algorithm: str,
    private_key_pem: bytes,
    params: pb.ImportParameters,
    *,
    scope: str = "",
    labels: dict[str, str] | None = None,
    password: bytes | None = None,
) -> pb.ImportKeyVersionRequest:
    """The ImportKeyVersion request for a PEM private key: wrapped under ``params``' wrapping
    key (one RSA-OAEP-SHA1 block, or the two-step scheme when it does not fit) plus the public
    key. The private key itself is in no field."""
    key = wrapping.load_private_key_pem(private_key_pem, password)
    return pb.ImportKeyVersionRequest(
        name=name,
        algorithm=algorithm,
        import_token=params.import_token,
        wrapped_key=wrapping.wrap(wrapping.pkcs8_der(key), params.wrapping_public_key_pem),
        scope=scope,
        labels=labels or {},
        public_key_der=wrapping.public_der(key),
    )


def _set_input(req: Any, message: bytes | None, digest: bytes | None) -> None:
    if (message is None) == (digest is None):
        raise TypeError("pass exactly one of message= or digest=")
    if message is not None:
        req.message = message
    else:
        req.digest = digest
