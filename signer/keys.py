"""Algorithms, key names, versions and states, and the public-key arithmetic around them.

Pure: no I/O, no PKCS#11. The service hashes here and asks the token to sign the digest, because
the token path offers only raw mechanisms (SoftHSM2 2.6.1 has CKM_ECDSA but no CKM_ECDSA_SHA256;
Debian's p11-kit 0.24.1 does not forward CKM_SHA256_RSA_PKCS_PSS).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from signer.errors import FailedPrecondition, InvalidArgument, NotFound, shown


class Family(enum.Enum):
    EC = "ec"
    RSA = "rsa"
    ED25519 = "ed25519"


class Padding(enum.Enum):
    PSS = "pss"
    PKCS1V15 = "pkcs1v15"


class SigFormat(enum.Enum):
    DER = "der"
    RAW = "raw"


class SignMechanism(enum.Enum):
    """How the token is asked to sign; :mod:`signer._internal.token` maps these (and a
    :class:`Family`, for making a key pair) to PKCS#11 mechanisms, in one table."""

    ECDSA = "ecdsa"  # sign a digest, returns r || s
    RSA_PKCS_PSS = "rsa-pss"  # sign a SHA-256 digest with PSS parameters
    RSA_PKCS = "rsa-pkcs1v15"  # sign DigestInfo || digest (PKCS#1 v1.5)
    EDDSA = "eddsa"  # sign the message itself (PureEdDSA)


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: Family
    # EC: the curve name as cryptography knows it; RSA: None.
    curve: str | None
    bits: int
    # Hash applied to messages; None for Ed25519, which signs messages whole.
    hash_name: str | None
    # How the token signs with it (a key pair is made by its family).
    sign_mechanisms: tuple[SignMechanism, ...]

    @property
    def digest_size(self) -> int | None:
        return None if self.hash_name is None else hashlib.new(self.hash_name).digest_size

    def hash(self, message: bytes) -> bytes:
        assert self.hash_name is not None
        return hashlib.new(self.hash_name, message).digest()

    def signature_algorithm(self, pad: Padding) -> str:
        """The name a caller or a JOSE library knows the signature by."""
        if self.family is Family.EC:
            return f"ECDSA-{self.hash_name.upper()}" if self.hash_name else "ECDSA"
        if self.family is Family.RSA:
            return "RSASSA-PSS-SHA256" if pad is Padding.PSS else "RSASSA-PKCS1-v1_5-SHA256"
        return "Ed25519"

    def jws_alg(self, pad: Padding = Padding.PSS) -> str:
        if self.family is Family.EC:
            return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[
                self.curve or ""
            ]
        if self.family is Family.RSA:
            return "PS256" if pad is Padding.PSS else "RS256"
        return "EdDSA"


def _ec(name: str, curve: str, bits: int, hash_name: str) -> Algorithm:
    return Algorithm(name, Family.EC, curve, bits, hash_name, (SignMechanism.ECDSA,))


def _rsa(bits: int) -> Algorithm:
    return Algorithm(
        f"rsa-{bits}",
        Family.RSA,
        None,
        bits,
        "sha256",
        (SignMechanism.RSA_PKCS_PSS, SignMechanism.RSA_PKCS),
    )


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        _ec("ec-p256", "secp256r1", 256, "sha256"),
        _ec("ec-p384", "secp384r1", 384, "sha384"),
        _ec("ec-p521", "secp521r1", 521, "sha512"),
        _rsa(2048),
        _rsa(3072),
        _rsa(4096),
        Algorithm(
            "ed25519",
            Family.ED25519,
            None,
            255,
            None,
            (SignMechanism.EDDSA,),
        ),
    )
}

# DER prefix of DigestInfo { sha256 } for RSASSA-PKCS1-v1_5 over CKM_RSA_PKCS (RFC 8017, 9.2).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
PSS_SALT_LENGTH = 32

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
SCOPE_NAME = re.compile(r"[a-z0-9][a-z0-9:._-]{0,62}")


def algorithm(name: str) -> Algorithm:
    """The algorithm called ``name``, or INVALID_ARGUMENT listing the known ones."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        known = ", ".join(ALGORITHMS)
        raise InvalidArgument(
            f"algorithm {shown(name)} is not supported; use one of: {known}"
        ) from None


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def check_name(name: str) -> str:
    if not valid_name(name):
        raise InvalidArgument(
            f"name {shown(name)} is invalid: use 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# The scope of a key created without one.
DEFAULT_SCOPE = "default"


def check_scope(scope: str) -> str:
    if scope and not SCOPE_NAME.fullmatch(scope):
        raise InvalidArgument(
            f"scope {shown(scope)} is invalid: use 1-63 characters of a-z, 0-9, ':', '.', '_' "
            "or '-'"
        )
    return scope


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > 64:
        raise InvalidArgument("labels: at most 64 labels")
    for k, v in labels.items():
        if not _LABEL_KEY.fullmatch(k):
            raise InvalidArgument(
                f"label key {shown(k)} is invalid: use 1-63 characters of a-z, 0-9, '_' or '-', "
                "starting with a letter"
            )
        if len(v) > 256:
            raise InvalidArgument(f"label {k!r}: value longer than 256 characters")
    return labels


class State(enum.Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTRUCTION_SCHEDULED = "destruction_scheduled"
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    algorithm: str
    state: State
    key_id: bytes  # CKA_ID of the token objects
    public_key_der: bytes  # SubjectPublicKeyInfo
    created: datetime
    destroy_at: datetime | None
    # When it stopped, or stops, being primary (a scheduled rotation sets it ahead): an issuer's
    # JWKS keeps it for [jwt] retired_grace_seconds after. None: never retired, or retired
    # before the store kept the time.
    retired_at: datetime | None = None

    def effective_state(self, now: datetime) -> State:
        """DESTRUCTION_SCHEDULED turns into DESTROYED the moment its time passes, whether or not
        the reaper has destroyed the token objects yet: nothing may sign with it after that."""
        if (
            self.state is State.DESTRUCTION_SCHEDULED
            and self.destroy_at is not None
            and now >= self.destroy_at
        ):
            return State.DESTROYED
        return self.state


@dataclass(frozen=True)
class Key:
    name: str
    algorithm: str
    primary: int
    scope: str
    labels: dict[str, str]
    created: datetime
    versions: tuple[Version, ...]
    # A rotation of an issuer's key (README "Issuers over HTTPS") publishes the new version
    # first and makes it primary at next_primary_at: from then it is, without any write
    # (:meth:`effective_primary`); the next change to the key folds it into ``primary``.
    next_primary: int | None = None
    next_primary_at: datetime | None = None

    def effective_primary(self, now: datetime) -> int:
        """The primary version at ``now``: the scheduled next one once its time has come."""
        if (
            self.next_primary is not None
            and self.next_primary_at is not None
            and self.next_primary_at <= now
        ):
            return self.next_primary
        return self.primary

    def pending_primary(self, now: datetime) -> int | None:
        """The version scheduled to become primary after ``now``, if any."""
        if self.next_primary_at is not None and self.next_primary_at > now:
            return self.next_primary
        return None

    def version(self, number: int) -> Version:
        """``number`` 0 means ``primary``, which a scheduled next version may have replaced
        since (the keyring's keys have it folded in: :meth:`effective_primary`)."""
        wanted = number or self.primary
        for v in self.versions:
            if v.version == wanted:
                return v
        raise NotFound(f"key {self.name!r} has no version {wanted}")


@dataclass(frozen=True)
class ImportToken:
    """A wrapping key pair in the token, handed out for wrapped key import until ``expires``."""

    token: str  # random, opaque; what the caller passes back
    key_id: bytes  # CKA_ID of the wrapping key pair
    public_key_der: bytes  # the wrapping public key, SubjectPublicKeyInfo
    created: datetime
    expires: datetime
    destroyed: bool = False  # its wrapping key pair is gone from the token (used or expired)
    caller: str = ""  # who asked for it: nobody else may import with it
    used: bool = False  # imports are single-use

    def expired(self, now: datetime) -> bool:
        return self.destroyed or now >= self.expires


# The only RSA public exponent an imported key may have. With p, q and d in hand, e + lambda(n)
# is another exponent with the same signing function and a different public key: without this,
# one RSA key could be imported twice, under two scopes, past the store's one-key-pair rule.
RSA_PUBLIC_EXPONENT = 65537


def check_imported(public_der: bytes) -> None:
    """INVALID_ARGUMENT for a key pair this service will not import."""
    key = load_public_key(public_der)
    if isinstance(key, rsa.RSAPublicKey) and key.public_numbers().e != RSA_PUBLIC_EXPONENT:
        raise InvalidArgument(
            f"an imported RSA key must have the public exponent {RSA_PUBLIC_EXPONENT}"
        )


def check_usable(v: Version, now: datetime) -> None:
    """FAILED_PRECONDITION unless ``v`` may sign or verify now."""
    state = v.effective_state(now)
    if state is not State.ENABLED:
        raise FailedPrecondition(
            f"key {v.name!r} version {v.version} is {state.value.replace('_', ' ')}"
        )


# --- signing inputs and outputs -------------------------------------------------------------


def to_be_signed(
    alg: Algorithm, message: bytes | None, digest: bytes | None, pad: Padding
) -> tuple[SignMechanism, bytes]:
    """The mechanism and the bytes the token signs, from a message or a precomputed digest."""
    if alg.family is Family.ED25519:
        if digest is not None:
            raise InvalidArgument("ed25519 signs the message itself: send message, not digest")
        assert message is not None
        return SignMechanism.EDDSA, message
    if digest is not None:
        if len(digest) != alg.digest_size:
            raise InvalidArgument(
                f"digest must be {alg.digest_size} bytes ({alg.hash_name}) for {alg.name}, "
                f"got {len(digest)}"
            )
        d = digest
    else:
        assert message is not None
        d = alg.hash(message)
    if alg.family is Family.EC:
        return SignMechanism.ECDSA, d
    if pad is Padding.PSS:
        return SignMechanism.RSA_PKCS_PSS, d
    return SignMechanism.RSA_PKCS, SHA256_DIGEST_INFO + d


def ec_raw_to_der(raw: bytes) -> bytes:
    half = len(raw) // 2
    r = int.from_bytes(raw[:half], "big")
    s = int.from_bytes(raw[half:], "big")
    return utils.encode_dss_signature(r, s)


def format_signature(alg: Algorithm, token_signature: bytes, fmt: SigFormat) -> bytes:
    """ECDSA tokens return r || s; callers get DER unless they ask for raw (JWS)."""
    if alg.family is Family.EC and fmt is SigFormat.DER:
        return ec_raw_to_der(token_signature)
    return token_signature


# --- public keys -----------------------------------------------------------------------------

PublicKeyType = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def load_public_key(der: bytes) -> PublicKeyType:
    """A SubjectPublicKeyInfo this service can use; ValueError or TypeError for anything else,
    a caller's bytes included (ImportKeyVersion's public_key_der)."""
    try:
        key = serialization.load_der_public_key(der)
    except UnsupportedAlgorithm:
        # An EC key on a curve OpenSSL does not know: as unusable as a malformed one, and
        # refused the same way (it was INTERNAL; issue 12).
        raise ValueError("the public key's algorithm or curve is not supported") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise TypeError(f"unexpected public key type {type(key).__name__}")
    return key


_CURVE_KINDS = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def algorithm_kind(alg: Algorithm) -> str:
    """What an algorithm's keys are, as people name them: P-256, RSA-2048, Ed25519."""
    if alg.family is Family.EC:
        return _CURVE_KINDS[alg.curve or ""]
    if alg.family is Family.RSA:
        return f"RSA-{alg.bits}"
    return "Ed25519"


def public_key_kind(key: PublicKeyType) -> str:
    """The same naming for a public key: P-384, RSA-3072, Ed25519."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _CURVE_KINDS.get(key.curve.name, key.curve.name)
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return "Ed25519"


def with_article(kind: str) -> str:
    """'a P-384', 'an RSA-2048', 'an Ed25519'."""
    return f"an {kind}" if kind.startswith(("RSA", "Ed")) else f"a {kind}"


def public_pem(der: bytes) -> str:
    return (
        load_public_key(der)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(der: bytes, alg: Algorithm, kid: str) -> dict[str, str]:
    """RFC 7517 JWK of a public key, with kid, alg and use."""
    key = load_public_key(der)
    jwk: dict[str, str]
    if isinstance(key, ec.EllipticCurvePublicKey):
        nums = key.public_numbers()
        width = (key.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
        jwk = {
            "kty": "EC",
            "crv": crv,
            "x": _b64u(nums.x.to_bytes(width, "big")),
            "y": _b64u(nums.y.to_bytes(width, "big")),
        }
    elif isinstance(key, rsa.RSAPublicKey):
        rn = key.public_numbers()
        jwk = {
            "kty": "RSA",
            "n": _b64u(rn.n.to_bytes((rn.n.bit_length() + 7) // 8, "big")),
            "e": _b64u(rn.e.to_bytes((rn.e.bit_length() + 7) // 8, "big")),
        }
    else:
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64u(raw)}
    jwk.update({"kid": kid, "alg": alg.jws_alg(), "use": "sig"})
    return jwk


def public_jwk_json(der: bytes, alg: Algorithm, kid: str) -> str:
    return json.dumps(public_jwk(der, alg, kid), sort_keys=True)


def verify(
    der: bytes,
    alg: Algorithm,
    signature: bytes,
    message: bytes | None,
    digest: bytes | None,
    pad: Padding,
    fmt: SigFormat,
) -> bool:
    """Checks a signature with the public key alone: False for a mismatch, never an exception."""
    key = load_public_key(der)
    if alg.family is Family.ED25519:
        if digest is not None:
            raise InvalidArgument("ed25519 verifies the message itself: send message, not digest")
        assert isinstance(key, ed25519.Ed25519PublicKey)
        assert message is not None
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True
    if digest is not None and len(digest) != alg.digest_size:
        raise InvalidArgument(
            f"digest must be {alg.digest_size} bytes ({alg.hash_name}) for {alg.name}, "
            f"got {len(digest)}"
        )
    assert alg.hash_name is not None
    h: hashes.HashAlgorithm = {
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }[alg.hash_name]
    data = digest if digest is not None else message
    assert data is not None
    algo: hashes.HashAlgorithm | utils.Prehashed = utils.Prehashed(h) if digest is not None else h
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if fmt is SigFormat.RAW:
                width = (alg.bits + 7) // 8
                if len(signature) != 2 * width:
                    return False
                signature = ec_raw_to_der(signature)
            key.verify(signature, data, ec.ECDSA(algo))
        else:
            assert isinstance(key, rsa.RSAPublicKey)
            pad_obj: padding.AsymmetricPadding = (
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)
                if pad is Padding.PSS
                else padding.PKCS1v15()
            )
            key.verify(signature, data, pad_obj, algo)
    except InvalidSignature:
        return False
    return True
