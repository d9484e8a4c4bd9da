"""Drop-in keys (signer.dropin, issue 17 item 3) against the real service: code written for a key
in memory, unchanged, given a key in the token; verified with cryptography, PyJWT and openssl,
never with the service's own Verify."""

from __future__ import annotations

import asyncio
import copy
import datetime
import hashlib
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, utils
from cryptography.x509.oid import NameOID

from signer.client import SignerClient
from signer.dropin import (
    KeyURI,
    NotExportable,
    NotOffered,
    ServiceECPrivateKey,
    ServiceEd25519PrivateKey,
    ServiceRSAPrivateKey,
    aload_private_key,
    load_private_key,
    parse_uri,
)
from signer.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.conftest import RunningService, UniqueName

pytestmark = pytest.mark.integration

# What cryptography's x509 builders accept as a hash.
_X509Hash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512

CLAIMS = {"sub": "payments-batch-7", "aud": "ledger", "n": 42}


def _service_public_key(client: SignerClient, name: str, version: int = 0) -> Any:
    """The public key as the service publishes it, independently of the drop-in object."""
    return serialization.load_pem_public_key(client.public_key(name, version).pem.encode())


def _pem(key: Any) -> bytes:
    pem: bytes = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


# --- code written for in-memory keys: a certificate, a CSR, a JWT, a signing routine -----------
# Each takes a private key object and knows nothing of the service.


def self_signed(key: Any, algorithm: _X509Hash | None, **kw: Any) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name("drop-in test CA"))
        .issuer_name(_name("drop-in test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, algorithm, **kw)
    )


def csr(key: Any, algorithm: _X509Hash | None) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name("payments.internal"))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("payments.internal")]), False)
        .sign(key, algorithm)
    )


def sign_release(key: ec.EllipticCurvePrivateKey, artifact: bytes) -> bytes:
    """The README migration guide's signing routine, as written for a PEM key in memory."""
    return key.sign(artifact, ec.ECDSA(hashes.SHA256()))


# --- EC ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "jws", "h"),
    [
        ("ec-p256", "ES256", hashes.SHA256()),
        ("ec-p384", "ES384", hashes.SHA384()),
        ("ec-p521", "ES512", hashes.SHA512()),
    ],
)
def test_ec_key_sign_and_jwt_verify_with_the_published_public_key(
    client: SignerClient, unique_name: UniqueName, alg: str, jws: str, h: hashes.HashAlgorithm
) -> None:
    """key.sign and jwt.encode on a drop-in EC key produce signatures that cryptography and
    PyJWT accept with the public key the service publishes (so the token signed, with the
    right curve and hash); public_key() is that key, and curve/key_size are the key's."""
    name = unique_name()
    client.create_key(name, alg)
    key = load_private_key(f"signer://{name}", client=client)
    assert isinstance(key, ServiceECPrivateKey)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    published = _service_public_key(client, name)
    assert _pem(key.public_key()) == _pem(published)
    assert key.curve.name == published.curve.name
    assert key.key_size == published.curve.key_size

    message = b"ledger entry 1234" * 50
    published.verify(key.sign(message, ec.ECDSA(h)), message, ec.ECDSA(h))
    digest = hashlib.new(h.name, message).digest()
    published.verify(key.sign(digest, ec.ECDSA(utils.Prehashed(h))), message, ec.ECDSA(h))

    token = jwt.encode(CLAIMS, key, jws)
    assert jwt.decode(token, published, [jws], audience="ledger") == CLAIMS
    assert jwt.get_unverified_header(token)["alg"] == jws


def test_migration_guide_routine_unchanged(client: SignerClient, unique_name: UniqueName) -> None:
    """The README's signing routine, given a drop-in key (by its PKCS#11 URI) instead of a PEM
    key: its output verifies with the published public key. Only the digest travels: an
    artifact the service would refuse as a message (over server.max_message_bytes, 1 MiB)
    signs through the drop-in key."""
    name = unique_name()
    client.create_key(name, "ec-p256")
    key = load_private_key(f"pkcs11:object={name}", client=client)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    artifact = b"release-1.2.3.tar.gz contents " * 50_000  # 1.5 MB
    with pytest.raises(InvalidArgument):
        client.sign(name, message=artifact)
    sig = sign_release(key, artifact)
    _service_public_key(client, name).verify(sig, artifact, ec.ECDSA(hashes.SHA256()))


def test_certificate_and_csr_from_x509_builders_verify_with_openssl(
    client: SignerClient, unique_name: UniqueName, tmp_path: Path
) -> None:
    """cryptography's CertificateBuilder and CertificateSigningRequestBuilder sign with a
    drop-in key: the certificate verifies (cryptography's verify_directly_issued_by and
    `openssl verify`), the CSR's signature is valid (cryptography and `openssl req -verify`),
    and both carry the key's real public key."""
    name = unique_name()
    client.create_key(name, "ec-p256")
    key = load_private_key(f"signer://{name}?version=1", client=client)
    published = _service_public_key(client, name, 1)

    cert = self_signed(key, hashes.SHA256())
    cert.verify_directly_issued_by(cert)
    assert _pem(cert.public_key()) == _pem(published)
    (tmp_path / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.pem", "ca.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ca.pem: OK" in out.stdout

    request = csr(key, hashes.SHA256())
    assert request.is_signature_valid
    assert _pem(request.public_key()) == _pem(published)
    (tmp_path / "req.pem").write_bytes(request.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(
        ["openssl", "req", "-verify", "-noout", "-in", "req.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verify OK" in out.stdout + out.stderr


def test_ec_refuses_what_the_service_does_not_sign(
    client: SignerClient, unique_name: UniqueName
) -> None:
    """A P-256 key asked for SHA-512, a wrong-length Prehashed digest, deterministic ECDSA or
    ECDH is refused with an error saying so; never a signature of another kind."""
    name = unique_name()
    client.create_key(name, "ec-p256")
    key = load_private_key(f"signer://{name}", client=client)
    assert isinstance(key, ServiceECPrivateKey)
    with pytest.raises(NotOffered, match="sha256 only; asked for sha512"):
        key.sign(b"m", ec.ECDSA(hashes.SHA512()))
    with pytest.raises(UnsupportedAlgorithm):  # what code written for cryptography catches
        key.sign(b"m", ec.ECDSA(utils.Prehashed(hashes.SHA384())))
    with pytest.raises(InvalidArgument, match="32 bytes, got 5"):
        key.sign(b"short", ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    with pytest.raises(NotOffered, match="RFC 6979"):
        key.sign(b"m", ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    with pytest.raises(NotOffered, match="ECDH"):
        key.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())
    # As cryptography's own keys: an int is not data (bytes(32) would sign 32 zero bytes).
    for data in (32, "m"):
        with pytest.raises(TypeError, match="bytes-like"):
            key.sign(data, ec.ECDSA(utils.Prehashed(hashes.SHA256())))  # type: ignore[arg-type]


# --- RSA -----------------------------------------------------------------------------------


@pytest.fixture
def rsa_key(client: SignerClient, unique_name: UniqueName) -> ServiceRSAPrivateKey:
    name = unique_name()
    client.create_key(name, "rsa-2048")
    key = load_private_key(f"signer://{name}", client=client)
    assert isinstance(key, ServiceRSAPrivateKey)
    return key


def test_rsa_pss_and_pkcs1v15_verify_with_public_key(
    client: SignerClient, rsa_key: ServiceRSAPrivateKey
) -> None:
    """RSA sign with PSS (DIGEST_LENGTH and salt 32) and PKCS#1 v1.5, given the hash or
    Prehashed, verifies with public_key() and with the service's published key under the same
    padding (so each is the padding asked for, not the other)."""
    published = _service_public_key(client, rsa_key.name)
    assert _pem(rsa_key.public_key()) == _pem(published)
    assert rsa_key.key_size == 2048
    msg = b"wire transfer #981" * 30
    h = hashes.SHA256()
    pss = padding.PSS(padding.MGF1(h), padding.PSS.DIGEST_LENGTH)
    pss32 = padding.PSS(padding.MGF1(h), 32)
    v15 = padding.PKCS1v15()
    for pad in (pss, pss32, v15):
        sig = rsa_key.sign(msg, pad, h)
        rsa_key.public_key().verify(sig, msg, pad, h)
        published.verify(sig, msg, pad, h)
    sig = rsa_key.sign(hashlib.sha256(msg).digest(), v15, utils.Prehashed(h))
    published.verify(sig, msg, v15, h)
    # A PKCS#1 v1.5 signature is not a PSS one: the padding asked for is the one made.
    with pytest.raises(InvalidSignature):
        published.verify(rsa_key.sign(msg, v15, h), msg, pss, h)


def test_rsa_jwt_and_pss_certificate(
    client: SignerClient, rsa_key: ServiceRSAPrivateKey, tmp_path: Path
) -> None:
    """PyJWT's RS256 and PS256 and an RSA-PSS self-signed certificate from CertificateBuilder
    verify with the published key (openssl verify for the certificate)."""
    published = _service_public_key(client, rsa_key.name)
    for alg in ("RS256", "PS256"):
        token = jwt.encode(CLAIMS, rsa_key, alg)
        assert jwt.decode(token, published, [alg], audience="ledger") == CLAIMS
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    cert = self_signed(rsa_key, hashes.SHA256(), rsa_padding=pss)
    cert.verify_directly_issued_by(cert)
    (tmp_path / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.pem", "ca.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_rsa_refuses_other_salts_hashes_and_paddings(rsa_key: ServiceRSAPrivateKey) -> None:
    """PSS.MAX_LENGTH (222 bytes here, not the service's 32), another salt, MGF1 with another
    hash, SHA-384, NoDigestInfo, OAEP and decryption are refused; PSS.AUTO is refused for
    signing as cryptography refuses it."""
    h = hashes.SHA256()
    with pytest.raises(NotOffered, match=r"salt is 32 bytes.*MAX_LENGTH"):
        rsa_key.sign(b"m", padding.PSS(padding.MGF1(h), padding.PSS.MAX_LENGTH), h)
    with pytest.raises(NotOffered, match="salt_length=20"):
        rsa_key.sign(b"m", padding.PSS(padding.MGF1(h), 20), h)
    with pytest.raises(ValueError, match="AUTO"):
        rsa_key.sign(b"m", padding.PSS(padding.MGF1(h), padding.PSS.AUTO), h)
    with pytest.raises(NotOffered, match="MGF1 with SHA-256; asked for MGF1 with sha384"):
        rsa_key.sign(b"m", padding.PSS(padding.MGF1(hashes.SHA384()), 32), h)
    with pytest.raises(NotOffered, match="sha256 only; asked for sha384"):
        rsa_key.sign(b"m", padding.PKCS1v15(), hashes.SHA384())
    with pytest.raises(NotOffered, match="asked for NoDigestInfo"):
        rsa_key.sign(b"m", padding.PKCS1v15(), utils.NoDigestInfo())
    oaep = padding.OAEP(padding.MGF1(h), h, None)
    with pytest.raises(NotOffered, match="PSS or PKCS1v15 padding only, not OAEP"):
        rsa_key.sign(b"m", oaep, h)
    with pytest.raises(NotOffered, match="no decryption"):
        rsa_key.decrypt(b"\0" * 256, oaep)


# --- what never leaves the token ------------------------------------------------------------


def test_export_refused(client: SignerClient, rsa_key: ServiceRSAPrivateKey) -> None:
    """private_bytes (any encoding), private_numbers and pickling raise NotExportable naming
    why; copy returns the same key (as cryptography's keys do)."""
    ec_name = "dropin-export-ec-" + rsa_key.name
    client.create_key(ec_name, "ec-p256")
    ec_key = load_private_key(f"signer://{ec_name}", client=client)
    for key in (rsa_key, ec_key):
        with pytest.raises(NotExportable, match="never leaves the token"):
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        with pytest.raises(NotExportable, match=r"private_numbers\(\)"):
            key.private_numbers()
        with pytest.raises(NotExportable, match="pickling"):
            pickle.dumps(key)
        assert copy.copy(key) is key
        assert copy.deepcopy(key) is key


# --- versions --------------------------------------------------------------------------------


def test_disabled_fixed_version_refused_with_failed_precondition(
    client: SignerClient, unique_name: UniqueName
) -> None:
    """A key pinned to version 1 signs with version 1 (its public key, not the new primary's,
    verifies) and, once version 1 is disabled, sign() raises the service's FailedPrecondition;
    an unknown version fails to load with NotFound."""
    name = unique_name()
    client.create_key(name, "ec-p256")
    client.rotate(name)
    pinned = load_private_key(f"signer://{name}?version=1", client=client)
    v1 = _service_public_key(client, name, 1)
    v2 = _service_public_key(client, name, 2)
    assert _pem(pinned.public_key()) == _pem(v1) != _pem(v2)
    assert isinstance(pinned, ServiceECPrivateKey)
    sig = pinned.sign(b"m", ec.ECDSA(hashes.SHA256()))
    v1.verify(sig, b"m", ec.ECDSA(hashes.SHA256()))
    assert pinned.version == 1

    # A service answering with another version than the pinned one is refused, not followed:
    # the caller's public_key() would not verify the signature.
    real_sign = client.sign
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(client, "sign", lambda *a, **kw: real_sign(*a, **(kw | {"version": 0})))
        with pytest.raises(NotOffered, match="version 1; the service signed with version 2"):
            pinned.sign(b"m", ec.ECDSA(hashes.SHA256()))
    assert pinned.version == 1

    client.disable(name, 1)
    with pytest.raises(FailedPrecondition, match="version 1 is disabled"):
        pinned.sign(b"m", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(NotFound):
        load_private_key(f"signer://{name}?version=9", client=client)


def test_following_the_primary_public_key_tracks_the_signer(
    client: SignerClient, unique_name: UniqueName
) -> None:
    """Unpinned, a key signs with the primary of each call; after a rotation its public_key()
    is the version that signed last, so a signature verifies with the key's own public_key()."""
    name = unique_name()
    client.create_key(name, "ec-p256")
    key = load_private_key(f"signer://{name}", client=client)
    assert isinstance(key, ServiceECPrivateKey)
    key.sign(b"a", ec.ECDSA(hashes.SHA256()))
    assert key.version == 1
    client.rotate(name)
    sig = key.sign(b"b", ec.ECDSA(hashes.SHA256()))
    assert key.version == 2
    key.public_key().verify(sig, b"b", ec.ECDSA(hashes.SHA256()))
    assert _pem(key.public_key()) == _pem(_service_public_key(client, name, 2))


# --- loading ------------------------------------------------------------------------------


def test_uri_forms() -> None:
    """The URI forms accepted, and the ones refused rather than misread."""
    assert parse_uri("signer://payments") == KeyURI("payments", 0)
    assert parse_uri("signer://payments?version=2") == KeyURI("payments", 2)
    assert parse_uri("pkcs11:object=payments") == KeyURI("payments", 0)
    assert parse_uri("pkcs11:object=pay%2Dments;type=private;x-version=3") == KeyURI("pay-ments", 3)
    for bad in (
        "signer://",
        "signer://payments?version=0",
        "signer://payments?version=x",
        "signer://payments?v=2",
        "signer://payments/extra",
        "pkcs11:token=other;object=payments",
        "pkcs11:object=payments;type=public",
        "pkcs11:object=payments?pin-value=1234",
        "file:///etc/key.pem",
    ):
        with pytest.raises(InvalidArgument):
            parse_uri(bad)


def test_load_by_address_and_async(service: RunningService, unique_name: UniqueName) -> None:
    """load_private_key(address=...) makes and owns its client; aload_private_key and asign
    sign without blocking the loop, and the result verifies."""
    admin = service.client()
    name = unique_name()
    admin.create_key(name, "ec-p384")
    key = load_private_key(f"signer://{name}", address=service.address)
    try:
        assert isinstance(key, ServiceECPrivateKey)
        key.public_key().verify(
            key.sign(b"x", ec.ECDSA(hashes.SHA384())), b"x", ec.ECDSA(hashes.SHA384())
        )
    finally:
        key.close()

    async def main() -> bytes:
        k = await aload_private_key(f"signer://{name}", client=admin)
        assert isinstance(k, ServiceECPrivateKey)
        return await k.asign(b"y", ec.ECDSA(hashes.SHA384()))

    sig = asyncio.run(main())
    _service_public_key(admin, name).verify(sig, b"y", ec.ECDSA(hashes.SHA384()))


# --- Ed25519, where the module carries CKM_EDDSA (in-process; see test_ed25519_inprocess.py) -


@pytest.mark.inprocess
def test_ed25519_sign_jwt_certificate_and_refusals(inprocess_service: RunningService) -> None:
    """An Ed25519 drop-in key: sign(data) verifies with the published key, PyJWT's EdDSA and a
    CertificateBuilder certificate (algorithm None) verify, private_bytes_raw is refused."""
    client = inprocess_service.client()
    client.create_key("ed-dropin", "ed25519")
    key = load_private_key("signer://ed-dropin", client=client)
    assert isinstance(key, ServiceEd25519PrivateKey)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    published = _service_public_key(client, "ed-dropin")
    assert _pem(key.public_key()) == _pem(published)
    published.verify(key.sign(b"whole message"), b"whole message")
    token = jwt.encode(CLAIMS, key, "EdDSA")
    assert jwt.decode(token, published, ["EdDSA"], audience="ledger") == CLAIMS
    cert = self_signed(key, None)
    cert.verify_directly_issued_by(cert)
    with pytest.raises(NotExportable):
        key.private_bytes_raw()


# --- overhead ---------------------------------------------------------------------------------


def test_overhead_against_direct_client_sign(
    client: SignerClient, unique_name: UniqueName, capsys: pytest.CaptureFixture[str]
) -> None:
    """Median time of a drop-in sign() against client.sign(digest=...) and
    client.sign(message=...), 200 calls each, interleaved on one service; printed (the figures
    are in the README), not asserted. Every drop-in signature must verify."""
    name = unique_name()
    client.create_key(name, "ec-p256")
    key = load_private_key(f"signer://{name}", client=client)
    assert isinstance(key, ServiceECPrivateKey)
    pub = key.public_key()
    message = bytes(range(256)) * 4  # 1 KiB
    algo = ec.ECDSA(hashes.SHA256())
    digest = hashlib.sha256(message).digest()
    for _ in range(20):  # warm up
        key.sign(message, algo)
    times: dict[str, list[float]] = {"dropin": [], "digest": [], "message": []}
    sigs: list[bytes] = []
    for _ in range(200):
        t = time.perf_counter()
        sigs.append(key.sign(message, algo))
        times["dropin"].append(time.perf_counter() - t)
        t = time.perf_counter()
        client.sign(name, digest=digest)
        times["digest"].append(time.perf_counter() - t)
        t = time.perf_counter()
        client.sign(name, message=message)
        times["message"].append(time.perf_counter() - t)
    for s in sigs:
        pub.verify(s, message, algo)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    with capsys.disabled():
        print(
            f"\ndrop-in sign() median {med['dropin']:.0f} us; client.sign(digest=) "
            f"{med['digest']:.0f} us (overhead {med['dropin'] - med['digest']:+.0f} us, "
            f"{med['dropin'] / med['digest']:.3f}x); client.sign(message=) {med['message']:.0f} us"
        )


def test_the_module_needs_no_service_extra() -> None:
    """signer.dropin is client-side: importing it loads neither python-pkcs11 nor the service."""
    code = (
        "import sys, signer.dropin\n"
        "print(sorted(m for m in sys.modules if m == 'pkcs11' or m.startswith('signer._internal')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"
