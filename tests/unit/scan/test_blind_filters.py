"""Blind mode's pre-filters (issue 18) must not drop a true key: random key material passes
them, the small-prime sieve agrees with big-integer arithmetic, one check serves every key of a
size, and the libcrypto multiplication agrees with cryptography and is confirmed by it."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signer.scan import Scanner, _blind
from signer.scan._blind import (
    _SIEVE,
    MISS,
    _candidates,
    _ec_verifier,
    _framed,
    _libcrypto_multiplier,
    _max_repeats,
    _sieve,
    _Target,
)

from .conftest import memory_like


def _target(length: int, odd: bool = False) -> _Target:
    return _Target("k", "c", "r", length, 0, 255, odd, lambda _: None, "")


@pytest.mark.parametrize("length", [32, 66, 128, 256])
def test_random_windows_pass_the_statistical_filters(length: int) -> None:
    """Of 16 MiB of uniformly random windows, side by side (so each is drawn on its own), the
    zero, high-byte and repeat filters drop at most 2e-5 (the zero cut drops about 5e-6, the
    repeat cut below 1e-6)."""
    n = (16 << 20) // length
    a = np.random.default_rng(length).integers(0, 256, n * length + length, dtype=np.uint8)
    idx = np.arange(0, n * length, length)
    dropped = n - len(_candidates(a, idx, _target(length), little=False))
    assert dropped <= 2e-5 * n + 1, dropped


def test_repeat_cut_is_a_binomial_tail_below_miss() -> None:
    for length, pairs in ((32, 192), (128, 960)):
        cut = _max_repeats(length)

        def tail(t: int, n: int = pairs, p: float = 1 / 256) -> float:
            return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(t + 1, n + 1))

        assert tail(cut) < MISS <= tail(cut - 1)
        assert MISS <= 1e-8


def test_repeat_filter_drops_fill_patterns() -> None:
    a = np.frombuffer(b"\xa5" * 4096 + bytes(range(128, 256)) * 32, dtype=np.uint8)
    idx = np.arange(len(a) - 32 + 1)
    kept = set(_candidates(a, idx, _target(32), little=False).tolist())
    assert not kept & set(range(4096 - 32))  # 0xa5 fill: all high, no zero, only repeats
    assert set(range(4096, len(a) - 31)) <= kept  # 128 distinct bytes at every offset


@pytest.mark.parametrize("little", [False, True])
def test_sieve_agrees_with_big_integers(little: bool) -> None:
    rng = random.Random(7)
    L = 128
    a = np.frombuffer(rng.randbytes(20000 + L), dtype=np.uint8)
    idx = np.arange(0, 20000, 3)
    order: Literal["little", "big"] = "little" if little else "big"
    raw = a.tobytes()
    expected = [
        o
        for o in idx.tolist()
        if math.gcd(int.from_bytes(raw[o : o + L], order), math.prod(_SIEVE)) == 1
    ]
    assert _sieve(a, idx, L, little).tolist() == expected
    assert 0.2 < len(expected) / len(idx) < 0.35  # the sieve rejects most windows


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(65537, 2048) for _ in range(3)]


@given(
    data=st.data(),
    which=st.integers(0, 2),
    little=st.booleans(),
    heap=st.booleans(),
    use_q=st.booleans(),
)
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_rsa_prime_planted_anywhere_is_found(
    rsa_keys: list[rsa.RSAPrivateKey],
    tmp_path: Path,
    data: st.DataObject,
    which: int,
    little: bool,
    heap: bool,
    use_q: bool,
) -> None:
    """Three RSA-2048 keys share one check per layout; a prime of any of them, big-endian at
    any offset or in limbs at an 8-aligned one, in random or heap-like bytes, is found and
    named."""
    size = 64 << 10
    filler = memory_like(size, seed=which) if heap else bytearray(os.urandom(size))
    nums = rsa_keys[which].private_numbers()
    prime = (nums.q if use_q else nums.p).to_bytes(128, "little" if little else "big")
    at = data.draw(st.integers(0, size - 128))
    if little:
        at -= at % 8
    filler[at : at + 128] = prime
    path = tmp_path / "dump.bin"
    path.write_bytes(bytes(filler))
    sc = Scanner(
        [],
        public_keys={f"rsa-{i}": k.public_key() for i, k in enumerate(rsa_keys)},
        blind_budget_seconds=60,
    )
    result = sc.scan(path)
    assert result.blind is not None
    assert [c.name for c in result.blind.checks if "rsa" in c.name] == [
        "rsa-factor-le64-aligned",
        "rsa-factor-be",
    ]
    assert [(f.secret_id, f.offset) for f in result.findings] == [(f"rsa-{which}", at)]


@given(data=st.data(), little=st.booleans(), heap=st.booleans())
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_ec_scalar_planted_anywhere_is_found(
    tmp_path: Path, data: st.DataObject, little: bool, heap: bool
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    size = 16 << 10
    filler = memory_like(size, seed=3) if heap else bytearray(os.urandom(size))
    at = data.draw(st.integers(0, size - 32))
    if little:
        at -= at % 8
    filler[at : at + 32] = key.private_numbers().private_value.to_bytes(
        32, "little" if little else "big"
    )
    path = tmp_path / "dump.bin"
    path.write_bytes(bytes(filler))
    sc = Scanner([], public_keys={"ec": key.public_key()}, blind_budget_seconds=60)
    assert [(f.secret_id, f.offset) for f in sc.scan(path).findings] == [("ec", at)]


def test_rsa_keys_of_other_sizes_get_checks_of_their_own() -> None:
    keys = _blind.PublicKeys(
        {
            "a": rsa.generate_private_key(65537, 2048).public_key(),
            "b": rsa.generate_private_key(65537, 2048).public_key(),
            "c": rsa.generate_private_key(65537, 3072).public_key(),
        }
    )
    got = sorted((c.name, c.target.key_id, c.target.length) for c in _blind._checks(keys))
    assert got == [
        ("rsa-factor-be", "a,b", 128),
        ("rsa-factor-be", "c", 192),
        ("rsa-factor-le64-aligned", "a,b", 128),
        ("rsa-factor-le64-aligned", "c", 192),
    ]


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()])
def test_libcrypto_multiplication_agrees_and_matches_are_confirmed(
    curve: ec.EllipticCurve,
) -> None:
    assert _libcrypto_multiplier(curve.name) is not None  # the system's libcrypto loads here
    keys = [ec.generate_private_key(curve) for _ in range(2)]
    named = {f"k{i}": k.public_key() for i, k in enumerate(keys)}
    fast, slow = _ec_verifier(named, fast=True), _ec_verifier(named, fast=False)
    assert fast is not slow
    for i, k in enumerate(keys):
        d = k.private_numbers().private_value
        assert fast(d) == slow(d) == f"k{i}"
        assert fast(d + 1) is None
        assert slow(d + 1) is None
    # d + n names the same point mod n, but is no scalar of the key: refused by both.
    order = {256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551}.get(
        curve.key_size
    )
    if order is not None:
        d = keys[0].private_numbers().private_value
        if d + order < 1 << 256:
            assert fast(d + order) is None
            assert slow(d + order) is None
    assert fast(0) is None
    assert slow(0) is None


def test_libcrypto_multiplier_is_made_once_and_safe_from_threads() -> None:
    """A Scanner may scan from several threads: each gets its own libcrypto objects (a BN_CTX
    shared between threads gives wrong points or crashes)."""
    from concurrent.futures import ThreadPoolExecutor

    from cryptography.hazmat.primitives import serialization

    multiply = _libcrypto_multiplier("secp256r1")
    assert multiply is not None
    assert _libcrypto_multiplier("secp256r1") is multiply
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(32)]
    x962 = serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    expected = [k.public_key().public_bytes(*x962) for k in keys]
    scalars = [k.private_numbers().private_value.to_bytes(32, "big") for k in keys]

    def run(_: int) -> list[bytes]:
        return [multiply(d) for _ in range(20) for d in scalars][-len(scalars) :]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert all(r == expected for r in results)


@pytest.mark.parametrize("length", [32, 66])
@pytest.mark.parametrize("address", [0x1000, 0x1001, 0x1003, 0x1007])
def test_likely_offsets_are_the_aligned_and_the_framed_ones(length: int, address: int) -> None:
    """Every window at an 8-aligned address is kept, and an unaligned one exactly when the bytes
    before it frame a number of ``length`` bytes; windows whose framing would start before the
    block are kept."""
    rng = random.Random(length + address)
    raw = bytearray(rng.randbytes(1 << 16))
    for at in rng.sample(range(2, len(raw)), 2000):  # pads after a length one larger, too
        raw[at - 2 : at] = bytes([(length + 1) & 0xFF, 0])
    a = np.frombuffer(bytes(raw), dtype=np.uint8)
    idx = np.arange(len(raw) - 300)

    def framed(i: int) -> bool:
        p1, p2 = int(a[i - 1]), int(a[i - 2])
        pad = p1 == 0 and (p2 == (length + 1) & 0xFF or (address + i) % 8 == 1)
        return p1 in {length & 0xFF, (2 * length) & 0xFF} or pad

    want = [int(i) for i in idx if i < 2 or (address + i) % 8 == 0 or framed(int(i))]
    got = _framed(a, idx, length, address).tolist()
    assert got == want
    # About 1/8 aligned, 2/256 of the rest after one framing byte, and the planted pads.
    assert len(idx) // 8 < len(got) < len(idx) // 8 + len(idx) // 100 + 2000
