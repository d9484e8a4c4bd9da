"""Object templates and key encodings.

The attributes of every object the service makes in the token (signing key pairs, the wrapping
key pair of an import, the two-step scheme's transport key), and how key objects are read back:
what a key object holds, its public key as SubjectPublicKeyInfo DER (CKA_EC_POINT unwrapped from
its OCTET STRING), and one object described for a listing of the token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import _pkcs11 as _p11

from signer._internal.token._errors import ATTRIBUTE_UNREADABLE
from signer.errors import FailedPrecondition, Internal
from signer.keys import ALGORITHMS, Algorithm, Family

# DER-encoded OIDs for CKA_EC_PARAMS.
CURVE_OIDS = {
    "secp256r1": bytes.fromhex("06082a8648ce3d030107"),
    "secp384r1": bytes.fromhex("06052b81040022"),
    "secp521r1": bytes.fromhex("06052b81040023"),
    "ed25519": bytes.fromhex("06032b6570"),
}

CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
}

# Attributes of every private key we create. Why each matters: TOKEN persists it; PRIVATE makes
# SoftHSM2 encrypt it at rest and demand a login; SENSITIVE and EXTRACTABLE=false keep its value
# inside the token for good (and make ALWAYS_SENSITIVE/NEVER_EXTRACTABLE true).
PRIVATE_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
    # python-pkcs11 may fill these public-key attributes in, which SoftHSM2 rejects on a private
    # key (CKR_ATTRIBUTE_TYPE_INVALID); DEFAULT drops them from the template.
    Attribute.ENCRYPT: pkcs11.DEFAULT,
    Attribute.VERIFY: pkcs11.DEFAULT,
    Attribute.WRAP: pkcs11.DEFAULT,
}

PUBLIC_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}

# The wrapping key pair: the private half unwraps and does nothing else, and never leaves.
WRAPPING_PRIVATE_TEMPLATE: dict[Attribute, Any] = {
    **PRIVATE_TEMPLATE,
    Attribute.SIGN: False,
    Attribute.UNWRAP: True,
}

WRAPPING_PUBLIC_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: False,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}

# The two-step scheme's AES key: a session object that can only unwrap, destroyed after one use.
TRANSPORT_KEY_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.UNWRAP: True,
    Attribute.WRAP: False,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}

KEY_TYPES = {Family.EC: KeyType.EC, Family.RSA: KeyType.RSA, Family.ED25519: KeyType.EC_EDWARDS}


_CURVE_KINDS = {
    CURVE_OIDS["secp256r1"]: "P-256",
    CURVE_OIDS["secp384r1"]: "P-384",
    CURVE_OIDS["secp521r1"]: "P-521",
}

# Ed25519's CKA_EC_PARAMS: the OID, or (PKCS#11 3.0) the curve name as a PrintableString.
_ED25519_PARAMS = (CURVE_OIDS["ed25519"], b"\x13\x0cedwards25519")


def search(session: Any, attrs: dict[Attribute, Any]) -> list[Any]:
    """``session.get_objects`` without python-pkcs11 0.10's leak on a failed C_FindObjectsInit.

    python-pkcs11 marks the search active (and takes the session's operation lock) before it calls
    C_FindObjectsInit and does not undo that when the call fails: the session stays locked, and
    the search's ``__del__`` later calls C_FindObjectsFinal and prints a raw traceback.
    """
    query = _p11.SearchIter(session, attrs, 16)  # type: ignore[attr-defined]  # not in its stubs
    try:
        with query:
            return [obj for batch in query for obj in batch]
    except p11e.PKCS11Error:
        with contextlib.suppress(p11e.PKCS11Error):
            query._finalize()  # clears the active flag and releases the session's lock
        raise


def one(found: list[Any], missing: Callable[[], Exception]) -> Any:
    if not found:
        raise missing()
    if len(found) > 1:
        raise FailedPrecondition(f"{len(found)} objects match where one was expected")
    return found[0]


def flag(obj: Any, attr: Attribute) -> bool:
    try:
        return bool(obj[attr])
    except p11e.AttributeTypeInvalid:
        return False


def object_kind(obj: Any) -> str:
    """What a key object holds, named as :func:`signer.keys.algorithm_kind` names algorithms."""
    key_type = obj[Attribute.KEY_TYPE]
    if key_type == KeyType.EC:
        params = bytes(obj[Attribute.EC_PARAMS])
        return _CURVE_KINDS.get(params, f"EC (curve parameters {params.hex()})")
    if key_type == KeyType.RSA:
        return f"RSA-{int.from_bytes(bytes(obj[Attribute.MODULUS]), 'big').bit_length()}"
    if key_type == KeyType.EC_EDWARDS:
        params = bytes(obj[Attribute.EC_PARAMS])
        return "Ed25519" if params in _ED25519_PARAMS else f"EdDSA ({params.hex()})"
    return f"key type 0x{int(key_type):x}"


def public_of_private(obj: Any, alg: Algorithm) -> bytes | None:
    """The public key a private key object reveals (RSA: always; EC: not on SoftHSM2), or None."""
    try:
        return spki(alg, obj)
    except ATTRIBUTE_UNREADABLE:
        return None


def spki_rsa(pub: Any) -> bytes:
    n = int.from_bytes(pub[Attribute.MODULUS], "big")
    e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
    return (
        rsa.RSAPublicNumbers(e, n)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def spki(alg: Algorithm, pub: Any) -> bytes:
    """The public key object's value as SubjectPublicKeyInfo DER, built with cryptography."""
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    if alg.family is Family.RSA:
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        key = rsa.RSAPublicNumbers(e, n).public_key()
    else:
        if alg.family is Family.EC:
            assert alg.curve is not None
            curve = CURVES[alg.curve]
            point = _ec_point(bytes(pub[Attribute.EC_POINT]), 1 + 2 * ((curve.key_size + 7) // 8))
            key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        else:
            key = ed25519.Ed25519PublicKey.from_public_bytes(
                _ec_point(bytes(pub[Attribute.EC_POINT]), 32)
            )
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ec_point(value: bytes, size: int) -> bytes:
    """CKA_EC_POINT is DER OCTET STRING { point } (PKCS#11 2.40); some modules give it bare."""
    if len(value) == size:
        return value
    header = bytes([0x04, size]) if size < 0x80 else bytes([0x04, 0x81, size])
    if value.startswith(header) and len(value) == len(header) + size:
        return value[len(header) :]
    raise Internal(f"the token returned a malformed CKA_EC_POINT ({len(value)} bytes)")


@dataclass(frozen=True)
class TokenObject:
    """A token object as :meth:`Token.objects` lists it. ``kind``: private, public, secret or
    other (certificates, data). For key pairs' objects, ``key_kind`` names what it holds (as
    :func:`signer.keys.algorithm_kind` names algorithms) and ``public_der`` is the public key it
    shows (SubjectPublicKeyInfo DER): a public key object's, an RSA private key's; None where
    the token shows none (an EC private key on SoftHSM2)."""

    key_id: bytes
    label: str
    kind: str
    key_kind: str = ""
    public_der: bytes | None = None


_KINDS = {
    ObjectClass.PRIVATE_KEY: "private",
    ObjectClass.PUBLIC_KEY: "public",
    ObjectClass.SECRET_KEY: "secret",
}

# Any algorithm of the family (and curve) serves to read a public key's value.
_READERS = {
    **{CURVE_OIDS[a.curve]: a for a in ALGORITHMS.values() if a.curve in CURVE_OIDS},
    **{params: ALGORITHMS["ed25519"] for params in _ED25519_PARAMS},
}


def described(obj: Any) -> TokenObject:
    """One object, read once: a listing of the whole token then compares every key version
    with its object without a search per version (each search reads every object in
    SoftHSM2: 43 ms a version at 440 objects, measured)."""

    def read(attr: Attribute) -> Any:
        try:
            return obj[attr]
        except ATTRIBUTE_UNREADABLE:
            return None

    key_id, label, cls = read(Attribute.ID), read(Attribute.LABEL), read(Attribute.CLASS)
    kind = _KINDS.get(cls, "other")
    key_kind, public = "", None
    if kind in ("private", "public"):
        key_kind = object_kind(obj)
        key_type = read(Attribute.KEY_TYPE)
        reader = (
            ALGORITHMS["rsa-2048"]
            if key_type == KeyType.RSA
            else _READERS.get(bytes(read(Attribute.EC_PARAMS) or b""))
        )
        if reader is not None:
            with contextlib.suppress(Internal):  # a malformed point shows nothing
                public = public_of_private(obj, reader)
    return TokenObject(bytes(key_id or b""), str(label or ""), kind, key_kind, public)
