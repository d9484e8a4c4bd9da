"""Drop-in keys: ``cryptography`` private-key objects whose ``sign()`` is the service's.

Code written for a key in memory changes one line, where the key comes from (issue 17, item 3)::

    key = serialization.load_pem_private_key(pem, None)              # before: the key in memory
    key = load_private_key("signer://payments", client=client)       # after: the key in the token

and then ``key.sign(data, ec.ECDSA(hashes.SHA256()))``, ``jwt.encode(claims, key, "ES256")``
and ``x509.CertificateBuilder().sign(key, hashes.SHA256())`` work unchanged: the objects are
subclasses of :class:`~cryptography.hazmat.primitives.asymmetric.ec.EllipticCurvePrivateKey`,
:class:`~cryptography.hazmat.primitives.asymmetric.rsa.RSAPrivateKey` and
:class:`~cryptography.hazmat.primitives.asymmetric.ed25519.Ed25519PrivateKey`, and cryptography's
x509 builders and PyJWT call their ``sign()``.

What travels: for EC and RSA the digest, computed here, and nothing else of the data; for
Ed25519 the whole message, because Ed25519 (PureEdDSA, what the token's CKM_EDDSA does) signs the
message, not a digest of it, so a message over the service's ``server.max_message_bytes`` (1 MiB)
is refused (INVALID_ARGUMENT).

The service signs one way per algorithm, and a drop-in key signs only that way. Anything else is
refused with :class:`NotOffered` before a call, never answered with a signature of another kind:

* EC: ECDSA with the key's own hash (P-256 SHA-256, P-384 SHA-384, P-521 SHA-512), given as the
  hash or as ``Prehashed`` of it; random ``k`` (``ECDSA(..., deterministic_signing=True)`` is
  refused: the token does not do RFC 6979). Returns DER, as cryptography does.
* RSA: SHA-256 with PKCS#1 v1.5, or PSS with MGF1-SHA-256 and a 32-byte salt:
  ``PSS.DIGEST_LENGTH`` or ``salt_length=32`` (what PyJWT's PS256 passes). ``PSS.MAX_LENGTH``
  (222 bytes for RSA-2048) and any other length are refused; ``PSS.AUTO`` is for verifying only,
  as in cryptography. No decryption: the service only signs.
* Ed25519: ``sign(data)``. Offered where the token module carries CKM_EDDSA (not Debian's p11-kit
  0.24.1; see tests/integration/test_ed25519_inprocess.py).

The private half never leaves the token: ``private_bytes()``, ``private_bytes_raw()`` and
``private_numbers()`` raise :class:`NotExportable`; ECDH ``exchange()`` and RSA ``decrypt()``
raise :class:`NotOffered`. ``public_key()`` is the real public key, fetched from the service.
The service's own errors arrive as the :mod:`signer.errors` classes (a disabled version:
:class:`~signer.errors.FailedPrecondition`).

Which version signs. ``signer://payments`` follows the key's primary version: each call signs
with the primary of that moment, and ``public_key()`` is the public key of the version that
signed last (at first, the primary when the key was loaded; a signature by another version,
after a rotation, fetches that version's public key once). A certificate or CSR pairs a public
key read *before* signing with the signature, so across a rotation the two can disagree: for
those, name the version, ``signer://payments?version=2`` (``pkcs11:object=payments;x-version=2``),
and the key signs with that version only and ``public_key()`` is always its public key.

Overhead, measured on this repository's test service (SoftHSM2 behind p11-kit server, the
service in the test process, a Unix socket; ec-p256, a 1 KiB message, medians of 200 interleaved
calls each, three runs; tests/integration/test_dropin.py prints it): a drop-in ``sign()`` took
1707 to 1893 us against 1671 to 1894 us for ``client.sign(digest=...)``, 0 to +36 us (at most
1.02x), within the run-to-run spread; its own work (hashing, checks) is 3.6 us a call.

``asign()`` is the async form of ``sign()`` (the blocking call in a worker thread, as the client
has no async stub), and :func:`aload_private_key` the async loader.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Literal, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from cryptography.utils import Buffer

from signer.client import DEFAULT_ADDRESS, ClientTLS, SignerClient
from signer.errors import InvalidArgument, SignerError, shown
from signer.keys import ALGORITHMS, PSS_SALT_LENGTH, Algorithm, Family, load_public_key
from signer.v1 import signer_pb2 as pb

__all__ = [
    "DropInKey",
    "KeyURI",
    "NotExportable",
    "NotOffered",
    "ServiceECPrivateKey",
    "ServiceEd25519PrivateKey",
    "ServiceRSAPrivateKey",
    "aload_private_key",
    "load_private_key",
    "parse_uri",
]


class NotExportable(SignerError):
    """The private key is in the token, non-extractable: no bytes or numbers of it exist here."""


class NotOffered(InvalidArgument, UnsupportedAlgorithm):
    """The service does not sign (or decrypt, or agree keys) the way asked. Also an
    ``UnsupportedAlgorithm``, so code written for cryptography's keys catches it too."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class KeyURI:
    """A key of the service: its name and a fixed version (0: the primary at each call)."""

    name: str
    version: int = 0


def _version(text: str, uri: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise InvalidArgument(f"key URI {shown(uri)}: version must be a positive integer")
    return int(text)


def parse_uri(uri: str) -> KeyURI:
    """``signer://NAME[?version=N]`` or ``pkcs11:object=NAME[;type=private][;x-version=N]``.

    The PKCS#11 form (RFC 7512) takes only the attributes that mean something here; ``token``,
    ``id`` and the like name things this service does not have, and are refused rather than
    ignored (a URI meant for another token must not sign with this one's key of the same name).
    """
    if not isinstance(uri, str):
        raise TypeError("uri must be a str")
    if uri.startswith("signer:"):
        parts = urlsplit(uri)
        name = unquote(parts.netloc or parts.path.lstrip("/"))
        if parts.fragment or (parts.netloc and parts.path not in ("", "/")):
            raise InvalidArgument(f"key URI {shown(uri)}: use signer://NAME[?version=N]")
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        unknown = set(query) - {"version"}
        if unknown or any(len(v) != 1 for v in query.values()):
            raise InvalidArgument(f"key URI {shown(uri)}: the only query parameter is version=N")
        version = _version(query["version"][0], uri) if "version" in query else 0
    elif uri.startswith("pkcs11:"):
        path, _, query_text = uri[len("pkcs11:") :].partition("?")
        if query_text:
            raise InvalidArgument(f"key URI {shown(uri)}: query attributes are not used here")
        attrs: dict[str, str] = {}
        for item in filter(None, path.split(";")):
            k, sep, v = item.partition("=")
            if not sep or k in attrs:
                raise InvalidArgument(f"key URI {shown(uri)}: malformed attribute {shown(item)}")
            attrs[k] = unquote(v)
        unknown = set(attrs) - {"object", "type", "x-version"}
        if unknown:
            raise InvalidArgument(
                f"key URI {shown(uri)}: attribute(s) {', '.join(sorted(unknown))} not supported; "
                "use object=NAME[;type=private][;x-version=N]"
            )
        if attrs.get("type", "private") != "private":
            raise InvalidArgument(f"key URI {shown(uri)}: only type=private keys sign")
        name = attrs.get("object", "")
        version = _version(attrs["x-version"], uri) if "x-version" in attrs else 0
    else:
        raise InvalidArgument(
            f"key URI {shown(uri)}: use signer://NAME[?version=N] or pkcs11:object=NAME"
        )
    if not name:
        raise InvalidArgument(f"key URI {shown(uri)}: no key name")
    return KeyURI(name, version)


def _bytes_like(data: object) -> bytes:
    """``data`` as bytes, if it is bytes-like, as cryptography's keys require: ``bytes(32)``
    would make 32 zero bytes of an int, and sign them."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
    return bytes(data)


def _loaded(resp: pb.PublicKey) -> Any:
    """The public key of a GetPublicKey answer, checked as the service checks its own."""
    pem = serialization.load_pem_public_key(resp.pem.encode())
    der = pem.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return load_public_key(der)


class _ServiceKey:
    """What the three key classes share: the client, the key, its public keys by version."""

    _family: Family

    def __init__(
        self,
        client: SignerClient,
        ref: KeyURI,
        resp: pb.PublicKey,
        *,
        owns_client: bool = False,
    ) -> None:
        """Use :func:`load_private_key`; ``resp`` is the key's GetPublicKey answer."""
        self._client = client
        self._ref = ref
        self._owns_client = owns_client
        self._lock = threading.Lock()
        self._public: dict[int, Any] = {}
        alg = ALGORITHMS.get(resp.algorithm)
        if alg is None or alg.family is not self._family:
            raise InvalidArgument(
                f"key {ref.name!r} is {shown(resp.algorithm)}, not a {self._family.value} key"
            )
        self._alg: Algorithm = alg
        self._public[resp.version] = _loaded(resp)
        self._current = resp.version

    # --- what it is ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._ref.name

    @property
    def algorithm(self) -> str:
        """The service's name of the key's algorithm: ec-p256, rsa-2048, ed25519."""
        return self._alg.name

    @property
    def version(self) -> int:
        """The version that signs (fixed), or that signed last (following the primary)."""
        return self._current

    @property
    def fixed_version(self) -> bool:
        return self._ref.version != 0

    def __repr__(self) -> str:
        which = f"version {self._ref.version}" if self._ref.version else "primary"
        return f"<{type(self).__name__} {self._ref.name!r} ({self._alg.name}, {which})>"

    def close(self) -> None:
        """Closes the client if the loader made it (``address=``); a given one is the caller's."""
        if self._owns_client:
            self._client.close()

    # --- signing ------------------------------------------------------------------------------

    def _public_of(self, version: int) -> Any:
        with self._lock:
            key = self._public.get(version)
        if key is None:
            key = _loaded(self._client.public_key(self._ref.name, version))
            with self._lock:
                self._public[version] = key
        return key

    def _current_public(self) -> Any:
        return self._public_of(self._current)

    def _sign_remote(
        self,
        *,
        digest: bytes | None = None,
        message: bytes | None = None,
        rsa_padding: Literal["pss", "pkcs1v15"] = "pss",
    ) -> bytes:
        sig = self._client.sign(
            self._ref.name,
            digest=digest,
            message=message,
            version=self._ref.version,
            signature_format="der",
            rsa_padding=rsa_padding,
        )
        if sig.algorithm != self._alg.name:
            # The service keeps a key's algorithm across its versions (an import of another
            # type is refused); should that ever change, a signature of another kind than the
            # caller asked for must not reach it.
            raise NotOffered(
                f"key {self._ref.name!r} signed as {shown(sig.algorithm)}, loaded as "
                f"{self._alg.name}: load it again"
            )
        if sig.version != self._current:
            if self.fixed_version:
                # Asked for one version, answered by another: the caller's public_key() would
                # not verify what it signed.
                raise NotOffered(
                    f"key {self._ref.name!r} is loaded at version {self._ref.version}; the "
                    f"service signed with version {sig.version}"
                )
            self._public_of(sig.version)
            self._current = sig.version
        return sig.signature

    def _digest(self, data: object, algorithm: object) -> bytes:
        """The digest of ``data`` under the key's own hash, or NotOffered for another hash."""
        data = _bytes_like(data)
        prehashed = isinstance(algorithm, utils.Prehashed)
        h = algorithm._algorithm if isinstance(algorithm, utils.Prehashed) else algorithm
        if not isinstance(h, hashes.HashAlgorithm) or h.name != self._alg.hash_name:
            asked = getattr(h, "name", type(h).__name__)
            raise NotOffered(
                f"key {self._ref.name!r} ({self._alg.name}) signs with {self._alg.hash_name} "
                f"only; asked for {asked}"
            )
        if prehashed:
            if len(data) != h.digest_size:
                raise InvalidArgument(
                    f"a Prehashed({h.name}) digest must be {h.digest_size} bytes, got {len(data)}"
                )
            return bytes(data)
        ctx = hashes.Hash(h)
        ctx.update(data)
        return ctx.finalize()

    # --- the private half stays in the token --------------------------------------------------

    def _not_exportable(self, what: str) -> NoReturn:
        raise NotExportable(
            f"{what}: key {self._ref.name!r} is in the service's token, created or imported as "
            "non-extractable; its private half never leaves the token, so there is nothing to "
            "export (use public_key() for the public half)"
        )

    def private_numbers(self) -> NoReturn:
        self._not_exportable("private_numbers()")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> NoReturn:
        self._not_exportable("private_bytes()")

    def __getstate__(self) -> NoReturn:
        self._not_exportable("pickling")

    def __copy__(self) -> Any:
        # As cryptography's keys: a copy is the same key. Here, the same key in the token.
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Any:
        return self


class ServiceECPrivateKey(_ServiceKey, ec.EllipticCurvePrivateKey):
    """An EC key (P-256, P-384, P-521) in the service's token."""

    _family = Family.EC

    @property
    def curve(self) -> ec.EllipticCurve:
        curve: ec.EllipticCurve = self._current_public().curve
        return curve

    @property
    def key_size(self) -> int:
        return self.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        key: ec.EllipticCurvePublicKey = self._current_public()
        return key

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA: the digest is computed here and only it is sent; returns DER."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise NotOffered(
                f"key {self.name!r} signs with ECDSA only, not {type(signature_algorithm).__name__}"
            )
        if signature_algorithm.deterministic_signing:
            raise NotOffered(
                f"key {self.name!r}: the token signs ECDSA with a random k; deterministic "
                "signing (RFC 6979) is not offered"
            )
        digest = self._digest(data, signature_algorithm.algorithm)
        return self._sign_remote(digest=digest)

    async def asign(
        self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> bytes:
        return await asyncio.to_thread(self.sign, data, signature_algorithm)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> NoReturn:
        raise NotOffered(
            f"key {self.name!r}: ECDH needs the private scalar, which never leaves the token, "
            "and the service offers no key agreement; its keys only sign"
        )


class ServiceRSAPrivateKey(_ServiceKey, rsa.RSAPrivateKey):
    """An RSA key (2048, 3072, 4096) in the service's token: SHA-256, PSS or PKCS#1 v1.5."""

    _family = Family.RSA

    @property
    def key_size(self) -> int:
        size: int = self._current_public().key_size
        return size

    def public_key(self) -> rsa.RSAPublicKey:
        key: rsa.RSAPublicKey = self._current_public()
        return key

    def _padding(self, pad: AsymmetricPadding) -> Literal["pss", "pkcs1v15"]:
        if isinstance(pad, padding.PKCS1v15):
            return "pkcs1v15"
        if isinstance(pad, padding.PSS):
            mgf = pad.mgf
            mgf_hash = getattr(mgf, "_algorithm", None)
            if not isinstance(mgf, padding.MGF1) or getattr(mgf_hash, "name", "") != "sha256":
                raise NotOffered(
                    f"key {self.name!r}: the service's PSS uses MGF1 with SHA-256; asked for "
                    f"MGF1 with {getattr(mgf_hash, 'name', type(mgf).__name__)}"
                )
            salt = pad._salt_length
            if salt is padding.PSS.AUTO:
                raise ValueError("PSS salt length can only be set to AUTO when verifying")
            if not (salt is padding.PSS.DIGEST_LENGTH or salt == PSS_SALT_LENGTH):
                asked = "PSS.MAX_LENGTH" if salt is padding.PSS.MAX_LENGTH else repr(salt)
                raise NotOffered(
                    f"key {self.name!r}: the service's PSS salt is {PSS_SALT_LENGTH} bytes "
                    f"(PSS.DIGEST_LENGTH for SHA-256); asked for salt_length={asked}"
                )
            return "pss"
        raise NotOffered(
            f"key {self.name!r} signs with PSS or PKCS1v15 padding only, not {type(pad).__name__}"
        )

    def sign(
        self,
        data: Buffer,
        padding: AsymmetricPadding,
        algorithm: utils.Prehashed | hashes.HashAlgorithm | utils.NoDigestInfo,
    ) -> bytes:
        """RSASSA with SHA-256: the digest is computed here and only it is sent."""
        pad = self._padding(padding)
        digest = self._digest(data, algorithm)
        return self._sign_remote(digest=digest, rsa_padding=pad)

    async def asign(
        self,
        data: Buffer,
        padding: AsymmetricPadding,
        algorithm: utils.Prehashed | hashes.HashAlgorithm | utils.NoDigestInfo,
    ) -> bytes:
        return await asyncio.to_thread(self.sign, data, padding, algorithm)

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> NoReturn:
        raise NotOffered(
            f"key {self.name!r}: the service's RSA keys only sign; it offers no decryption "
            "(and the private key never leaves the token to do it here)"
        )


class ServiceEd25519PrivateKey(_ServiceKey, ed25519.Ed25519PrivateKey):
    """An Ed25519 key in the service's token (where the token module carries CKM_EDDSA)."""

    _family = Family.ED25519

    def public_key(self) -> ed25519.Ed25519PublicKey:
        key: ed25519.Ed25519PublicKey = self._current_public()
        return key

    def sign(self, data: Buffer) -> bytes:
        """PureEdDSA signs the message itself: the whole of ``data`` is sent to the service."""
        return self._sign_remote(message=_bytes_like(data))

    async def asign(self, data: Buffer) -> bytes:
        return await asyncio.to_thread(self.sign, data)

    def private_bytes_raw(self) -> NoReturn:
        self._not_exportable("private_bytes_raw()")


DropInKey = ServiceECPrivateKey | ServiceRSAPrivateKey | ServiceEd25519PrivateKey

_CLASSES: dict[
    Family, type[ServiceECPrivateKey | ServiceRSAPrivateKey | ServiceEd25519PrivateKey]
] = {
    Family.EC: ServiceECPrivateKey,
    Family.RSA: ServiceRSAPrivateKey,
    Family.ED25519: ServiceEd25519PrivateKey,
}


def load_private_key(
    uri: str,
    *,
    client: SignerClient | None = None,
    address: str | None = None,
    tls: ClientTLS | None = None,
    timeout: float | None = 30.0,
) -> DropInKey:
    """The drop-in key ``uri`` names, of the class of its algorithm; its public key is fetched
    now (NOT_FOUND for an unknown key or version, FAILED_PRECONDITION for a destroyed one).

    Pass a ``client``, or an ``address`` (and ``tls``) for the key to make its own (then
    :meth:`close` closes it); neither: :data:`~signer.client.DEFAULT_ADDRESS`.
    """
    ref = parse_uri(uri)
    if client is not None and (address is not None or tls is not None):
        raise TypeError("pass client= or address= (and tls=), not both")
    owns = client is None
    if client is None:
        client = SignerClient(address or DEFAULT_ADDRESS, tls=tls, timeout=timeout)
    try:
        resp = client.public_key(ref.name, ref.version)
        alg = ALGORITHMS.get(resp.algorithm)
        if alg is None:
            raise NotOffered(
                f"key {ref.name!r} is {shown(resp.algorithm)}, an algorithm this client "
                "does not know"
            )
        return _CLASSES[alg.family](client, ref, resp, owns_client=owns)
    except BaseException:
        if owns:
            client.close()
        raise


async def aload_private_key(
    uri: str,
    *,
    client: SignerClient | None = None,
    address: str | None = None,
    tls: ClientTLS | None = None,
    timeout: float | None = 30.0,
) -> DropInKey:
    """:func:`load_private_key` without blocking the event loop."""
    return await asyncio.to_thread(
        load_private_key, uri, client=client, address=address, tls=tls, timeout=timeout
    )
