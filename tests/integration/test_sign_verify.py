"""Every algorithm the token path offers: sign through the service, verify independently."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from signer.client import SignerClient
from signer.keys import ALGORITHMS
from tests.conftest import FakeClock, TokenHostHandle, make_config, start_service

pytestmark = pytest.mark.integration

# What Debian's p11-kit 0.24.1 forwards; ed25519 is tested in-process (test_ed25519_inprocess.py).
P11KIT_ALGORITHMS = ["ec-p256", "ec-p384", "ec-p521", "rsa-2048", "rsa-3072", "rsa-4096"]
# The ``keys`` fixture: a client, and the name of the key made for each algorithm.
Keys = tuple[SignerClient, dict[str, str]]
HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


@pytest.fixture(scope="module")
def keys(token_host: TokenHostHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    """One key per algorithm, created once through a real service (RSA-4096 takes seconds)."""
    svc = start_service(
        make_config(tmp_path_factory.mktemp("sv"), token_host.token_config()), FakeClock()
    )
    client = svc.client()
    names: dict[str, str] = {}
    for alg in P11KIT_ALGORITHMS:
        names[alg] = f"sv-{alg}"
        client.create_key(names[alg], alg)
    yield client, names
    svc.stop()


def test_service_offers_exactly_what_the_module_supports(keys: Keys) -> None:
    client, _ = keys
    with pytest.raises(Exception, match="CKM_EDDSA"):
        client.create_key("ed-not-here", "ed25519")


@pytest.mark.parametrize("alg", P11KIT_ALGORITHMS)
@pytest.mark.parametrize("mode", ["message", "digest"])
def test_signature_verifies_with_openssl_and_cryptography(
    keys: Keys, alg: str, mode: str, tmp_path: Path
) -> None:
    client, names = keys
    name = names[alg]
    a = ALGORITHMS[alg]
    assert a.hash_name is not None
    message = f"payload for {alg} {mode}".encode() * 7
    digest = hashlib.new(a.hash_name, message).digest()
    if mode == "message":
        sig = client.sign(name, message=message)
    else:
        sig = client.sign(name, digest=digest)
    assert sig.version == 1
    assert sig.algorithm == alg

    pem = client.public_key(name).pem.encode()
    pub = serialization.load_pem_public_key(pem)
    h = HASHES[a.hash_name]
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(sig.signature, message, ec.ECDSA(h))
        assert sig.signature_algorithm == f"ECDSA-{a.hash_name.upper()}"
    else:
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(sig.signature, message, padding.PSS(padding.MGF1(h), 32), h)

    # The same signature through the openssl CLI, as a verifier with no Python would do it.
    (tmp_path / "pub.pem").write_bytes(pem)
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(sig.signature)
    cmd = ["openssl", "dgst", f"-{a.hash_name}", "-verify", "pub.pem", "-signature", "sig"]
    if a.family.value == "rsa":
        cmd += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32"]
    out = subprocess.run([*cmd, "msg"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Verified OK" in out.stdout

    # The Verify RPC agrees, and rejects a wrong signature and a wrong message.
    assert client.verify(name, sig.signature, message=message)
    bad = bytearray(sig.signature)
    bad[len(bad) // 2] ^= 0x01
    assert not client.verify(name, bytes(bad), message=message)
    assert not client.verify(name, sig.signature, message=message + b"!")


@pytest.mark.parametrize("alg", ["rsa-2048", "rsa-3072"])
def test_rsa_pkcs1v15_verifies_with_openssl(keys: Keys, alg: str, tmp_path: Path) -> None:
    client, names = keys
    message = b"pkcs1 v1.5 payload"
    sig = client.sign(names[alg], message=message, rsa_padding="pkcs1v15")
    assert sig.signature_algorithm == "RSASSA-PKCS1-v1_5-SHA256"
    pub = serialization.load_pem_public_key(client.public_key(names[alg]).pem.encode())
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(sig.signature, message, padding.PKCS1v15(), hashes.SHA256())
    (tmp_path / "pub.pem").write_text(client.public_key(names[alg]).pem)
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(sig.signature)
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig", "msg"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert client.verify(names[alg], sig.signature, message=message, rsa_padding="pkcs1v15")
    # A PKCS#1 v1.5 signature is not a PSS signature.
    assert not client.verify(names[alg], sig.signature, message=message, rsa_padding="pss")


@pytest.mark.parametrize("alg", ["ec-p256", "ec-p384", "ec-p521"])
def test_ecdsa_raw_format_is_fixed_width_r_s(keys: Keys, alg: str) -> None:
    client, names = keys
    a = ALGORITHMS[alg]
    assert a.hash_name is not None
    width = (a.bits + 7) // 8
    message = b"jws payload"
    sig = client.sign(names[alg], message=message, signature_format="raw")
    assert len(sig.signature) == 2 * width
    r = int.from_bytes(sig.signature[:width], "big")
    s = int.from_bytes(sig.signature[width:], "big")
    pub = serialization.load_pem_public_key(client.public_key(names[alg]).pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(utils.encode_dss_signature(r, s), message, ec.ECDSA(HASHES[a.hash_name]))
    assert client.verify(names[alg], sig.signature, message=message, signature_format="raw")


def test_jwk_matches_pem(keys: Keys) -> None:
    client, names = keys
    for alg, name in names.items():
        jwk = json.loads(client.public_key(name, format="jwk").jwk)
        assert jwk["kid"] == f"{name}/1"
        assert jwk["use"] == "sig"
        assert jwk["alg"] == ALGORITHMS[alg].jws_alg()
        pub = serialization.load_pem_public_key(client.public_key(name).pem.encode())
        if isinstance(pub, ec.EllipticCurvePublicKey):
            import base64

            x = int.from_bytes(base64.urlsafe_b64decode(jwk["x"] + "=="), "big")
            assert x == pub.public_numbers().x
        else:
            assert jwk["kty"] == "RSA"
