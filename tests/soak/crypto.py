"""Checking what the service answers without the service's own code: signatures (DER, raw,
PSS, PKCS#1 v1.5, Ed25519, over messages or digests), JWTs, and JWKs against PEM keys.

Only ``cryptography`` is used here, with the algorithms' parameters written out from the API
contract (proto/signer/v1/signer.proto), not imported from :mod:`signer.keys`: a soak that
verified with the code that signed would share its mistakes.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# The hash each algorithm signs with (proto: ECDSA with the curve's hash; RSA: SHA-256).
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "ec-p256": hashes.SHA256,
    "ec-p384": hashes.SHA384,
    "ec-p521": hashes.SHA512,
    "rsa-2048": hashes.SHA256,
    "rsa-3072": hashes.SHA256,
    "rsa-4096": hashes.SHA256,
}
# JWS algorithm names (RFC 7518) per key algorithm, as SignJWT must answer them.
JWS_ALG = {
    "ec-p256": "ES256",
    "ec-p384": "ES384",
    "ec-p521": "ES512",
    "rsa-2048": "PS256",
    "rsa-3072": "PS256",
    "rsa-4096": "PS256",
    "ed25519": "EdDSA",
}
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
PSS_SALT = 32  # proto: RSASSA-PSS, SHA-256, MGF1-SHA-256, salt 32 bytes


def hash_for(algorithm: str) -> hashes.HashAlgorithm:
    return _HASHES[algorithm]()


def load_pem(pem: str | bytes) -> PublicKey:
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(f"unexpected public key type {type(key).__name__}")
    return key


def spki(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _raw_to_der(raw: bytes) -> bytes:
    half = len(raw) // 2
    if len(raw) % 2 or not half:
        raise InvalidSignature
    r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    return utils.encode_dss_signature(r, s)


def verify_signature(
    algorithm: str,
    key: PublicKey,
    signature: bytes,
    *,
    message: bytes | None = None,
    digest: bytes | None = None,
    fmt: str = "der",
    rsa_padding: str = "pss",
) -> bool:
    """Whether ``signature`` is ``key``'s over ``message`` (or over the precomputed ``digest``),
    in the format the request asked for."""
    data = message if message is not None else digest
    assert data is not None
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            if message is None:
                return False  # ed25519 signs messages only
            key.verify(signature, message)
            return True
        h = hash_for(algorithm)
        alg: hashes.HashAlgorithm | utils.Prehashed = (
            h if message is not None else utils.Prehashed(h)
        )
        if isinstance(key, ec.EllipticCurvePublicKey):
            if fmt == "raw":
                width = (key.curve.key_size + 7) // 8
                if len(signature) != 2 * width:
                    return False
                signature = _raw_to_der(signature)
            key.verify(signature, data, ec.ECDSA(alg))
            return True
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if rsa_padding == "pkcs1v15"
            else padding.PSS(padding.MGF1(hashes.SHA256()), PSS_SALT)
        )
        key.verify(signature, data, pad, alg)
        return True
    except (InvalidSignature, ValueError):
        return False


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_jws(token: str, algorithm: str, key: PublicKey) -> tuple[bool, dict[str, Any], bytes]:
    """Whether the compact JWS ``token`` carries a valid signature of ``key`` (whose algorithm is
    ``algorithm``) and the right ``alg``; with its header and payload."""
    try:
        head_b64, body_b64, sig_b64 = token.split(".")
        header = json.loads(b64url_decode(head_b64))
        body = b64url_decode(body_b64)
        signature = b64url_decode(sig_b64)
    except ValueError:
        return False, {}, b""
    if not isinstance(header, dict) or header.get("alg") != JWS_ALG[algorithm]:
        return False, header if isinstance(header, dict) else {}, body
    signed = f"{head_b64}.{body_b64}".encode()
    # JWS: ECDSA signatures are r || s; PS256 is PSS with a 32-byte salt.
    ok = verify_signature(algorithm, key, signature, message=signed, fmt="raw")
    return ok, header, body


def _int(text: str) -> int:
    return int.from_bytes(b64url_decode(text), "big")


def jwk_matches(jwk: dict[str, Any], key: PublicKey) -> bool:
    """Whether the JWK ``jwk`` is the public key ``key``."""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            curve = _CURVES.get(str(jwk.get("crv")))
            if jwk.get("kty") != "EC" or curve is None or not isinstance(key.curve, curve):
                return False
            n = key.public_numbers()
            return (_int(jwk["x"]), _int(jwk["y"])) == (n.x, n.y)
        if isinstance(key, rsa.RSAPublicKey):
            rn = key.public_numbers()
            return jwk.get("kty") == "RSA" and (_int(jwk["n"]), _int(jwk["e"])) == (rn.n, rn.e)
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return (
            jwk.get("kty") == "OKP"
            and jwk.get("crv") == "Ed25519"
            and b64url_decode(str(jwk.get("x"))) == raw
        )
    except (KeyError, ValueError, TypeError):
        return False


class PublicKeys:
    """The public key of every (key, version) seen, fetched once and pinned: a later answer for
    the same version that differs is a defect (``mismatch``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, int], tuple[str, PublicKey]] = {}

    def get(self, name: str, version: int) -> tuple[str, PublicKey] | None:
        with self._lock:
            return self._keys.get((name, version))

    def pin(self, name: str, version: int, algorithm: str, key: PublicKey) -> bool:
        """Records ``key`` for the version; False when another key was recorded for it."""
        with self._lock:
            known = self._keys.setdefault((name, version), (algorithm, key))
        return known[0] == algorithm and spki(known[1]) == spki(key)

    def versions(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._keys)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)
