"""signer.keys: algorithms, names, signing inputs, signature formats, verification, public keys."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from signer.errors import FailedPrecondition, InvalidArgument, NotFound
from signer.keys import (
    ALGORITHMS,
    PSS_SALT_LENGTH,
    SHA256_DIGEST_INFO,
    Algorithm,
    Family,
    Key,
    Padding,
    SigFormat,
    SignMechanism,
    State,
    Version,
    algorithm,
    algorithm_kind,
    check_labels,
    check_name,
    check_scope,
    check_usable,
    ec_raw_to_der,
    format_signature,
    load_public_key,
    public_jwk,
    public_jwk_json,
    public_key_kind,
    public_pem,
    to_be_signed,
    verify,
    with_article,
)

EC_ALGS = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1(), "ec-p521": ec.SECP521R1()}
HASHES = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# The private keys the service holds.
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def spki(private_key: PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@functools.cache
def ec_key(alg_name: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(EC_ALGS[alg_name])


@functools.cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def b64u_int(s: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)), "big")


# --- algorithms and names ----------------------------------------------------------------------


def test_algorithm_known() -> None:
    assert algorithm("ec-p256") is ALGORITHMS["ec-p256"]
    assert set(ALGORITHMS) == {
        "ec-p256",
        "ec-p384",
        "ec-p521",
        "rsa-2048",
        "rsa-3072",
        "rsa-4096",
        "ed25519",
    }


def test_algorithm_unknown_lists_known_ones() -> None:
    with pytest.raises(InvalidArgument) as ei:
        algorithm("ec-p999")
    assert type(ei.value) is InvalidArgument
    assert "'ec-p999'" in ei.value.message
    for name in ALGORITHMS:
        assert name in ei.value.message


@pytest.mark.parametrize(
    ("name", "hash_name", "size", "jws", "sigalg"),
    [
        ("ec-p256", "sha256", 32, "ES256", "ECDSA-SHA256"),
        ("ec-p384", "sha384", 48, "ES384", "ECDSA-SHA384"),
        ("ec-p521", "sha512", 64, "ES512", "ECDSA-SHA512"),
        ("rsa-2048", "sha256", 32, "PS256", "RSASSA-PSS-SHA256"),
        ("rsa-4096", "sha256", 32, "PS256", "RSASSA-PSS-SHA256"),
        ("ed25519", None, None, "EdDSA", "Ed25519"),
    ],
)
def test_algorithm_properties(
    name: str, hash_name: str | None, size: int | None, jws: str, sigalg: str
) -> None:
    alg = ALGORITHMS[name]
    assert alg.hash_name == hash_name
    assert alg.digest_size == size
    assert alg.jws_alg() == jws
    assert alg.signature_algorithm(Padding.PSS) == sigalg
    assert alg.sign_mechanisms  # the token's names for them: tests/unit/token/test_mechanisms.py
    assert to_be_signed(alg, b"m", None, Padding.PSS)[0] in alg.sign_mechanisms
    assert to_be_signed(alg, b"m", None, Padding.PKCS1V15)[0] in alg.sign_mechanisms


def test_rsa_pkcs1v15_names() -> None:
    alg = ALGORITHMS["rsa-3072"]
    assert alg.jws_alg(Padding.PKCS1V15) == "RS256"
    assert alg.signature_algorithm(Padding.PKCS1V15) == "RSASSA-PKCS1-v1_5-SHA256"
    assert alg.sign_mechanisms == (SignMechanism.RSA_PKCS_PSS, SignMechanism.RSA_PKCS)


@pytest.mark.parametrize("name", ["a", "0", "payments", "a.b_c-d", "k-1.2_3", "a" * 63, "9z"])
def test_check_name_valid(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "A", "Payments", "-a", ".a", "_a", "a" * 64, "a b", "a/b", "a:b", "é", "a\n", "a\x00"],
)
def test_check_name_invalid(name: str) -> None:
    with pytest.raises(InvalidArgument, match="is invalid"):
        check_name(name)


def test_check_scope() -> None:
    assert check_scope("") == ""
    assert check_scope("team:payments.prod") == "team:payments.prod"
    for bad in ("Team", ":x", "a b", "x" * 64):
        with pytest.raises(InvalidArgument, match="scope"):
            check_scope(bad)


def test_check_labels() -> None:
    assert check_labels({"env": "prod", "team_1": "x" * 256}) == {
        "env": "prod",
        "team_1": "x" * 256,
    }
    with pytest.raises(InvalidArgument, match="label key"):
        check_labels({"Env": "prod"})
    with pytest.raises(InvalidArgument, match="longer than 256"):
        check_labels({"env": "x" * 257})
    with pytest.raises(InvalidArgument, match="at most 64"):
        check_labels({f"k{i}": "" for i in range(65)})


# --- to_be_signed ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EC_ALGS))
def test_ec_digest_passthrough(name: str) -> None:
    alg = ALGORITHMS[name]
    digest = bytes(range(alg.digest_size or 0))
    assert to_be_signed(alg, None, digest, Padding.PSS) == (SignMechanism.ECDSA, digest)


@pytest.mark.parametrize(
    ("name", "fn"),
    [("ec-p256", hashlib.sha256), ("ec-p384", hashlib.sha384), ("ec-p521", hashlib.sha512)],
)
def test_ec_message_hashed_with_curve_hash(name: str, fn: Callable[[bytes], Any]) -> None:
    mech, data = to_be_signed(ALGORITHMS[name], b"hello", None, Padding.PSS)
    assert mech is SignMechanism.ECDSA
    assert data == fn(b"hello").digest()


@pytest.mark.parametrize("name", ["ec-p256", "ec-p384", "ec-p521", "rsa-2048"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_digest_length(name: str, delta: int) -> None:
    alg = ALGORITHMS[name]
    size = (alg.digest_size or 0) + delta
    with pytest.raises(InvalidArgument, match=f"digest must be {alg.digest_size} bytes"):
        to_be_signed(alg, None, b"\x01" * size, Padding.PSS)


def test_empty_digest_is_wrong_length() -> None:
    with pytest.raises(InvalidArgument, match="got 0"):
        to_be_signed(ALGORITHMS["ec-p256"], None, b"", Padding.PSS)


def test_rsa_pss_signs_the_digest() -> None:
    alg = ALGORITHMS["rsa-2048"]
    assert to_be_signed(alg, b"m", None, Padding.PSS) == (
        SignMechanism.RSA_PKCS_PSS,
        hashlib.sha256(b"m").digest(),
    )
    d = b"\x07" * 32
    assert to_be_signed(alg, None, d, Padding.PSS) == (SignMechanism.RSA_PKCS_PSS, d)


def test_rsa_pkcs1v15_is_digest_info() -> None:
    alg = ALGORITHMS["rsa-2048"]
    mech, data = to_be_signed(alg, b"m", None, Padding.PKCS1V15)
    assert mech is SignMechanism.RSA_PKCS
    assert data == SHA256_DIGEST_INFO + hashlib.sha256(b"m").digest()
    d = b"\x42" * 32
    assert to_be_signed(alg, None, d, Padding.PKCS1V15) == (
        SignMechanism.RSA_PKCS,
        SHA256_DIGEST_INFO + d,
    )


def test_sha256_digest_info_is_rfc8017_value() -> None:
    # RFC 8017, section 9.2, note 1: SHA-256 (0x)30 31 30 0d 06 09 60 86 48 01 65 03 04 02 01 05 00
    # 04 20 || H.
    rfc = bytes.fromhex("30 31 30 0d 06 09 60 86 48 01 65 03 04 02 01 05 00 04 20".replace(" ", ""))
    assert rfc == SHA256_DIGEST_INFO


def test_sha256_digest_info_matches_cryptography() -> None:
    """Recover the encoded message from a cryptography PKCS#1 v1.5 signature (raw RSA public
    operation) and check that its DigestInfo is exactly what we send to CKM_RSA_PKCS."""
    key = rsa_key()
    message = b"digest info"
    sig = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    nums = key.public_key().public_numbers()
    k = (nums.n.bit_length() + 7) // 8
    em = pow(int.from_bytes(sig, "big"), nums.e, nums.n).to_bytes(k, "big")
    assert em[:2] == b"\x00\x01"
    sep = em.index(b"\x00", 2)
    assert set(em[2:sep]) == {0xFF}
    _, data = to_be_signed(ALGORITHMS["rsa-2048"], message, None, Padding.PKCS1V15)
    assert em[sep + 1 :] == data


def test_ed25519_signs_message_whole() -> None:
    alg = ALGORITHMS["ed25519"]
    assert to_be_signed(alg, b"whole message", None, Padding.PSS) == (
        SignMechanism.EDDSA,
        b"whole message",
    )


def test_ed25519_refuses_digest() -> None:
    with pytest.raises(InvalidArgument, match="ed25519 signs the message itself"):
        to_be_signed(ALGORITHMS["ed25519"], None, b"\x00" * 32, Padding.PSS)


def der_to_raw(der: bytes, alg: Algorithm) -> bytes:
    width = (alg.bits + 7) // 8
    r, s = utils.decode_dss_signature(der)
    return r.to_bytes(width, "big") + s.to_bytes(width, "big")


# --- signature formats -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EC_ALGS))
def test_ec_raw_der_round_trip(name: str) -> None:
    alg = ALGORITHMS[name]
    width = (alg.bits + 7) // 8
    for i in range(8):
        der = ec_key(name).sign(b"msg %d" % i, ec.ECDSA(HASHES[alg.hash_name or ""]))
        r, s = utils.decode_dss_signature(der)
        raw = r.to_bytes(width, "big") + s.to_bytes(width, "big")
        assert ec_raw_to_der(raw) == der


def test_ec_raw_keeps_leading_zeros() -> None:
    raw = (1).to_bytes(32, "big") + (2).to_bytes(32, "big")
    assert ec_raw_to_der(raw) == utils.encode_dss_signature(1, 2)


def test_format_signature() -> None:
    ec_alg = ALGORITHMS["ec-p384"]
    raw = (5).to_bytes(48, "big") + (7).to_bytes(48, "big")
    assert format_signature(ec_alg, raw, SigFormat.DER) == utils.encode_dss_signature(5, 7)
    assert format_signature(ec_alg, raw, SigFormat.RAW) == raw
    assert format_signature(ALGORITHMS["rsa-2048"], b"rsa", SigFormat.DER) == b"rsa"
    assert format_signature(ALGORITHMS["ed25519"], b"ed", SigFormat.DER) == b"ed"


# --- verify ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EC_ALGS))
def test_verify_ec_der_and_raw(name: str) -> None:
    alg = ALGORITHMS[name]
    key = ec_key(name)
    der_pub = spki(key)
    h = HASHES[alg.hash_name or ""]
    sig = key.sign(b"payload", ec.ECDSA(h))
    raw = der_to_raw(sig, alg)
    digest = alg.hash(b"payload")
    for fmt, s in ((SigFormat.DER, sig), (SigFormat.RAW, raw)):
        assert verify(der_pub, alg, s, b"payload", None, Padding.PSS, fmt) is True
        assert verify(der_pub, alg, s, None, digest, Padding.PSS, fmt) is True
        assert verify(der_pub, alg, s, b"payload!", None, Padding.PSS, fmt) is False
    # A signature over a precomputed digest verifies against the message too.
    sig2 = key.sign(digest, ec.ECDSA(utils.Prehashed(h)))
    assert verify(der_pub, alg, sig2, b"payload", None, Padding.PSS, SigFormat.DER) is True


def test_verify_ec_tampered_and_malformed_are_false() -> None:
    alg = ALGORITHMS["ec-p256"]
    key = ec_key("ec-p256")
    pub = spki(key)
    raw = der_to_raw(key.sign(b"m", ec.ECDSA(hashes.SHA256())), alg)
    flipped = bytes([raw[0] ^ 1]) + raw[1:]
    assert verify(pub, alg, flipped, b"m", None, Padding.PSS, SigFormat.RAW) is False
    assert verify(pub, alg, raw[:-1], b"m", None, Padding.PSS, SigFormat.RAW) is False
    assert verify(pub, alg, raw + b"\x00", b"m", None, Padding.PSS, SigFormat.RAW) is False
    assert verify(pub, alg, b"garbage", b"m", None, Padding.PSS, SigFormat.DER) is False
    # raw bytes where DER is expected
    assert verify(pub, alg, raw, b"m", None, Padding.PSS, SigFormat.DER) is False


def test_verify_ec_other_key_is_false() -> None:
    alg = ALGORITHMS["ec-p256"]
    sig = ec_key("ec-p256").sign(b"m", ec.ECDSA(hashes.SHA256()))
    other = spki(ec.generate_private_key(ec.SECP256R1()))
    assert verify(other, alg, sig, b"m", None, Padding.PSS, SigFormat.DER) is False


def test_verify_wrong_digest_length_is_invalid_argument() -> None:
    alg = ALGORITHMS["ec-p384"]
    sig = ec_key("ec-p384").sign(b"m", ec.ECDSA(hashes.SHA384()))
    with pytest.raises(InvalidArgument, match="digest must be 48 bytes"):
        verify(spki(ec_key("ec-p384")), alg, sig, None, b"\x00" * 32, Padding.PSS, SigFormat.DER)


def test_verify_rsa_pss_salt_32() -> None:
    alg = ALGORITHMS["rsa-2048"]
    key = rsa_key()
    pub = spki(key)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)
    sig = key.sign(b"rsa message", pss, hashes.SHA256())
    digest = hashlib.sha256(b"rsa message").digest()
    assert PSS_SALT_LENGTH == 32
    assert verify(pub, alg, sig, b"rsa message", None, Padding.PSS, SigFormat.DER) is True
    assert verify(pub, alg, sig, None, digest, Padding.PSS, SigFormat.DER) is True
    assert verify(pub, alg, sig, b"rsa messagf", None, Padding.PSS, SigFormat.DER) is False
    tampered = bytes([sig[0] ^ 0x80]) + sig[1:]
    assert verify(pub, alg, tampered, b"rsa message", None, Padding.PSS, SigFormat.DER) is False
    # PSS and PKCS#1 v1.5 are not interchangeable
    assert verify(pub, alg, sig, b"rsa message", None, Padding.PKCS1V15, SigFormat.DER) is False
    # The salt length is pinned to 32: a signature with another salt length does not verify.
    other_salt = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=20)
    sig20 = key.sign(b"rsa message", other_salt, hashes.SHA256())
    assert verify(pub, alg, sig20, b"rsa message", None, Padding.PSS, SigFormat.DER) is False


def test_verify_rsa_pkcs1v15() -> None:
    alg = ALGORITHMS["rsa-2048"]
    key = rsa_key()
    pub = spki(key)
    sig = key.sign(b"v15", padding.PKCS1v15(), hashes.SHA256())
    assert verify(pub, alg, sig, b"v15", None, Padding.PKCS1V15, SigFormat.DER) is True
    digest = hashlib.sha256(b"v15").digest()
    assert verify(pub, alg, sig, None, digest, Padding.PKCS1V15, SigFormat.DER) is True
    assert verify(pub, alg, sig, b"v16", None, Padding.PKCS1V15, SigFormat.DER) is False
    assert verify(pub, alg, sig, b"v15", None, Padding.PSS, SigFormat.DER) is False
    assert verify(pub, alg, sig[:-1], b"v15", None, Padding.PKCS1V15, SigFormat.DER) is False
    assert verify(pub, alg, b"x", b"v15", None, Padding.PKCS1V15, SigFormat.DER) is False


def test_verify_ed25519() -> None:
    alg = ALGORITHMS["ed25519"]
    key = ed_key()
    pub = spki(key)
    sig = key.sign(b"edwards")
    assert verify(pub, alg, sig, b"edwards", None, Padding.PSS, SigFormat.DER) is True
    assert verify(pub, alg, sig, b"edwardz", None, Padding.PSS, SigFormat.DER) is False
    assert (
        verify(
            pub, alg, bytes([sig[0] ^ 1]) + sig[1:], b"edwards", None, Padding.PSS, SigFormat.DER
        )
        is False
    )
    assert verify(pub, alg, sig[:10], b"edwards", None, Padding.PSS, SigFormat.RAW) is False
    with pytest.raises(InvalidArgument, match="ed25519 verifies the message itself"):
        verify(pub, alg, sig, None, b"\x00" * 32, Padding.PSS, SigFormat.DER)


# --- public keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "crv", "width"),
    [("ec-p256", "P-256", 32), ("ec-p384", "P-384", 48), ("ec-p521", "P-521", 66)],
)
def test_public_jwk_ec_round_trip(name: str, crv: str, width: int) -> None:
    alg = ALGORITHMS[name]
    key = ec_key(name)
    jwk = public_jwk(spki(key), alg, "k/1")
    assert jwk["kty"] == "EC"
    assert jwk["crv"] == crv
    assert jwk["kid"] == "k/1"
    assert jwk["alg"] == alg.jws_alg()
    assert jwk["use"] == "sig"
    for coord in ("x", "y"):
        assert "=" not in jwk[coord]
        assert len(base64.urlsafe_b64decode(jwk[coord] + "=" * (-len(jwk[coord]) % 4))) == width
    rebuilt = ec.EllipticCurvePublicNumbers(
        b64u_int(jwk["x"]), b64u_int(jwk["y"]), EC_ALGS[name]
    ).public_key()
    assert rebuilt.public_numbers() == key.public_key().public_numbers()


def test_public_jwk_rsa_round_trip() -> None:
    alg = ALGORITHMS["rsa-2048"]
    key = rsa_key()
    jwk = public_jwk(spki(key), alg, "r/2")
    assert set(jwk) == {"kty", "n", "e", "kid", "alg", "use"}
    assert jwk["kty"] == "RSA"
    assert jwk["e"] == "AQAB"
    assert jwk["alg"] == "PS256"
    assert "=" not in jwk["n"]
    rebuilt = rsa.RSAPublicNumbers(b64u_int(jwk["e"]), b64u_int(jwk["n"])).public_key()
    assert rebuilt.public_numbers() == key.public_key().public_numbers()


def test_public_jwk_ed25519_round_trip() -> None:
    alg = ALGORITHMS["ed25519"]
    key = ed_key()
    jwk = public_jwk(spki(key), alg, "e/3")
    assert {k: jwk[k] for k in ("kty", "crv", "alg", "use", "kid")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "use": "sig",
        "kid": "e/3",
    }
    raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
    rebuilt = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    assert spki_of_public(rebuilt) == spki(key)


def spki_of_public(pub: ed25519.Ed25519PublicKey) -> bytes:
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_public_jwk_json_is_sorted_json_of_jwk() -> None:
    alg = ALGORITHMS["ec-p256"]
    der = spki(ec_key("ec-p256"))
    text = public_jwk_json(der, alg, "k/1")
    assert json.loads(text) == public_jwk(der, alg, "k/1")
    assert list(json.loads(text)) == sorted(json.loads(text))


@pytest.mark.parametrize("which", ["ec", "rsa", "ed25519"])
def test_public_pem(which: str) -> None:
    makers: dict[str, Callable[[], PrivateKey]] = {
        "ec": lambda: ec_key("ec-p384"),
        "rsa": rsa_key,
        "ed25519": ed_key,
    }
    key = makers[which]()
    pem = public_pem(spki(key))
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert pem.rstrip().endswith("-----END PUBLIC KEY-----")
    loaded = serialization.load_pem_public_key(pem.encode())
    assert loaded.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == spki(key)


# --- versions and states -----------------------------------------------------------------------


def version(state: State, destroy_at: datetime | None = None, number: int = 1) -> Version:
    return Version("k", number, "ec-p256", state, b"\x01" * 16, b"pub", T0, destroy_at)


def test_effective_state_scheduled() -> None:
    at = T0 + timedelta(days=7)
    v = version(State.DESTRUCTION_SCHEDULED, at)
    assert v.effective_state(at - timedelta(microseconds=1)) is State.DESTRUCTION_SCHEDULED
    assert v.effective_state(at) is State.DESTROYED
    assert v.effective_state(at + timedelta(days=1)) is State.DESTROYED


def test_effective_state_other_states_unchanged() -> None:
    later = T0 + timedelta(days=365)
    for s in (State.ENABLED, State.DISABLED, State.DESTROYED):
        assert version(s).effective_state(later) is s
    # Scheduled without a time never turns into destroyed by itself.
    assert (
        version(State.DESTRUCTION_SCHEDULED).effective_state(later) is State.DESTRUCTION_SCHEDULED
    )


def test_check_usable() -> None:
    check_usable(version(State.ENABLED), T0)
    with pytest.raises(FailedPrecondition, match="version 1 is disabled"):
        check_usable(version(State.DISABLED), T0)
    at = T0 + timedelta(days=1)
    with pytest.raises(FailedPrecondition, match="is destruction scheduled"):
        check_usable(version(State.DESTRUCTION_SCHEDULED, at), T0)
    with pytest.raises(FailedPrecondition, match="is destroyed"):
        check_usable(version(State.DESTRUCTION_SCHEDULED, at), at)
    with pytest.raises(FailedPrecondition, match="is destroyed"):
        check_usable(version(State.DESTROYED), T0)


def test_key_version_lookup() -> None:
    v1, v2 = version(State.ENABLED, number=1), version(State.ENABLED, number=2)
    key = Key("k", "ec-p256", 2, "", {}, T0, (v1, v2))
    assert key.version(0) is v2
    assert key.version(1) is v1
    with pytest.raises(NotFound, match="no version 3"):
        key.version(3)


def test_family_of_every_algorithm() -> None:
    fams = {a.name: a.family for a in ALGORITHMS.values()}
    assert fams["ed25519"] is Family.ED25519
    assert all(fams[n] is Family.EC for n in EC_ALGS)
    assert all(fams[f"rsa-{b}"] is Family.RSA for b in (2048, 3072, 4096))


def test_kinds_and_articles() -> None:
    assert [algorithm_kind(a) for a in ALGORITHMS.values()] == [
        "P-256",
        "P-384",
        "P-521",
        "RSA-2048",
        "RSA-3072",
        "RSA-4096",
        "Ed25519",
    ]
    p384 = load_public_key(spki(ec.generate_private_key(ec.SECP384R1())))
    assert public_key_kind(p384) == "P-384"
    assert public_key_kind(load_public_key(spki(rsa_key()))) == "RSA-2048"
    assert public_key_kind(load_public_key(spki(ed25519.Ed25519PrivateKey.generate()))) == (
        "Ed25519"
    )
    assert [with_article(k) for k in ("P-384", "RSA-2048", "Ed25519")] == [
        "a P-384",
        "an RSA-2048",
        "an Ed25519",
    ]
