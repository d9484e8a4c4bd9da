"""signer.certs without a service: the parsing of the command line's forms and the issuing
checks, with in-memory keys (the integration tests sign with keys in the token)."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signer import certs
from signer.errors import InvalidArgument


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca(key: ec.EllipticCurvePrivateKey, days: int = 30) -> x509.Certificate:
    csr = certs.build_csr(key, certs.parse_subject("CN=CA"), hash_name="sha256")
    return certs.issue(
        csr, key, certs.CertificateRequest(days=days, ca=True, path_length=0), hash_name="sha256"
    )


def test_san_forms() -> None:
    """Each accepted form gives its GeneralName (the type's case aside); the rest are refused."""
    assert certs.parse_san("dns:*.api.example") == x509.DNSName("*.api.example")
    assert certs.parse_san("IP:2001:db8::1") == x509.IPAddress(ipaddress.ip_address("2001:db8::1"))
    assert certs.parse_san("email:ops@x.example") == x509.RFC822Name("ops@x.example")
    assert certs.parse_san("URI:spiffe://x/api") == x509.UniformResourceIdentifier("spiffe://x/api")
    for bad in ("DNS:", "DNS:a..b", "DNS:-a.b", "DNS:é.example", "IP:1.2.3", "email:x", "URI:x",
                "dirName:CN=x", "x"):  # fmt: skip
        with pytest.raises(InvalidArgument):
            certs.parse_san(bad)


def test_subject_serial_and_usages() -> None:
    """RFC 4514 order (most specific first), serial forms and bounds, usage names."""
    name = certs.parse_subject("CN=api.example,O=Example")
    assert [a.value for a in name] == ["Example", "api.example"]  # DER order: O, then CN
    with pytest.raises(InvalidArgument, match="RFC 4514"):
        certs.parse_subject("CN=a;O")
    assert certs.parse_serial("0x1F") == certs.parse_serial("1f:") == certs.parse_serial("31")
    for bad in ("0", "-1", str(1 << 159), "zz"):
        with pytest.raises(InvalidArgument):
            certs.parse_serial(bad)
    assert certs.random_serial().bit_length() <= 128
    ku = certs.parse_key_usage(["digitalSignature,nonRepudiation", "cRLSign"])
    assert (ku.digital_signature, ku.content_commitment, ku.crl_sign) == (True, True, True)
    eku = certs.parse_extended_key_usage(["serverAuth", "1.3.6.1.5.5.7.3.3,serverAuth"])
    assert len(list(eku)) == 2


def test_issue_refuses_what_would_mislead_a_verifier() -> None:
    """Another key's CA certificate, a CSR of another key without one, a tampered CSR, a
    certificate outliving its CA's: refused; the right CA certificate issues, and the
    certificate verifies with it."""
    ca_key, other_key, leaf_key = _key(), _key(), _key()
    ca_cert, other_cert = _ca(ca_key), _ca(other_key)
    csr = certs.build_csr(
        leaf_key, x509.Name([]), [certs.parse_san("DNS:a.example")], hash_name="sha256"
    )
    req = certs.CertificateRequest(days=1)
    with pytest.raises(InvalidArgument, match="is not a certificate of"):
        certs.issue(csr, ca_key, req, hash_name="sha256", ca_cert=other_cert)
    with pytest.raises(InvalidArgument, match="no --ca-cert"):
        certs.issue(csr, ca_key, req, hash_name="sha256")
    with pytest.raises(InvalidArgument, match="outlive"):
        certs.issue(
            csr, ca_key, certs.CertificateRequest(days=31), hash_name="sha256", ca_cert=ca_cert
        )
    tampered = csr.public_bytes(serialization.Encoding.DER).replace(b"a.example", b"b.example")
    with pytest.raises(InvalidArgument, match="does not verify"):
        certs.load_csr(tampered, "t.csr")
    cert = certs.issue(csr, ca_key, req, hash_name="sha256", ca_cert=ca_cert)
    cert.verify_directly_issued_by(ca_cert)
    # An empty subject: the SANs are the identity, so their extension is critical (RFC 5280).
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    assert cert.not_valid_before_utc < datetime.datetime.now(datetime.UTC)


def test_a_csrs_sans_are_checked_as_the_operators_would_be() -> None:
    """Review of issue 17: a CSR's otherName (a Windows UPN, trusted by smart-card logon) or
    directoryName went into the certificate unread. Only DNS, IP, email and URI names that
    --san would accept are certified; the summary lists them."""
    ca_key, leaf_key = _key(), _key()
    ca_cert = _ca(ca_key)
    req = certs.CertificateRequest(days=1)
    upn = x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x05admin")
    for name, message in (
        (upn, "OtherName SAN"),
        (x509.DirectoryName(x509.Name([])), "DirectoryName SAN"),
        (x509.DNSName("bad name"), "not a DNS name"),
    ):
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "leaf")]))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName("a.example"), name]), critical=False
            )
            .sign(leaf_key, certs.signing_hash(leaf_key, "sha256"))
        )
        with pytest.raises(InvalidArgument, match=message):
            certs.issue(csr, ca_key, req, hash_name="sha256", ca_cert=ca_cert)
    good = certs.build_csr(
        leaf_key,
        x509.Name([]),
        [certs.parse_san("DNS:a.example"), certs.parse_san("IP:10.0.0.1")],
        hash_name="sha256",
    )
    cert = certs.issue(good, ca_key, req, hash_name="sha256", ca_cert=ca_cert)
    assert certs.san_strings(cert) == ["DNS:a.example", "IP:10.0.0.1"]
