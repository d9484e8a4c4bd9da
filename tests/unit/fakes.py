"""Software fakes of the token and a store whose writes can fail, and the token's side of a
wrapped import in software, shared by unit tests."""

from __future__ import annotations

import functools
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from signer import wrapping
from signer._internal.store import SQLiteStore
from signer._internal.token import TokenAPI, TokenObject
from signer.errors import FailedPrecondition, NotFound, Unavailable
from signer.keys import (
    PSS_SALT_LENGTH,
    SHA256_DIGEST_INFO,
    Algorithm,
    Family,
    Key,
    SignMechanism,
    algorithm_kind,
    public_key_kind,
)

CURVES = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1(), "secp521r1": ec.SECP521R1()}
PREHASH = {32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@functools.cache
def _rsa(bits: int) -> rsa.RSAPrivateKey:
    # RSA generation is slow; the fake token reuses one key per size (fine for these tests).
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


class FakeToken:
    """A software token, a :class:`~signer._internal.token.TokenAPI` (checked below); every call
    is recorded. It offers no wrapped import (keyring/test_imports.py's ``FakeImportToken``
    does)."""

    label = "signer"
    two_step_mechanism: str | None = None

    def __init__(self) -> None:
        self.keys: dict[bytes, PrivateKey] = {}
        self.generated: list[tuple[str, bytes, str]] = []
        self.signed: list[tuple[bytes, SignMechanism, bytes]] = []
        self.destroyed: list[bytes] = []
        self.missing: dict[str, list[str]] = {}
        self.unavailable = False
        self.destroy_error: Exception | None = None
        self.labels: dict[bytes, str] = {}

    @property
    def available(self) -> bool:
        return not self.unavailable

    def check_answering(self) -> None:
        if self.unavailable:
            raise Unavailable("token unavailable: test")

    def missing_mechanisms(self, alg: Algorithm) -> list[str]:
        if self.unavailable:
            raise Unavailable("token unavailable: test")
        return list(self.missing.get(alg.name, []))

    def require(self, alg: Algorithm) -> None:
        missing = self.missing_mechanisms(alg)
        if missing:
            raise FailedPrecondition(f"algorithm {alg.name} is not available: {missing}")

    def generate(self, alg: Algorithm, key_id: bytes, label: str) -> bytes:
        self.require(alg)
        priv: PrivateKey
        if alg.family is Family.EC:
            priv = ec.generate_private_key(CURVES[alg.curve or ""])
        elif alg.family is Family.RSA:
            priv = _rsa(alg.bits)
        else:
            priv = ed25519.Ed25519PrivateKey.generate()
        self.keys[key_id] = priv
        self.generated.append((alg.name, key_id, label))
        return priv.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, key_id: bytes, mech: SignMechanism, data: bytes) -> bytes:
        if self.unavailable:
            raise Unavailable("token unavailable: test")
        self.signed.append((key_id, mech, data))
        key = self.keys[key_id]
        if mech is SignMechanism.ECDSA:
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            der = key.sign(data, ec.ECDSA(utils.Prehashed(PREHASH[len(data)])))
            r, s = utils.decode_dss_signature(der)
            width = (key.curve.key_size + 7) // 8
            return r.to_bytes(width, "big") + s.to_bytes(width, "big")  # CKM_ECDSA gives r || s
        if mech is SignMechanism.RSA_PKCS_PSS:
            assert isinstance(key, rsa.RSAPrivateKey)
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)
            return key.sign(data, pss, utils.Prehashed(hashes.SHA256()))
        if mech is SignMechanism.RSA_PKCS:
            assert isinstance(key, rsa.RSAPrivateKey)
            assert data.startswith(SHA256_DIGEST_INFO)
            digest = data[len(SHA256_DIGEST_INFO) :]
            return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return key.sign(data)

    def sign_many(self, key_id: bytes, jobs: list[tuple[SignMechanism, bytes]]) -> list[bytes]:
        return [self.sign(key_id, mech, data) for mech, data in jobs]

    def destroy(self, key_id: bytes) -> int:
        if self.destroy_error is not None:
            raise self.destroy_error
        self.destroyed.append(key_id)
        return 2 if self.keys.pop(key_id, None) is not None else 0

    def objects(self) -> list[TokenObject]:
        """Each key as its private key object, showing its public key."""
        labels = {key_id: label for _, key_id, label in self.generated} | self.labels
        return [
            TokenObject(key_id, labels.get(key_id, ""), "private", _kind(key), _spki(key))
            for key_id, key in self.keys.items()
        ]

    def holds_private_half(self, key_id: bytes, alg: Algorithm, public_der: bytes) -> bool:
        key = self._key(key_id)
        return _kind(key) == algorithm_kind(alg) and _spki(key) == public_der

    def require_wrapping(self) -> None:
        raise FailedPrecondition("wrapped key import is not available: a fake token without it")

    def missing_import_mechanisms(self, alg: Algorithm) -> list[str]:
        self.missing_mechanisms(alg)  # Unavailable when unavailable
        return ["CKM_RSA_PKCS_OAEP"]

    def require_import(self, alg: Algorithm) -> None:
        missing = self.missing_import_mechanisms(alg)
        raise FailedPrecondition(f"importing {alg.name} keys is not available: {missing}")

    def generate_wrapping_key(self, key_id: bytes, label: str) -> bytes:
        self.require_wrapping()
        raise AssertionError("unreachable")

    def unwrap_private(
        self,
        wrapping_key_id: bytes,
        blob: bytes,
        alg: Algorithm,
        key_id: bytes,
        label: str,
        public_der: bytes | None,
    ) -> bytes:
        self.require_import(alg)
        raise AssertionError("unreachable")

    def adopt(self, alg: Algorithm, key_id: bytes) -> bytes:
        return _spki(self._key(key_id))

    def relabel(self, key_id: bytes, label: str) -> None:
        self.labels[key_id] = label

    def _key(self, key_id: bytes) -> PrivateKey:
        key = self.keys.get(key_id)
        if key is None:
            raise NotFound(f"no private key object with id {key_id.hex()} in the token")
        return key


def _spki(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _kind(key: PrivateKey) -> str:
    return public_key_kind(key.public_key())


def _is_a_token(fake: FakeToken) -> TokenAPI:
    return fake  # mypy: the fake is what the service takes for a token


class FailingStore(SQLiteStore):
    """A store whose writes can be made to fail."""

    fail_create: Exception | None = None
    fail_add: Exception | None = None

    def create_key(self, key: Key, import_token: str | None = None) -> None:
        if self.fail_create is not None:
            raise self.fail_create
        super().create_key(key, import_token)

    def add_version(
        self, version: Any, make_primary: bool, import_token: str | None = None, **kw: Any
    ) -> None:
        if self.fail_add is not None:
            raise self.fail_add
        super().add_version(version, make_primary, import_token, **kw)


# --- wrapped import: the token's side, in software ----------------------------------------------


@functools.cache
def wrapping_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def wrapping_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def spki(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def unwrap(blob: bytes, key: rsa.RSAPrivateKey) -> bytes:
    """What the token does, in software: one OAEP block, or OAEP then RFC 5649."""
    k = key.key_size // 8
    if len(blob) == k:
        return key.decrypt(blob, wrapping.oaep_sha1())
    aes = key.decrypt(blob[:k], wrapping.oaep_sha1())
    assert len(aes) == wrapping.AES_KEY_BYTES
    return aes_key_unwrap_with_padding(aes, blob[k:])
