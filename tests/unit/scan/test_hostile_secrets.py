"""Key files the scanner is handed, shaped to break it (issue 12): what loads is a key, anything
else ScanError naming the file, quickly and without reading more than MAX_KEY_FILE."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz import targets
from signer.errors import ScanError
from signer.scan import load_public_keys, load_secrets
from signer.scan._secrets import MAX_KEY_FILE


def b64(n: int | bytes) -> str:
    raw = n if isinstance(n, bytes) else n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwk_file(tmp_path: Path, jwk: dict[str, object]) -> Path:
    path = tmp_path / "key.jwk"
    path.write_text(json.dumps(jwk))
    return path


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        # p of 1: no CRT values exist.
        (
            {"kty": "RSA", "n": b64(15), "e": "AQAB", "d": b64(7), "p": b64(1), "q": b64(15)},
            "not a valid private key",
        ),
        # A modulus beyond OpenSSL's 16384 bits: recovering p and q would take minutes.
        (
            {"kty": "RSA", "n": b64((1 << 40000) + 1), "e": "AQAB", "d": b64(12345)},
            "RSA modulus of 40001 bits, more than 16384",
        ),
        (
            {"kty": "RSA", "n": b64((1 << 2047) + 1), "e": b64(1 << 200), "d": b64(12345)},
            "public exponent wider than 64 bits",
        ),
        ({"kty": "EC", "crv": "P-256", "d": b64(1 << 300)}, "not a valid private key"),
        ({"kty": "OKP", "crv": "Ed25519", "d": b64(1 << 300)}, "not a valid private key"),
        ({"kty": ["RSA"], "d": "AA"}, """key type "['RSA']" is not supported"""),
        ({"kty": "EC", "crv": "x" * 1000, "d": "AA"}, "characters)"),  # the curve shown bounded
    ],
)
def test_jwk_that_breaks_arithmetic(tmp_path: Path, jwk: dict[str, object], message: str) -> None:
    began = time.monotonic()
    with pytest.raises(ScanError) as ei:
        load_secrets([jwk_file(tmp_path, jwk)])
    assert message in ei.value.message
    assert time.monotonic() - began < 2


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        # x of 33 bytes: once an OverflowError out of the public-key loader.
        ({"kty": "OKP", "crv": "Ed25519", "x": b64(b"\1" * 33)}, "not a valid public key"),
        ({"kty": "RSA", "n": b64((1 << 20000) + 1), "e": "AQAB"}, "more than 16384"),
    ],
)
def test_public_jwk_that_breaks_arithmetic(
    tmp_path: Path, jwk: dict[str, object], message: str
) -> None:
    with pytest.raises(ScanError, match=message):
        load_public_keys([jwk_file(tmp_path, jwk)])


def test_key_files_that_are_not_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    big = tmp_path / "big.pem"
    big.write_bytes(b"\0" * (MAX_KEY_FILE + 1))
    for path, message in [
        (fifo, "is not a regular file"),
        (Path("/dev/zero"), "is not a regular file"),
        (big, f"larger than {MAX_KEY_FILE} bytes"),
    ]:
        with pytest.raises(ScanError, match=message):
            load_secrets([path])
        with pytest.raises(ScanError, match=message):
            load_public_keys([path])


def test_jwk_set_nested_thousands_deep(tmp_path: Path) -> None:
    """Once a RecursionError out of the JWK reader: the file is then not a JWK at all."""
    path = tmp_path / "deep.json"
    path.write_bytes(b'{"keys": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")
    with pytest.raises(ScanError, match="not a public key"):
        load_public_keys([path])
    [raw] = load_secrets([path])  # not a key: searched for as the raw secret it is
    assert raw.kind == "raw"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_as_a_key_file(data: bytes) -> None:
    targets.secrets_file(data)
