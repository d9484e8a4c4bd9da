"""Wrapped key import, the caller's side: how a private key is wrapped for the token.

Pure: cryptography only, no PKCS#11, no gRPC. The caller wraps with the public half of a wrapping
key pair that lives in the token (``GetImportParameters``); only the token can unwrap, so the
service relays an opaque blob and never holds the private key. The schemes, by the names
``ImportParameters`` gives them:

* ``RSA-OAEP-SHA1``: RSAES-OAEP with SHA-1, MGF1-SHA-1 and an empty label of the unencrypted
  PKCS#8 DER, one block. A block holds at most k - 42 bytes (470 under RSA-4096): every EC key,
  no RSA key. SHA-1 because it is the only OAEP hash SoftHSM2 2.6.1 unwraps with; OAEP's
  security does not rest on SHA-1's collision resistance.
* ``RSA-OAEP-SHA1+AES-256-KWP``: ``RSA-OAEP-SHA1(K) || AES-KWP(K, PKCS#8 DER)`` for a fresh
  AES-256 key K, with AES key wrap with padding (RFC 5649): the layout of CKM_RSA_AES_KEY_WRAP
  and of cloud KMSs' RSA_OAEP_4096_SHA1_AES_256. Offered only where the PKCS#11 module has the
  mechanisms (Debian's p11-kit 0.24.1 RPC does not carry them).
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from signer.errors import InvalidArgument

ONE_STEP = "RSA-OAEP-SHA1"
TWO_STEP = "RSA-OAEP-SHA1+AES-256-KWP"
AES_KEY_BYTES = 32
_SHA1_BYTES = 20

PrivateKeyType = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def oaep_sha1() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303


def one_step_capacity(modulus_bytes: int) -> int:
    """The largest plaintext one RSA-OAEP-SHA1 block carries (RFC 8017, 7.1.1)."""
    return modulus_bytes - 2 * _SHA1_BYTES - 2


def load_private_key_pem(pem: bytes, password: bytes | None = None) -> PrivateKeyType:
    """Parses a PEM private key (PKCS#8, PKCS#1 or SEC1); errors never quote the input."""
    try:
        key = serialization.load_pem_private_key(pem, password)
    except (ValueError, TypeError):
        raise InvalidArgument(
            "not a PEM private key, or an encrypted one with a missing or wrong password"
        ) from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise InvalidArgument(
            f"{type(key).__name__.lstrip('_')} keys cannot be imported: use EC, RSA or Ed25519"
        )
    return key


def pkcs8_der(key: PrivateKeyType) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_der(key: PrivateKeyType) -> bytes:
    """The key's public half as SubjectPublicKeyInfo DER."""
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_wrapping_key(pem: str | bytes) -> rsa.RSAPublicKey:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise InvalidArgument("the wrapping public key is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidArgument("the wrapping public key is not an RSA key")
    return key


def wrap(pkcs8: bytes, wrapping_public_key_pem: str | bytes) -> bytes:
    """Wraps PKCS#8 DER for the token: one OAEP block when it fits, the two-step scheme if not.

    Whether the service's module can unwrap the two-step scheme is the service's to say
    (FAILED_PRECONDITION naming the missing mechanisms): the blob is built either way.
    """
    wrapping = load_wrapping_key(wrapping_public_key_pem)
    k = (wrapping.key_size + 7) // 8
    if len(pkcs8) <= one_step_capacity(k):
        return wrapping.encrypt(pkcs8, oaep_sha1())
    aes_key = os.urandom(AES_KEY_BYTES)
    return wrapping.encrypt(aes_key, oaep_sha1()) + aes_key_wrap_with_padding(aes_key, pkcs8)


def scheme_for(pkcs8_len: int, wrapping_public_key_pem: str | bytes) -> str:
    """Which scheme :func:`wrap` uses for a PKCS#8 of this length."""
    wrapping = load_wrapping_key(wrapping_public_key_pem)
    k = (wrapping.key_size + 7) // 8
    return ONE_STEP if pkcs8_len <= one_step_capacity(k) else TWO_STEP
