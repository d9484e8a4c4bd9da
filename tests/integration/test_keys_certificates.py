"""``signer keys csr`` and ``signer keys certificate`` (issue 17, item 4) against a real service,
through the command line, checked with openssl and cryptography, never with the service's own
Verify: CSRs signed by keys in the token, a CA key's self-signed certificate, and leaves issued
under it; and the refusals (a tampered CSR, another key's CA certificate, a malformed subject,
an unknown SAN type, days out of range)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from signer.client import SignerClient
from tests.conftest import RunningService, UniqueName, signer_cli

pytestmark = pytest.mark.integration


def make_csr(*args: str, address: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``signer keys csr ARGS``, which must succeed."""
    return ok(signer_cli("keys", "csr", *args, address=address, cwd=cwd))


def leaf_csr(
    client: SignerClient,
    unique_name: UniqueName,
    addr: str,
    cwd: Path,
    subject: str,
    *sans: str,
    alg: str = "ec-p256",
) -> str:
    """A new key ``leaf-*`` and its CSR in ``cwd/leaf.csr`` (``sans``: "DNS:..." and the like);
    its name."""
    leaf = unique_name("leaf")
    client.create_key(leaf, alg)
    flags = [f for san in sans for f in ("--san", san)]
    make_csr(leaf, "--subject", subject, *flags, "--out", "leaf.csr", address=addr, cwd=cwd)
    return leaf


def openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2 with ``error: INVALID_ARGUMENT: ...`` naming the problem, and nothing on stdout."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: INVALID_ARGUMENT: "), r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert r.stdout == ""


def published(client: SignerClient, name: str) -> bytes:
    """The key's public key as the service publishes it (SubjectPublicKeyInfo DER)."""
    key = serialization.load_pem_public_key(client.public_key(name).pem.encode())
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return cert_or_csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_ca(
    client: SignerClient,
    name: str,
    cn: str,
    addr: str,
    cwd: Path,
    out: str = "ca.pem",
    path_length: int = 0,
) -> x509.Certificate:
    """The two-step flow of the README: the CA key's CSR, then its self-signed CA certificate."""
    client.create_key(name, "ec-p256")
    make_csr(
        name,
        "--subject",
        f"CN={cn},O=Example",
        "--out",
        f"{name}.csr",
        address=addr,
        cwd=cwd,
    )
    ok(
        signer_cli(
            "keys",
            "certificate",
            name,
            "--csr",
            f"{name}.csr",
            "--ca",
            "--path-length",
            str(path_length),
            "--days",
            "30",
            "--out",
            out,
            address=addr,
            cwd=cwd,
        )
    )
    return x509.load_pem_x509_certificate((cwd / out).read_bytes())


@pytest.fixture
def ca(
    client: SignerClient, service: RunningService, unique_name: UniqueName, tmp_path: Path
) -> str:
    name = unique_name("ca")
    make_ca(client, name, "Test CA", service.address, tmp_path)
    return name


def test_ca_certificate_self_signed_for_a_key_in_the_token(
    client: SignerClient, service: RunningService, unique_name: UniqueName, tmp_path: Path
) -> None:
    """A CA key (ec-p256) gets a self-signed CA certificate in two steps (its CSR, then
    ``certificate --ca`` without --ca-cert): openssl takes it as its own trust anchor, it carries
    the token key's published public key, its subject is both subject and issuer, and it is a
    CA (BasicConstraints cA, pathlen 0, keyCertSign, SKI = AKI)."""
    name = unique_name("ca")
    cert = make_ca(client, name, "Self CA", service.address, tmp_path)
    ok(openssl("verify", "-CAfile", "ca.pem", "ca.pem", cwd=tmp_path))
    assert spki(cert) == published(client, name)
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=Self CA,O=Example"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert cert.serial_number.bit_length() > 64  # random, 128 bits (a 1 in 2^64 chance to fail)


def test_ec_leaf_csr_and_server_certificate_verify_with_openssl(
    client: SignerClient,
    service: RunningService,
    ca: str,
    unique_name: UniqueName,
    tmp_path: Path,
) -> None:
    """An ec-p256 leaf key makes a CSR with two SANs (``openssl req -verify`` passes: the token's
    key signed it); the CA key issues a serverAuth certificate under its CA certificate, and
    ``openssl verify -CAfile ca.pem`` passes, also with ``-purpose sslserver -verify_hostname``
    for the DNS SAN; a hostname the certificate does not name fails the same check (so the
    check is the certificate's SANs, not a formality). The certificate carries the leaf key's
    published public key and the CA certificate's subject as issuer."""
    addr = service.address
    leaf = leaf_csr(
        client,
        unique_name,
        addr,
        tmp_path,
        "CN=api.example,O=Example",
        "DNS:api.example",
        "IP:10.0.0.1",
    )
    r = ok(openssl("req", "-verify", "-noout", "-in", "leaf.csr", cwd=tmp_path))
    assert "verify OK" in r.stdout + r.stderr
    csr = x509.load_pem_x509_csr((tmp_path / "leaf.csr").read_bytes())
    assert spki(csr) == published(client, leaf)

    r = ok(
        signer_cli(
            "keys",
            "certificate",
            ca,
            "--csr",
            "leaf.csr",
            "--ca-cert",
            "ca.pem",
            "--days",
            "7",
            "--extended-key-usage",
            "serverAuth",
            address=addr,
            cwd=tmp_path,
        )
    )
    (tmp_path / "leaf.pem").write_text(r.stdout)  # PEM on stdout without --out
    ok(openssl("verify", "-CAfile", "ca.pem", "leaf.pem", cwd=tmp_path))
    ok(
        openssl(
            "verify",
            "-CAfile",
            "ca.pem",
            "-purpose",
            "sslserver",
            "-verify_hostname",
            "api.example",
            "leaf.pem",
            cwd=tmp_path,
        )
    )
    ok(
        openssl(
            "verify",
            "-CAfile",
            "ca.pem",
            "-purpose",
            "sslserver",
            "-verify_ip",
            "10.0.0.1",
            "leaf.pem",
            cwd=tmp_path,
        )
    )
    wrong = openssl(
        "verify",
        "-CAfile",
        "ca.pem",
        "-purpose",
        "sslserver",
        "-verify_hostname",
        "other.example",
        "leaf.pem",
        cwd=tmp_path,
    )
    assert wrong.returncode != 0
    assert "hostname mismatch" in wrong.stdout + wrong.stderr

    cert = x509.load_pem_x509_certificate(r.stdout.encode())
    ca_cert = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert spki(cert) == published(client, leaf)
    assert cert.issuer == ca_cert.subject
    assert cert.subject == csr.subject
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["api.example"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days == 7
    assert lifetime.seconds == 60


def test_rsa_leaf_csr_pkcs1v15_and_pss_and_client_certificate(
    client: SignerClient,
    service: RunningService,
    ca: str,
    unique_name: UniqueName,
    tmp_path: Path,
) -> None:
    """An rsa-2048 leaf key's CSR is signed with PKCS#1 v1.5 by default and RSASSA-PSS with
    --pss, and ``openssl req -verify`` passes for both (the signature algorithms are checked, so
    a --pss that did nothing would fail); the EC CA issues a clientAuth certificate for it that
    ``openssl verify -purpose sslclient`` accepts, with an RSA leaf's default KeyUsage."""
    addr = service.address
    leaf = unique_name("rsa")
    client.create_key(leaf, "rsa-2048")
    for flags, out, alg in (
        ((), "v15.csr", SignatureAlgorithmOID.RSA_WITH_SHA256),
        (("--pss",), "pss.csr", SignatureAlgorithmOID.RSASSA_PSS),
    ):
        make_csr(
            leaf,
            "--subject",
            "CN=batch-7,OU=Payments,O=Example",
            *flags,
            "--out",
            out,
            address=addr,
            cwd=tmp_path,
        )
        r = ok(openssl("req", "-verify", "-noout", "-in", out, cwd=tmp_path))
        assert "verify OK" in r.stdout + r.stderr
        csr = x509.load_pem_x509_csr((tmp_path / out).read_bytes())
        assert csr.signature_algorithm_oid == alg
        assert spki(csr) == published(client, leaf)
    pss_csr = x509.load_pem_x509_csr((tmp_path / "pss.csr").read_bytes())
    pub = pss_csr.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    # The service's PSS: MGF1-SHA-256 and a 32-byte salt; checked with those parameters.
    pub.verify(
        pss_csr.signature,
        pss_csr.tbs_certrequest_bytes,
        padding.PSS(padding.MGF1(hashes.SHA256()), 32),
        hashes.SHA256(),
    )

    ok(
        signer_cli(
            "keys",
            "certificate",
            ca,
            "--csr",
            "v15.csr",
            "--ca-cert",
            "ca.pem",
            "--days",
            "1",
            "--extended-key-usage",
            "clientAuth",
            "--out",
            "client.pem",
            address=addr,
            cwd=tmp_path,
        )
    )
    ok(openssl("verify", "-CAfile", "ca.pem", "client.pem", cwd=tmp_path))
    ok(openssl("verify", "-CAfile", "ca.pem", "-purpose", "sslclient", "client.pem", cwd=tmp_path))
    server = openssl(
        "verify", "-CAfile", "ca.pem", "-purpose", "sslserver", "client.pem", cwd=tmp_path
    )
    assert server.returncode != 0  # clientAuth only: not a TLS server's certificate
    cert = x509.load_pem_x509_certificate((tmp_path / "client.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "Payments"
    )
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_encipherment
    assert not ku.key_cert_sign


def test_tampered_csr_is_refused(
    client: SignerClient,
    service: RunningService,
    ca: str,
    unique_name: UniqueName,
    tmp_path: Path,
) -> None:
    """A CSR altered after signing (one name swapped for another of the same length, so it still
    parses) is refused before any certificate is made, and nothing is written; the untouched CSR
    passes the same command, so it is the alteration that is refused."""
    addr = service.address
    leaf_csr(client, unique_name, addr, tmp_path, "CN=api.example", "DNS:api.example")
    der = x509.load_pem_x509_csr((tmp_path / "leaf.csr").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert der.count(b"api.example") == 2
    evil = x509.load_der_x509_csr(der.replace(b"api.example", b"evil.exampl"))
    (tmp_path / "evil.csr").write_bytes(evil.public_bytes(serialization.Encoding.PEM))
    bad = openssl("req", "-verify", "-noout", "-in", "evil.csr", cwd=tmp_path)
    # openssl agrees that its signature does not verify (OpenSSL 3.0's req -verify says so but
    # exits 0, so its words are what is checked).
    assert "verify failure" in bad.stdout + bad.stderr

    args = ("keys", "certificate", ca, "--ca-cert", "ca.pem", "--days", "1")
    refused(
        signer_cli(*args, "--csr", "evil.csr", "--out", "evil.pem", address=addr, cwd=tmp_path),
        "evil.csr",
        "signature does not verify",
    )
    assert not (tmp_path / "evil.pem").exists()
    ok(signer_cli(*args, "--csr", "leaf.csr", "--out", "leaf.pem", address=addr, cwd=tmp_path))
    ok(openssl("verify", "-CAfile", "ca.pem", "leaf.pem", cwd=tmp_path))


def test_ca_certificate_of_another_key_is_refused(
    client: SignerClient,
    service: RunningService,
    ca: str,
    unique_name: UniqueName,
    tmp_path: Path,
) -> None:
    """A CA key cannot issue under another key's CA certificate (the certificate would name an
    issuer whose key did not sign it): refused whether the version is found from the CA
    certificate or named with --version, and nothing written; nor can a key make a
    certificate without --ca-cert for a CSR that is not its own. The same CSR under the right
    CA certificate passes."""
    addr = service.address
    other = unique_name("other-ca")
    make_ca(client, other, "Other CA", addr, tmp_path, out="other.pem")
    leaf_csr(client, unique_name, addr, tmp_path, "CN=api.example")

    args = ("keys", "certificate", ca, "--csr", "leaf.csr", "--days", "1", "--out", "x.pem")
    for extra in ((), ("--version", "1")):
        refused(
            signer_cli(*args, "--ca-cert", "other.pem", *extra, address=addr, cwd=tmp_path),
            "CN=Other CA",
            "is not a certificate of",
        )
    refused(signer_cli(*args, address=addr, cwd=tmp_path), "no --ca-cert", "another key")
    refused(signer_cli(*args, "--ca", address=addr, cwd=tmp_path), "no --ca-cert", "another key")
    assert not (tmp_path / "x.pem").exists()
    ok(signer_cli(*args, "--ca-cert", "ca.pem", address=addr, cwd=tmp_path))
    ok(openssl("verify", "-CAfile", "ca.pem", "x.pem", cwd=tmp_path))


def test_ca_certificate_found_across_a_rotation(
    client: SignerClient,
    service: RunningService,
    ca: str,
    unique_name: UniqueName,
    tmp_path: Path,
) -> None:
    """After the CA key rotates, its CA certificate (of version 1) still issues: the command
    signs with the version whose public key the CA certificate carries, not the new primary
    (which would give a certificate openssl refuses); --version 2 with that certificate is
    refused."""
    addr = service.address
    client.rotate(ca)
    leaf_csr(client, unique_name, addr, tmp_path, "CN=api.example")
    args = ("keys", "certificate", ca, "--csr", "leaf.csr", "--ca-cert", "ca.pem", "--days", "1")
    r = ok(signer_cli(*args, "--out", "leaf.pem", address=addr, cwd=tmp_path))
    assert '"issuer_version": 1' in r.stderr
    ok(openssl("verify", "-CAfile", "ca.pem", "leaf.pem", cwd=tmp_path))
    refused(signer_cli(*args, "--version", "2", address=addr, cwd=tmp_path), "is not a certificate")


def test_rsa_intermediate_ca_signs_with_pss_under_the_root(
    client: SignerClient, service: RunningService, unique_name: UniqueName, tmp_path: Path
) -> None:
    """A chain of three keys in the token: an ec-p256 root of path length 1 certifies an
    rsa-2048 intermediate CA (its path length 0, derived from the root's), which issues a leaf
    signed with RSASSA-PSS (--pss); ``openssl verify -CAfile root -untrusted intermediate``
    passes and the leaf's signature algorithm is PSS. The intermediate, of path length 0, may
    not certify a further CA (refused)."""
    addr = service.address
    root = unique_name("root")
    make_ca(client, root, "Root", addr, tmp_path, out="root.pem", path_length=1)
    inter = unique_name("inter")
    client.create_key(inter, "rsa-2048")
    make_csr(
        inter,
        "--subject",
        "CN=Issuing CA,O=Example",
        "--out",
        "inter.csr",
        address=addr,
        cwd=tmp_path,
    )
    ok(
        signer_cli(
            "keys",
            "certificate",
            root,
            "--csr",
            "inter.csr",
            "--ca-cert",
            "root.pem",
            "--ca",
            "--days",
            "10",
            "--out",
            "inter.pem",
            address=addr,
            cwd=tmp_path,
        )
    )
    inter_cert = x509.load_pem_x509_certificate((tmp_path / "inter.pem").read_bytes())
    assert inter_cert.extensions.get_extension_for_class(x509.BasicConstraints).value == (
        x509.BasicConstraints(ca=True, path_length=0)
    )
    leaf_csr(
        client, unique_name, addr, tmp_path, "CN=sign.example", "DNS:sign.example", alg="ec-p384"
    )
    ok(
        signer_cli(
            "keys",
            "certificate",
            inter,
            "--csr",
            "leaf.csr",
            "--ca-cert",
            "inter.pem",
            "--pss",
            "--days",
            "5",
            "--extended-key-usage",
            "codeSigning",
            "--out",
            "leaf.pem",
            address=addr,
            cwd=tmp_path,
        )
    )
    cert = x509.load_pem_x509_certificate((tmp_path / "leaf.pem").read_bytes())
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
    alone = openssl("verify", "-CAfile", "root.pem", "leaf.pem", cwd=tmp_path)
    assert alone.returncode != 0  # the intermediate is needed: the chain is what verifies
    ok(
        openssl(
            "verify", "-CAfile", "root.pem", "-untrusted", "inter.pem", "leaf.pem", cwd=tmp_path
        )
    )
    refused(
        signer_cli(
            "keys",
            "certificate",
            inter,
            "--csr",
            "leaf.csr",
            "--ca-cert",
            "inter.pem",
            "--ca",
            "--days",
            "1",
            address=addr,
            cwd=tmp_path,
        ),
        "path length 0",
    )


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--subject", "CN"), ("is not an RFC 4514 name",)),
        (("--subject", "FOO=bar"), ("is not an RFC 4514 name",)),
        (("--subject", "CN=a,,O=b"), ("is not an RFC 4514 name",)),
        (("--subject", "C=USA"), ("is not an RFC 4514 name",)),  # a country is 2 letters
        (("--subject", "CN=x", "--san", "FOO:bar"), ("unknown type 'FOO'",)),
        (("--subject", "CN=x", "--san", "api.example"), ("use TYPE:VALUE",)),
        (("--subject", "CN=x", "--san", "DNS:bad_name!"), ("not a DNS name",)),
        (("--subject", "CN=x", "--san", "DNS:10.0.0.1"), ("not a DNS name",)),
        (("--subject", "CN=x", "--san", "IP:10.0.0.256"), ("not an IPv4 or IPv6 address",)),
        (
            (
                "--subject",
                "",
            ),
            ("needs a subject or at least one --san",),
        ),
    ],
)
def test_csr_refuses_malformed_subjects_and_sans(
    client: SignerClient,
    service: RunningService,
    unique_name: UniqueName,
    tmp_path: Path,
    flags: tuple[str, ...],
    words: tuple[str, ...],
) -> None:
    """A malformed subject or SAN is refused with what is wrong and no CSR, for a key that
    makes a CSR with a well-formed one (first, as a control)."""
    name = unique_name("k")
    client.create_key(name, "ec-p256")
    make_csr(
        name,
        "--subject",
        "CN=x",
        "--san",
        "DNS:x.example",
        "--san",
        "email:ops@x.example",
        "--san",
        "URI:spiffe://x.example/api",
        "--san",
        "IP:2001:db8::1",
        address=service.address,
        cwd=tmp_path,
    )
    refused(
        signer_cli(
            "keys", "csr", name, *flags, "--out", "x.csr", address=service.address, cwd=tmp_path
        ),
        *words,
    )
    assert not (tmp_path / "x.csr").exists()


def test_certificate_refuses_bad_options(
    client: SignerClient,
    service: RunningService,
    ca: str,
    unique_name: UniqueName,
    tmp_path: Path,
) -> None:
    """Days out of range or past the CA certificate's end, --path-length or keyCertSign without
    --ca, a CA's KeyUsage without keyCertSign, a CA under a CA of path length 0, an unknown key
    or extended key usage, a bad serial, --pss for an EC issuer: each refused with what is
    wrong, nothing written; the same command with sane options (the control, last) passes."""
    addr = service.address
    leaf_csr(client, unique_name, addr, tmp_path, "CN=leaf")
    base = ("keys", "certificate", ca, "--csr", "leaf.csr", "--ca-cert", "ca.pem")
    for flags, words in (
        (("--days", "0"), ("--days 0: must be from 1 to",)),
        (("--days", "100000"), ("--days 100000: must be from 1 to",)),
        (("--days", "31"), ("outlive its CA certificate",)),
        (("--days", "1", "--path-length", "1"), ("--path-length is for a CA certificate",)),
        (("--days", "1", "--key-usage", "keyCertSign"), ("keyCertSign is for a CA",)),
        (("--days", "1", "--ca", "--key-usage", "digitalSignature"), ("include keyCertSign",)),
        (("--days", "1", "--ca"), ("path length 0",)),
        (("--days", "1", "--key-usage", "digitalSignature,teleport"), ("usage 'teleport'",)),
        (("--days", "1", "--extended-key-usage", "serverAuht"), ("'serverAuht'",)),
        (("--days", "1", "--serial", "0"), ("must be positive",)),
        (("--days", "1", "--serial", "12ab"), ("serial '12ab'",)),
        (("--days", "1", "--pss"), ("--pss is for RSA keys",)),
    ):
        refused(signer_cli(*base, *flags, "--out", "x.pem", address=addr, cwd=tmp_path), *words)
        assert not (tmp_path / "x.pem").exists()
    r = ok(
        signer_cli(
            *base,
            "--days",
            "1",
            "--serial",
            "0x1f",
            "--key-usage",
            "digitalSignature",
            "--out",
            "x.pem",
            address=addr,
            cwd=tmp_path,
        )
    )
    assert '"serial": "1f"' in r.stderr
    ok(openssl("verify", "-CAfile", "ca.pem", "x.pem", cwd=tmp_path))
