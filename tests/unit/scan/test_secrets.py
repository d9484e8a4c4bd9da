"""Secrets and public keys from the files an operator has: every format, and clear refusals."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa

from signer.errors import ScanError
from signer.scan import (
    Secret,
    load_public_keys,
    load_secrets,
    secret_from_key,
    secret_from_pin,
)
from signer.scan._secrets import PrivateKey

from .conftest import PIN, Keys

PEM, DER = serialization.Encoding.PEM, serialization.Encoding.DER
PKCS8, TRAD = serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL
OPENSSH = serialization.PrivateFormat.OpenSSH
NOENC = serialization.NoEncryption()


def b64u(value: int, length: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(length, "big")).rstrip(b"=").decode()


def test_rsa_components(keys: Keys) -> None:
    s = secret_from_key(keys.rsa2048, "k")
    nums = keys.rsa2048.private_numbers()
    assert (s.id, s.kind) == ("k", "rsa")
    assert list(s.components) == [
        "d",
        "p",
        "q",
        "dP",
        "dQ",
        "qInv",
        "pkcs1-der",
        "pkcs8-der",
        "openssh-key",
        "ppk-private",
    ]
    assert s.components["d"] == nums.d.to_bytes(256, "big")
    assert s.components["qInv"] == nums.iqmp.to_bytes(128, "big")
    assert s.components["pkcs8-der"] == keys.rsa2048.private_bytes(DER, PKCS8, NOENC)
    assert s.public_der == keys.rsa2048.public_key().public_bytes(
        DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_ec_and_ed25519_components(keys: Keys) -> None:
    s = secret_from_key(keys.p521, "k")
    assert list(s.components) == ["private_value", "sec1-der", "pkcs8-der", "openssh-key"]
    assert len(s.components["private_value"]) == 66
    e = secret_from_key(keys.ed25519, "e")
    assert e.kind == "ed25519"
    assert e.components["seed"] == keys.ed25519.private_bytes_raw()


def test_unsupported_key_type() -> None:
    key = dsa.generate_private_key(1024)
    with pytest.raises(ScanError, match="unsupported key type"):
        secret_from_key(key, "dsa")  # type: ignore[arg-type]  # a DSA key, on purpose


def test_short_pin_refused_without_showing_it() -> None:
    with pytest.raises(ScanError, match="shorter than 6 bytes") as exc:
        secret_from_pin(b"12345", "p")
    assert "12345" not in str(exc.value)
    assert secret_from_pin(b"123456", "p").components == {"pin": b"123456"}
    with pytest.raises(TypeError):
        secret_from_pin("123456", "p")  # type: ignore[arg-type]  # str, not bytes: on purpose


def test_uniform_pin_refused_not_silently_skipped() -> None:
    from signer.scan import Scanner

    with pytest.raises(ScanError, match="too uniform"):
        Scanner([secret_from_pin(b"aaaaaaaa", "p")])


def test_secret_validates() -> None:
    with pytest.raises(ScanError, match="kind"):
        Secret("x", "dsa", {"raw": b"abcdefgh"})
    with pytest.raises(ScanError, match="shorter than 6"):
        Secret("x", "raw", {"raw": b"abc"})
    with pytest.raises(ScanError, match="non-empty"):
        Secret("", "raw", {"raw": b"abcdefgh"})


def test_load_every_private_key_format(tmp_path: Path, keys: Keys) -> None:
    files = {
        "pkcs8.pem": keys.rsa2048.private_bytes(PEM, PKCS8, NOENC),
        "pkcs1.pem": keys.rsa2048.private_bytes(PEM, TRAD, NOENC),
        "sec1.pem": keys.p256.private_bytes(PEM, TRAD, NOENC),
        "ed.pem": keys.ed25519.private_bytes(PEM, PKCS8, NOENC),
        "ssh-ed": keys.ed25519.private_bytes(PEM, OPENSSH, NOENC),
        "ssh-ec": keys.p384.private_bytes(PEM, OPENSSH, NOENC),
        "key.der": keys.p521.private_bytes(DER, PKCS8, NOENC),
        "sec1.der": keys.p521.private_bytes(DER, TRAD, NOENC),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    got = load_secrets([tmp_path / n for n in files])
    in_files: list[PrivateKey] = [
        keys.rsa2048,
        keys.rsa2048,
        keys.p256,
        keys.ed25519,
        keys.ed25519,
        keys.p384,
        keys.p521,
        keys.p521,
    ]
    expected = [secret_from_key(k, n) for n, k in zip(files, in_files, strict=True)]
    assert got == expected


def test_files_sharing_a_name_are_told_apart_by_their_paths(tmp_path: Path, keys: Keys) -> None:
    """Two services' key.pem: each searched, under its own id (the gate's configs list such
    files; with ids by name alone the scanner refused the pair and every dump failed closed)."""
    a, b = tmp_path / "a" / "key.pem", tmp_path / "b" / "key.pem"
    for path, key in ((a, keys.p256), (b, keys.p384)):
        path.parent.mkdir()
        path.write_bytes(key.private_bytes(PEM, PKCS8, NOENC))
    (tmp_path / "user.pin").write_bytes(PIN + b"\n")
    got = load_secrets([a, b, tmp_path / "user.pin"])
    assert [s.id for s in got] == [str(a), str(b), "user.pin"]
    assert got[:2] == [secret_from_key(keys.p256, str(a)), secret_from_key(keys.p384, str(b))]


def test_load_jwk_and_jwk_set(tmp_path: Path, keys: Keys) -> None:
    rn = keys.rsa2048.private_numbers()
    rsa_jwk = {"kty": "RSA", "n": b64u(rn.public_numbers.n, 256), "e": "AQAB", "d": b64u(rn.d, 256)}
    en = keys.p256.private_numbers()
    ec_jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64u(en.public_numbers.x, 32),
        "y": b64u(en.public_numbers.y, 32),
        "d": b64u(en.private_value, 32),
    }
    ed_jwk = {
        "kty": "OKP",
        "crv": "Ed25519",
        "d": b64u(int.from_bytes(keys.ed25519.private_bytes_raw(), "big"), 32),
    }
    (tmp_path / "one.jwk").write_text(json.dumps(ec_jwk))
    (tmp_path / "set.json").write_text(json.dumps({"keys": [rsa_jwk, ed_jwk]}))
    got = load_secrets([tmp_path / "one.jwk", tmp_path / "set.json"])
    assert [s.id for s in got] == ["one.jwk", "set.json#0", "set.json#1"]
    assert got[0].components == secret_from_key(keys.p256, "x").components
    assert got[1].components["p"] in (
        rn.p.to_bytes(128, "big"),
        rn.q.to_bytes(128, "big"),
    )  # recovered factors may come in either order
    assert got[2].components["seed"] == keys.ed25519.private_bytes_raw()


def test_public_jwk_is_not_a_secret(tmp_path: Path) -> None:
    (tmp_path / "pub.jwk").write_text('{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}')
    with pytest.raises(ScanError, match="no private part"):
        load_secrets([tmp_path / "pub.jwk"])


def test_pin_and_raw_files(tmp_path: Path) -> None:
    (tmp_path / "user.pin").write_bytes(PIN + b"\n")
    (tmp_path / "token.txt").write_bytes(b"s3cr3t-token-value\r\n")
    (tmp_path / "short.pin").write_bytes(b"1234\n")
    pin, raw = load_secrets([tmp_path / "user.pin", tmp_path / "token.txt"])
    assert (pin.id, pin.kind, pin.components) == ("user.pin", "pin", {"pin": PIN})
    assert (raw.kind, raw.components) == ("raw", {"raw": b"s3cr3t-token-value"})
    with pytest.raises(ScanError, match=r"PIN 'short.pin' is 4 bytes"):
        load_secrets([tmp_path / "short.pin"])
    (tmp_path / "big.p12").write_bytes(b"\x01" * 70_000)
    with pytest.raises(ScanError, match="more than 65536"):
        load_secrets([tmp_path / "big.p12"])


def test_encrypted_key_refused(tmp_path: Path, keys: Keys) -> None:
    enc = serialization.BestAvailableEncryption(b"password")
    (tmp_path / "enc.pem").write_bytes(keys.p256.private_bytes(PEM, PKCS8, enc))
    with pytest.raises(ScanError, match="encrypted"):
        load_secrets([tmp_path / "enc.pem"])


def test_pem_without_private_key_refused(tmp_path: Path, keys: Keys) -> None:
    pub = keys.p256.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pub)
    with pytest.raises(ScanError, match="no private key"):
        load_secrets([tmp_path / "pub.pem"])


def test_missing_file_is_a_scan_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ScanError) as ei:
        load_secrets([missing])
    assert ei.value.message == f"secrets file {missing}: No such file or directory"
    assert isinstance(ei.value.__cause__, FileNotFoundError)


def test_load_public_keys(tmp_path: Path, keys: Keys) -> None:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    files = {
        "rsa.pem": keys.rsa2048.public_key().public_bytes(PEM, spki),
        "ec.der": keys.p256.public_key().public_bytes(DER, spki),
        "ed.pub": keys.ed25519.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
        "priv.pem": keys.p384.private_bytes(PEM, PKCS8, NOENC),
        "pub.jwk": json.dumps(
            {
                "kty": "EC",
                "crv": "P-521",
                "x": b64u(keys.p521.public_key().public_numbers().x, 66),
                "y": b64u(keys.p521.public_key().public_numbers().y, 66),
            }
        ).encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    got = load_public_keys([tmp_path / n for n in files])
    assert list(got) == list(files)
    assert got["rsa.pem"] == keys.rsa2048.public_key()
    assert got["ec.der"] == keys.p256.public_key()
    assert got["ed.pub"] == keys.ed25519.public_key()
    assert got["priv.pem"] == keys.p384.public_key()
    assert got["pub.jwk"] == keys.p521.public_key()
    (tmp_path / "junk").write_bytes(b"not a key")
    with pytest.raises(ScanError, match="not a public key"):
        load_public_keys([tmp_path / "junk"])
