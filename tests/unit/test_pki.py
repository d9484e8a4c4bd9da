"""signer._internal.pki: the development CA issues what the mTLS front and its callers need."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signer._internal.pki import DevCA
from signer.errors import InvalidArgument


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_files_are_private_and_reused(tmp_path: Path) -> None:
    ca = DevCA.ensure(tmp_path / "tls")
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700
    assert ca.key.stat().st_mode & 0o777 == 0o600
    first = ca.cert.read_bytes()
    assert DevCA.ensure(tmp_path / "tls").cert.read_bytes() == first


def test_server_certificate_certifies_the_given_public_key(tmp_path: Path) -> None:
    ca = DevCA.ensure(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())  # stands in for the key in the TLS token
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cert = load(ca.issue_server(public_pem, ["localhost", "127.0.0.1"]))
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(load(ca.cert))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_client_certificate_subject_is_the_callers_name(tmp_path: Path) -> None:
    ca = DevCA.ensure(tmp_path)
    cert_path, key_path = ca.issue_client("payments", "acme")
    cert = load(cert_path)
    cert.verify_directly_issued_by(load(ca.cert))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "payments"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
    assert key_path.stat().st_mode & 0o777 == 0o600
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, "two words"])
def test_client_names_that_would_be_paths_or_odd_subjects_are_refused(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(InvalidArgument, match="a client name must be"):
        DevCA.ensure(tmp_path).issue_client(name)
