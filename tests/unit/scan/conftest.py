"""Keys, a PIN, one scanner compiled for all of them, and a factory for files with planted bytes.

Filler is seeded random bytes (deterministic), or "memory-like" bytes for blind mode: zero runs,
pointers, small integers and text, as a process's heap holds them, without high-entropy runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signer.scan import Scanner, Secret, secret_from_key, secret_from_pin

PIN = b"7f3a9c1e5b2d8f4a6c0e9b7d1f3a5c8e"  # 32 characters, like the token's PINs


@dataclass(frozen=True)
class Keys:
    rsa2048: rsa.RSAPrivateKey
    p256: ec.EllipticCurvePrivateKey
    p384: ec.EllipticCurvePrivateKey
    p521: ec.EllipticCurvePrivateKey
    ed25519: ed25519.Ed25519PrivateKey

    def secrets(self) -> list[Secret]:
        return [
            secret_from_key(self.rsa2048, "rsa-2048"),
            secret_from_key(self.p256, "ec-p256"),
            secret_from_key(self.p384, "ec-p384"),
            secret_from_key(self.p521, "ec-p521"),
            secret_from_key(self.ed25519, "ed25519"),
            secret_from_pin(PIN, "user-pin"),
        ]


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        rsa.generate_private_key(65537, 2048),
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP521R1()),
        ed25519.Ed25519PrivateKey.generate(),
    )


@pytest.fixture(scope="session")
def scanner(keys: Keys) -> Scanner:
    """Every test key and the PIN, compiled once."""
    return Scanner(keys.secrets())


def random_bytes(size: int, seed: int = 1) -> bytearray:
    return bytearray(random.Random(seed).randbytes(size))


def memory_like(size: int, seed: int = 2) -> bytearray:
    """Bytes shaped like a heap: zero runs, pointers, small integers, ASCII text."""
    rng = random.Random(seed)
    out = bytearray()
    words = [b"signer", b"PyObject", b"grpc", b"libcrypto.so.3", b"/usr/lib/python3", b"payload"]
    while len(out) < size:
        kind = rng.randrange(4)
        if kind == 0:
            out += bytes(rng.randrange(8, 256))
        elif kind == 1:
            out += (0x7F0000000000 + rng.randrange(1 << 32) * 16).to_bytes(8, "little")
        elif kind == 2:
            out += rng.randrange(1 << 16).to_bytes(8, "little")
        else:
            out += b" ".join(rng.choice(words) for _ in range(rng.randrange(1, 6))) + b"\0"
    return out[:size]


Plant = Callable[[Sequence[tuple[int, bytes]], bytearray | None], Path]


@pytest.fixture
def plant(tmp_path: Path) -> Plant:
    """``plant([(offset, data), ...], filler)`` writes filler (64 KiB random by default) with
    ``data`` at each offset, and returns the file."""
    counter = iter(range(1_000_000))

    def make(items: Sequence[tuple[int, bytes]], filler: bytearray | None = None) -> Path:
        buf = random_bytes(64 << 10) if filler is None else bytearray(filler)
        for offset, data in items:
            assert offset + len(data) <= len(buf)
            buf[offset : offset + len(data)] = data
        path = tmp_path / f"dump-{next(counter)}.bin"
        path.write_bytes(bytes(buf))
        return path

    return make
