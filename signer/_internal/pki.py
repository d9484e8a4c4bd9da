"""A development certificate authority for the mTLS endpoint (``signer run``, tests, the harness).

Production brings its own CA; this one exists so that a laptop gets the same shape: a server
certificate over the public key of the TLS key pair that lives in the token, and client
certificates whose subject is the caller's identity. Layout::

    DIR/           0700
      ca.pem       the CA certificate (clients and the TLS front trust it)
      ca.key       0600, the development CA's private key (software; not for production)
      server.pem   the endpoint's certificate; its private key is in the TLS token
      clients/NAME.pem, clients/NAME.key   0600 key: one identity per caller
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signer.errors import FailedPrecondition, InvalidArgument

VALIDITY = datetime.timedelta(days=365)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _name(common_name: str, organisation: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organisation:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    return x509.Name(attrs)


@dataclass(frozen=True)
class DevCA:
    root: Path

    @property
    def cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    def client_files(self, name: str) -> tuple[Path, Path]:
        return self.root / "clients" / f"{name}.pem", self.root / "clients" / f"{name}.key"

    @classmethod
    def ensure(cls, root: str | Path, name: str = "signer development CA") -> DevCA:
        """The CA in ``root``, created on first use (its subject CN ``name``)."""
        ca = cls(Path(root).absolute())
        if ca.cert.exists() and ca.key.exists():
            return ca
        ca.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ca.root, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + 10 * VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(ca.key, key)
        ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def _issue(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey | object,
        usage: x509.ObjectIdentifier,
        names: list[x509.GeneralName],
    ) -> x509.Certificate:
        ca_key = serialization.load_pem_private_key(self.key.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise FailedPrecondition(f"{self.key} is not an EC private key")
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def issue_server(self, public_key_pem: bytes, hosts: list[str]) -> Path:
        """The endpoint's certificate over a public key whose private half is in the token."""
        public_key = serialization.load_pem_public_key(public_key_pem)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = self._issue(
            _name(hosts[0] if hosts else "signer"),
            public_key,
            ExtendedKeyUsageOID.SERVER_AUTH,
            names,
        )
        self.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return self.server_cert

    def issue_client(self, name: str, organisation: str | None = None) -> tuple[Path, Path]:
        """A client certificate and key for the caller ``name`` (its subject CN)."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise InvalidArgument(
                f"a client name must be 1 to 64 letters, digits, '-', '_' or '.', got {name!r}"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(
            _name(name, organisation), key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, []
        )
        cert_path, key_path = self.client_files(name)
        cert_path.parent.mkdir(mode=0o700, exist_ok=True)
        _write_private(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path
