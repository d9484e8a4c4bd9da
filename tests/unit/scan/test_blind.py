"""Blind mode: private keys found with only their public keys, and verified; nothing in random
data or in what merely looks like a key."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signer.errors import ScanError
from signer.keys import PublicKeyType
from signer.scan import Scanner, public_key_id, secret_from_key

from .conftest import Keys, Plant, memory_like

DER, PEM = serialization.Encoding.DER, serialization.Encoding.PEM
PKCS8, TRAD = serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL
NOENC = serialization.NoEncryption()


def public(keys: Keys, *names: str) -> dict[str, PublicKeyType]:
    every: dict[str, PublicKeyType] = {
        "rsa": keys.rsa2048.public_key(),
        "p256": keys.p256.public_key(),
        "p521": keys.p521.public_key(),
        "ed": keys.ed25519.public_key(),
    }
    return {name: every[name] for name in names}


@pytest.fixture(scope="module")
def blind(keys: Keys) -> Scanner:
    pubs = public(keys, "rsa", "p256", "p521", "ed")
    return Scanner([], public_keys=pubs, blind_budget_seconds=30)


@pytest.fixture(scope="module")
def likely(keys: Keys) -> Scanner:
    """Big-endian EC scalars and Ed25519 seeds at aligned and framed offsets only."""
    pubs = public(keys, "rsa", "p256", "ed")
    return Scanner([], public_keys=pubs, blind_budget_seconds=30, blind_offsets="likely")


def heap(size: int = 256 << 10) -> bytearray:
    return memory_like(size)


def only(path: Path, sc: Scanner) -> tuple[str, str, str, int, int, str]:
    result = sc.scan(path)
    assert result.blind is not None
    assert result.blind.complete, result.blind
    assert len(result.findings) == 1, result.findings
    f = result.findings[0]
    return f.secret_id, f.component, f.representation, f.offset, f.length, f.detail


@pytest.mark.parametrize(("fmt", "representation"), [(PKCS8, "der-pkcs8"), (TRAD, "der-pkcs1")])
def test_rsa_der_found_and_verified(
    blind: Scanner, keys: Keys, plant: Plant, fmt: serialization.PrivateFormat, representation: str
) -> None:
    der = keys.rsa2048.private_bytes(DER, fmt, NOENC)
    got = only(plant([(4097, der)], heap()), blind)
    assert got == (
        "rsa",
        "private-key",
        representation,
        4097,
        len(der),
        "verified: private key of public key rsa",
    )


@pytest.mark.parametrize(("fmt", "representation"), [(PKCS8, "der-pkcs8"), (TRAD, "der-sec1")])
def test_ec_der_found(
    blind: Scanner, keys: Keys, plant: Plant, fmt: serialization.PrivateFormat, representation: str
) -> None:
    der = keys.p521.private_bytes(DER, fmt, NOENC)
    sid, _comp, rep, off, length, detail = only(plant([(777, der)], heap()), blind)
    assert (sid, rep, off, length) == ("p521", representation, 777, len(der))
    assert detail.startswith("verified")


def test_pem_found(blind: Scanner, keys: Keys, plant: Plant) -> None:
    pem = keys.p256.private_bytes(PEM, PKCS8, NOENC)
    got = only(plant([(1001, pem)], heap()), blind)
    assert got[:5] == ("p256", "private-key", "pem-private-key", 1001, len(pem) - 1)


def test_openssh_found(blind: Scanner, keys: Keys, plant: Plant) -> None:
    text = keys.ed25519.private_bytes(PEM, serialization.PrivateFormat.OpenSSH, NOENC)
    sid, _, rep, off, _, _detail = only(plant([(1001, text)], heap()), blind)
    assert (sid, rep, off) == ("ed", "openssh-private", 1001)
    # The binary blob alone (a decoded copy in memory):
    body = b"".join(text.splitlines()[1:-1])
    blob = base64.b64decode(body)
    sid, _, rep, off, length, _ = only(plant([(2001, blob)], heap()), blind)
    assert (sid, rep, off, length) == ("ed", "openssh-private", 2001, len(blob))


def test_jwk_with_d_found_and_verified(blind: Scanner, keys: Keys, plant: Plant) -> None:
    nums = keys.p256.private_numbers()

    def b64u(v: int) -> str:
        return base64.urlsafe_b64encode(v.to_bytes(32, "big")).rstrip(b"=").decode()

    jwk = json.dumps(
        {
            "kty": "EC",
            "crv": "P-256",
            "x": b64u(nums.public_numbers.x),
            "y": b64u(nums.public_numbers.y),
            "d": b64u(nums.private_value),
        }
    ).encode()
    got = only(plant([(1001, b'{"keys": [' + jwk + b"]}")], heap()), blind)
    assert got == (
        "p256",
        "private-key",
        "jwk-private",
        1001 + 10,
        len(jwk),
        "verified: private key of public key p256",
    )


def test_bare_rsa_prime_verified(blind: Scanner, keys: Keys, plant: Plant) -> None:
    p = keys.rsa2048.private_numbers().p.to_bytes(128, "big")
    got = only(plant([(12345, p)], heap()), blind)
    assert got == (
        "rsa",
        "factor",
        "verified-rsa-factor",
        12345,
        128,
        "verified (big-endian): divides N of public key rsa",
    )


def test_rsa_prime_as_bignum_limbs_verified(blind: Scanner, keys: Keys, plant: Plant) -> None:
    q = keys.rsa2048.private_numbers().q.to_bytes(128, "little")
    got = only(plant([(8 * 1001, q)], heap()), blind)
    assert got[:5] == ("rsa", "factor", "verified-rsa-factor", 8 * 1001, 128)
    assert "little-endian 64-bit limbs" in got[5]


@pytest.mark.parametrize(("curve_key", "name"), [("p256", "p256"), ("p521", "p521")])
def test_bare_ec_scalar_verified(
    blind: Scanner, keys: Keys, plant: Plant, curve_key: str, name: str
) -> None:
    key: ec.EllipticCurvePrivateKey = getattr(keys, curve_key)
    width = (key.curve.key_size + 7) // 8
    d = key.private_numbers().private_value.to_bytes(width, "big")
    got = only(plant([(30001, d)], heap()), blind)
    assert got == (
        name,
        "private_value",
        "verified-ec-scalar",
        30001,
        width,
        f"verified (big-endian): d*G == Q of public key {name}",
    )


def test_ec_scalar_as_bignum_limbs_verified(blind: Scanner, keys: Keys, plant: Plant) -> None:
    d = keys.p256.private_numbers().private_value.to_bytes(32, "little")
    got = only(plant([(8 * 4001, d)], heap()), blind)
    assert got[:5] == ("p256", "private_value", "verified-ec-scalar", 8 * 4001, 32)


def test_ed25519_seed_verified(blind: Scanner, keys: Keys, plant: Plant) -> None:
    got = only(plant([(4321, keys.ed25519.private_bytes_raw())], heap()), blind)
    assert got[:5] == ("ed", "seed", "verified-ed25519-seed", 4321, 32)


def test_cut_jwk_reported_unverified(blind: Scanner, plant: Plant) -> None:
    cut = b'{"kty": "EC", "crv": "P-256", "d": "' + b"A" * 30
    got = only(plant([(1001, cut)], heap()), blind)
    assert got[:4] == ("unknown", "private-key", "jwk-private", 1001 + cut.index(b'"d"'))
    assert "unparseable" in got[5]


def test_private_key_of_another_public_key(blind: Scanner, plant: Plant) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    der = other.private_bytes(DER, PKCS8, NOENC)
    sid, _, rep, _, _, detail = only(plant([(1001, der)], heap()), blind)
    assert sid == f"unknown:{public_key_id(other.public_key())}"
    assert rep == "der-pkcs8"
    assert "matches none of the given public keys" in detail


def test_nothing_in_random_data(blind: Scanner, tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(1 << 20))
    assert blind.public_keys is not None
    pubs = list(blind.public_keys.keys.values())
    result = Scanner([], public_keys=pubs, blind_budget_seconds=1).scan(path)
    assert result.findings == []
    assert result.blind is not None
    checks = {c.name for c in result.blind.checks}
    assert {"rsa-factor-le64-aligned", "rsa-factor-be", "ec-scalar-be", "ed25519-seed-be"} <= checks
    assert all(c.bytes_total == 1 << 20 for c in result.blind.checks)
    assert all(0 <= c.bytes_covered <= c.bytes_total for c in result.blind.checks)


def test_nothing_in_memory_like_data_and_whole_coverage(blind: Scanner, plant: Plant) -> None:
    result = blind.scan(plant([], heap(1 << 20)))
    assert result.findings == []
    assert result.blind is not None
    assert result.blind.complete
    assert result.notes == []


def test_budget_exhausted_is_reported(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(1 << 20))
    sc = Scanner([], public_keys=[keys.p384.public_key()], blind_budget_seconds=0)
    result = sc.scan(path)
    assert result.blind is not None
    assert not result.blind.complete
    assert all(c.bytes_covered == 0 for c in result.blind.checks)
    assert any("did not cover all memory" in n for n in result.notes)


def test_lookalikes_are_not_findings(blind: Scanner, plant: Plant) -> None:
    """Constants in every process that imports cryptography: not keys."""
    items = [
        (1001, b"openssh-key-v1\x00\x00\x00\x01\x02junk"),  # cryptography's _SK_MAGIC + junk
        (3001, b'"-----BEGIN PRIVATE KEY-----"'),  # a header without a body
        (5001, b"-----BEGIN RSA PRIVATE KEY-----\n" + b"not base64 at all\n"),
        (7001, b'{"d": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}'),  # "d" but no "kty"
        (8001, b'{"kty": "EC", "x": "AAAA"} {"d": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"'),  # another's
        (9001, bytes.fromhex("3082025c020100300d06092a864886f70d0101010500")),  # DER head only
    ]
    assert blind.scan(plant(items, heap())).findings == []


def test_known_and_blind_together_report_once(keys: Keys, plant: Plant) -> None:
    sc = Scanner([secret_from_key(keys.p256, "ec")], public_keys={"ec-pub": keys.p256.public_key()})
    der = keys.p256.private_bytes(DER, PKCS8, NOENC)
    result = sc.scan(plant([(1001, der)], heap()))
    assert [(f.secret_id, f.representation) for f in result.findings] == [("ec", "pkcs8-der")]


def test_scalar_out_of_range_is_not_verified(blind: Scanner, plant: Plant) -> None:
    """All-ones windows pass the cheap filters; d >= n must be refused, not crash."""
    assert blind.scan(plant([(1001, b"\xff" * 80)], heap())).findings == []


def test_unsupported_public_key_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519

    with pytest.raises(ScanError, match="unsupported"):
        # An X25519 key, which the type does not allow: on purpose.
        Scanner([], public_keys=[x25519.X25519PrivateKey.generate().public_key()])  # type: ignore[list-item]


def test_no_secrets_and_no_public_keys_refused() -> None:
    with pytest.raises(ScanError, match="nothing to search for"):
        Scanner([])


def test_public_keys_by_list_are_named_by_fingerprint(keys: Keys, plant: Plant) -> None:
    pub: rsa.RSAPublicKey = keys.rsa2048.public_key()
    sc = Scanner([], public_keys=[pub, ed25519.Ed25519PrivateKey.generate().public_key()])
    result = sc.scan(plant([(101, keys.rsa2048.private_numbers().p.to_bytes(128, "big"))], heap()))
    assert [f.secret_id for f in result.findings] == [public_key_id(pub)]
    assert public_key_id(pub).startswith("rsa-2048:")


def test_keys_on_one_curve_share_a_check_and_findings_name_the_right_one(
    plant: Plant, tmp_path: Path
) -> None:
    # One scalar multiplication per candidate serves every key on the curve; the finding must
    # still name the key whose public point matched.
    privs = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    sc = Scanner(
        [],
        public_keys={f"p256-{i}": k.public_key() for i, k in enumerate(privs)},
        blind_budget_seconds=30,
    )
    d = privs[2].private_numbers().private_value.to_bytes(32, "big")
    got = only(plant([(40001, d)], heap()), sc)
    assert got[0] == "p256-2"
    assert got[5] == "verified (big-endian): d*G == Q of public key p256-2"
    result = sc.scan(plant([(40001, d)], heap()))
    assert result.blind is not None
    ec_checks = [c for c in result.blind.checks if "ec-scalar" in c.name]
    assert len(ec_checks) == 2  # one aligned-limbs and one big-endian check, not six


def test_zero_pages_count_as_covered_without_testing(plant: Plant) -> None:
    sc = Scanner([], public_keys={"p256": ec.generate_private_key(ec.SECP256R1()).public_key()})
    result = sc.scan(plant([], bytearray(4 << 20)))
    assert result.findings == []
    assert result.blind is not None
    assert result.blind.complete
    assert all(c.candidates == 0 for c in result.blind.checks)


# --- blind_offsets="likely" ------------------------------------------------------------------


def _framed_items(keys: Keys) -> list[tuple[str, bytes, bytes, int]]:
    """(key, framing before it, the number, its address mod 8) as serialisations hold them,
    unaligned."""
    p = keys.rsa2048.private_numbers().p.to_bytes(128, "big")
    d = keys.p256.private_numbers().private_value.to_bytes(32, "big")
    seed = keys.ed25519.private_bytes_raw()
    pub = keys.ed25519.public_key().public_bytes_raw()
    return [
        ("rsa", b"\x02\x81\x81\x00", p, 3),  # RSA: every offset, whatever the offsets
        ("p256", b"\x30\x77\x02\x01\x01\x04\x20", d, 3),  # SEC1's OCTET STRING
        ("p256", b"\x12\x20", d, 5),  # a protobuf bytes field
        ("p256", b"\x00\x00\x00\x21\x00", d, 3),  # an SSH mpint with its pad
        ("p256", b"\x21\x00\x00\x00\x00", d, 1),  # a Java byte[]: length, then a sign pad
        ("ed", b"\x00\x00\x00\x40", seed + pub, 7),  # OpenSSH's seed || public key
    ]


@pytest.mark.parametrize("which", range(6))
def test_likely_offsets_find_a_number_framed_by_its_serialisation(
    likely: Scanner, keys: Keys, plant: Plant, which: int
) -> None:
    owner, framing, number, residue = _framed_items(keys)[which]
    at = 8 * 2001 + residue  # unaligned (the file is the memory: its offsets are addresses)
    path = plant([(at - len(framing), framing + number)], heap())
    result = likely.scan(path)
    assert result.blind is not None
    assert result.blind.offsets == "likely"
    assert result.blind.complete
    assert [(f.secret_id, f.offset) for f in result.findings] == [(owner, at)]
    assert "verified (big-endian" in result.findings[0].detail


def test_likely_offsets_find_aligned_numbers_and_skip_unframed_unaligned_ones(
    likely: Scanner, blind: Scanner, keys: Keys, plant: Plant
) -> None:
    """What "likely" gives up, shown: the same scalar at an unaligned offset after a byte that
    frames nothing is found at every offset, not at the likely ones; 8-aligned, it is."""
    d = keys.p256.private_numbers().private_value.to_bytes(32, "big")
    unframed = plant([(30000, b"\x77" + d)], heap())
    assert [f.offset for f in blind.scan(unframed).findings] == [30001]
    skipped = likely.scan(unframed)
    assert skipped.findings == []
    assert skipped.blind is not None
    assert skipped.blind.complete
    assert [c.name for c in skipped.blind.checks] == [
        "rsa-factor-le64-aligned",
        "ec-scalar-le64-aligned",
        "rsa-factor-be",
        "ed25519-seed-be-aligned-or-framed",
        "ec-scalar-be-aligned-or-framed",
    ]
    aligned = plant([(30000, b"\x77" * 8 + d)], heap())
    assert [f.offset for f in likely.scan(aligned).findings] == [30008]


def test_blind_offsets_must_be_known(keys: Keys) -> None:
    with pytest.raises(ScanError, match="blind_offsets must be one of every, likely"):
        Scanner([], public_keys=[keys.p256.public_key()], blind_offsets="some")  # type: ignore[arg-type]
