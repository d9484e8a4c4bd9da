"""CSRs and certificates for keys in the token (issue 17, item 4): ``cryptography``'s x509
builders, signed by a drop-in key (:mod:`signer.dropin`), with the checks a small CA owes.

What ``signer keys csr`` and ``signer keys certificate`` call; each function takes any
``cryptography`` private key (a drop-in key in the command), so nothing here talks to the service.

A certificate is issued only for a CSR whose own signature verifies, and only under an issuer
whose key signs it: with a CA certificate, that certificate's public key must be the issuer
key's (:func:`check_ca_certificate`); without one, only a self-signed CA certificate for the
issuer key's own CSR. The result is verified against the issuer's public key before it is
returned (:func:`issue`), so a certificate that names an issuer whose key did not sign it is
never written.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from signer.errors import InvalidArgument, shown

__all__ = [
    "EXTENDED_KEY_USAGES",
    "KEY_USAGES",
    "MAX_DAYS",
    "CertificateRequest",
    "build_csr",
    "check_ca_certificate",
    "default_key_usage",
    "issue",
    "load_certificate",
    "load_csr",
    "parse_extended_key_usage",
    "parse_key_usage",
    "parse_san",
    "parse_serial",
    "parse_subject",
    "random_serial",
    "same_public_key",
    "signing_hash",
]

MAX_DAYS = 7305
"""The longest validity issued, in days (20 years: a root CA's; a leaf's is far shorter)."""

KEY_USAGES: dict[str, str] = {
    "digitalSignature": "digital_signature",
    "nonRepudiation": "content_commitment",
    "contentCommitment": "content_commitment",
    "keyEncipherment": "key_encipherment",
    "dataEncipherment": "data_encipherment",
    "keyAgreement": "key_agreement",
    "keyCertSign": "key_cert_sign",
    "cRLSign": "crl_sign",
}
"""``--key-usage`` names (RFC 5280's, as openssl prints them) and ``x509.KeyUsage``'s fields."""

EXTENDED_KEY_USAGES: dict[str, ObjectIdentifier] = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
}
"""``--extended-key-usage`` names; a dotted OID is also accepted."""

_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


# --- parsing what the command line gives -------------------------------------------------------


def parse_subject(text: str) -> x509.Name:
    """An RFC 4514 string (``CN=api.example,O=Example``: most specific first, as openssl's
    ``-nameopt RFC2253`` prints) as an x509 Name; InvalidArgument for anything it cannot be."""
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        why = f": {exc}" if str(exc) else ""
        raise InvalidArgument(
            f"subject {shown(text)} is not an RFC 4514 name (e.g. 'CN=api.example,O=Example', "
            f"attributes CN, O, OU, C, ST, L, ...){why}"
        ) from None
    return name


def _dns_name(value: str, item: str) -> x509.DNSName:
    host = value[2:] if value.startswith("*.") else value
    labels = host.rstrip(".").split(".") if host else []
    if (
        not labels
        or len(value) > 253
        or not all(_DNS_LABEL.match(label) for label in labels)
        or _is_ip(host)
    ):
        raise InvalidArgument(
            f"SAN {shown(item)}: not a DNS name (letters, digits and '-' in dot-separated "
            "labels, an optional leading '*.'; an address is IP:...; a name beyond ASCII "
            "goes in its xn-- form)"
        )
    return x509.DNSName(value)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_san(item: str) -> x509.GeneralName:
    """``DNS:name``, ``IP:address`` (IPv4 or IPv6), ``email:addr`` or ``URI:uri`` (the type's
    case does not matter); InvalidArgument for another type or a malformed value."""
    kind, sep, value = item.partition(":")
    kind = kind.strip().upper()
    if not sep or not value:
        raise InvalidArgument(
            f"SAN {shown(item)}: use TYPE:VALUE, TYPE one of DNS, IP, email, URI "
            "(e.g. DNS:api.example, IP:10.0.0.1)"
        )
    if kind == "DNS":
        return _dns_name(value, item)
    if kind in ("IP", "IP ADDRESS"):
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            raise InvalidArgument(f"SAN {shown(item)}: not an IPv4 or IPv6 address") from None
    if kind == "EMAIL":
        local, at, domain = value.rpartition("@")
        if not at or not local or not value.isascii() or " " in value:
            raise InvalidArgument(f"SAN {shown(item)}: not an email address (local@domain)")
        _dns_name(domain, item)
        return x509.RFC822Name(value)
    if kind == "URI":
        scheme, colon, _ = value.partition(":")
        if not colon or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*$", scheme) or not value.isascii():
            raise InvalidArgument(f"SAN {shown(item)}: not an absolute URI (scheme:...)")
        return x509.UniformResourceIdentifier(value)
    raise InvalidArgument(
        f"SAN {shown(item)}: unknown type {shown(kind)}; use DNS:, IP:, email: or URI:"
    )


def _names(values: Iterable[str]) -> list[str]:
    """``a,b`` and repeated options alike, one name each."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def parse_key_usage(values: Iterable[str]) -> x509.KeyUsage:
    """``digitalSignature,keyEncipherment`` (names of :data:`KEY_USAGES`) as a KeyUsage."""
    chosen: set[str] = set()
    for n in _names(values):
        field_name = KEY_USAGES.get(n)
        if field_name is None:
            raise InvalidArgument(f"key usage {shown(n)}: not one of {', '.join(KEY_USAGES)}")
        chosen.add(field_name)
    if not chosen:
        raise InvalidArgument("--key-usage names no usage")
    return _key_usage(chosen)


def _key_usage(chosen: set[str]) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature="digital_signature" in chosen,
        content_commitment="content_commitment" in chosen,
        key_encipherment="key_encipherment" in chosen,
        data_encipherment="data_encipherment" in chosen,
        key_agreement="key_agreement" in chosen,
        key_cert_sign="key_cert_sign" in chosen,
        crl_sign="crl_sign" in chosen,
        encipher_only=False,
        decipher_only=False,
    )


def default_key_usage(public_key: Any, *, ca: bool) -> x509.KeyUsage:
    """By what the certificate is and its key's type: a CA signs certificates and CRLs (and,
    as most CAs' do, OCSP answers: digitalSignature); a leaf signs (an RSA leaf also
    keyEncipherment, for TLS's RSA key exchange)."""
    if ca:
        return _key_usage({"digital_signature", "key_cert_sign", "crl_sign"})
    if isinstance(public_key, rsa.RSAPublicKey):
        return _key_usage({"digital_signature", "key_encipherment"})
    return _key_usage({"digital_signature"})


def parse_extended_key_usage(values: Iterable[str]) -> x509.ExtendedKeyUsage:
    """``serverAuth,clientAuth,codeSigning`` (names of :data:`EXTENDED_KEY_USAGES`, or dotted
    OIDs) as an ExtendedKeyUsage."""
    oids: list[ObjectIdentifier] = []
    for n in _names(values):
        oid = EXTENDED_KEY_USAGES.get(n)
        if oid is None and _OID.match(n):
            oid = ObjectIdentifier(n)
        if oid is None:
            raise InvalidArgument(
                f"extended key usage {shown(n)}: not one of {', '.join(EXTENDED_KEY_USAGES)} "
                "or a dotted OID"
            )
        if oid not in oids:
            oids.append(oid)
    if not oids:
        raise InvalidArgument("--extended-key-usage names no usage")
    return x509.ExtendedKeyUsage(oids)


def random_serial() -> int:
    """A random positive 128-bit serial (RFC 5280 allows up to 20 octets)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def parse_serial(text: str) -> int:
    """A serial given as decimal, 0x-hex or colon-separated hex (as openssl prints it)."""
    t = text.strip()
    try:
        if ":" in t:
            serial = int(t.replace(":", ""), 16)
        elif t.lower().startswith("0x"):
            serial = int(t, 16)
        else:
            serial = int(t, 10)
    except ValueError:
        raise InvalidArgument(
            f"serial {shown(text)}: give a decimal, 0x-hex or aa:bb:.. hex number"
        ) from None
    if serial < 1 or serial.bit_length() > 159:
        raise InvalidArgument(
            f"serial {shown(text)}: must be positive and at most 20 octets (RFC 5280)"
        )
    return serial


# --- keys --------------------------------------------------------------------------------------


def signing_hash(
    private_key: Any, hash_name: str | None
) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None:
    """The hash the builders are given: the key's own (``hash_name``, the service's algorithm
    table), None for Ed25519, which signs the message itself."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if hash_name not in _HASHES:
        raise InvalidArgument(f"no certificate hash for {shown(hash_name)}")
    return _HASHES[hash_name]()


def _rsa_padding(private_key: Any, pss: bool) -> padding.PSS | padding.PKCS1v15 | None:
    if not isinstance(private_key, rsa.RSAPrivateKey):
        if pss:
            raise InvalidArgument("--pss is for RSA keys; this key is not one")
        return None
    if pss:
        # The service's only PSS: MGF1-SHA-256, a 32-byte salt (= the SHA-256 digest length).
        return padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    return padding.PKCS1v15()


def _spki(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def same_public_key(a: Any, b: Any) -> bool:
    return _spki(a) == _spki(b)


# --- CSRs --------------------------------------------------------------------------------------


def build_csr(
    private_key: Any,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName] = (),
    *,
    hash_name: str | None,
    pss: bool = False,
) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for ``private_key``'s public key, signed by it (for a drop-in key:
    one Sign call): the subject, and the SANs as a requested extension."""
    if len(subject) == 0 and not sans:
        raise InvalidArgument("a CSR needs a subject or at least one --san")
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(dict.fromkeys(sans))), critical=len(subject) == 0
        )
    csr = builder.sign(
        private_key,
        signing_hash(private_key, hash_name),
        rsa_padding=_rsa_padding(private_key, pss),
    )
    if not csr.is_signature_valid:  # what the key signed is not what it claims to be
        raise InvalidArgument("the key's signature of the CSR does not verify with its public key")
    return csr


def load_csr(data: bytes, source: str) -> x509.CertificateSigningRequest:
    """A CSR, PEM or DER, whose own signature verifies (else InvalidArgument)."""
    try:
        if b"-----BEGIN" in data:
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidArgument(f"{source}: not a readable PKCS#10 CSR ({exc})") from None
    if not valid:
        raise InvalidArgument(
            f"{source}: the CSR's signature does not verify with the public key it carries "
            "(altered after signing, or not signed by that key): refused"
        )
    return csr


def load_certificate(data: bytes, source: str) -> x509.Certificate:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidArgument(f"{source}: not a readable X.509 certificate ({exc})") from None


# The SAN types a CSR may carry into a certificate, as `signer keys csr --san` writes them.
_SAN_PREFIX: dict[type[x509.GeneralName], str] = {
    x509.DNSName: "DNS",
    x509.IPAddress: "IP",
    x509.RFC822Name: "email",
    x509.UniformResourceIdentifier: "URI",
}


def _requested_sans(csr: x509.CertificateSigningRequest) -> x509.SubjectAlternativeName | None:
    """The CSR's SANs, each checked as ``--san`` checks one: a CSR comes from whoever asked,
    and another type (an otherName such as a Windows UPN, which smart-card logon trusts; a
    directoryName) would go into a certificate the operator never read. Refused, naming it."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    for name in ext.value:
        prefix = _SAN_PREFIX.get(type(name))
        if prefix is None:
            raise InvalidArgument(
                f"the CSR asks for a {type(name).__name__} SAN; only DNS, IP, email and URI "
                "names are certified (issue the certificate from a CSR without it)"
            )
        parse_san(f"{prefix}:{name.value}")
    return ext.value


def san_strings(cert: x509.Certificate) -> list[str]:
    """The certificate's SANs as TYPE:VALUE, for the operator to read."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [f"{_SAN_PREFIX.get(type(n), type(n).__name__)}:{n.value}" for n in ext.value]


# --- certificates ------------------------------------------------------------------------------


def check_ca_certificate(
    ca_cert: x509.Certificate, issuer_public_key: Any, issuer: str, *, not_after: datetime.datetime
) -> None:
    """A CA certificate the issuer key may issue under: its public key is the issuer key's (so a
    certificate never names an issuer whose key did not sign it), it is a CA (BasicConstraints
    cA, and keyCertSign if it has a KeyUsage), and it outlives what it would issue."""
    if not same_public_key(ca_cert.public_key(), issuer_public_key):
        raise InvalidArgument(
            f"--ca-cert (subject {shown(ca_cert.subject.rfc4514_string())}) is not a certificate "
            f"of {issuer}'s public key: a certificate issued with it would name an issuer whose "
            "key did not sign it; refused"
        )
    try:
        bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise InvalidArgument(
            "--ca-cert is not a CA certificate (no BasicConstraints cA=TRUE): verifiers would "
            "refuse what it issues"
        )
    try:
        ku = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.key_cert_sign:
        raise InvalidArgument("--ca-cert's KeyUsage lacks keyCertSign: it may not issue")
    if not_after > ca_cert.not_valid_after_utc:
        raise InvalidArgument(
            f"the certificate would outlive its CA certificate (which expires "
            f"{ca_cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}): ask for fewer --days"
        )


def _below(ca_cert: x509.Certificate, req: CertificateRequest) -> int | None:
    """The path length of a CA certificate issued under ``ca_cert``: at most one less than
    its own (the default when it has one), refused under a CA of path length 0."""
    if not req.ca:
        return None
    limit = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    if limit is None:
        return req.path_length
    if limit == 0:
        raise InvalidArgument(
            "--ca under a CA certificate of path length 0: no CA may follow it, so verifiers "
            "would refuse whatever the new CA issues"
        )
    if req.path_length is not None and req.path_length > limit - 1:
        raise InvalidArgument(
            f"--path-length {req.path_length}: at most {limit - 1} under a CA certificate of "
            f"path length {limit}"
        )
    return limit - 1 if req.path_length is None else req.path_length


@dataclass(frozen=True)
class CertificateRequest:
    """What ``signer keys certificate`` asks for, beyond the CSR and the issuer."""

    days: int
    ca: bool = False
    path_length: int | None = None
    key_usage: x509.KeyUsage | None = None
    extended_key_usage: x509.ExtendedKeyUsage | None = None
    serial: int | None = None
    pss: bool = False
    now: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))

    def __post_init__(self) -> None:
        _check_request(self)

    def not_after(self) -> datetime.datetime:
        return self.now + datetime.timedelta(days=self.days)


def _check_request(req: CertificateRequest) -> None:
    if not 1 <= req.days <= MAX_DAYS:
        raise InvalidArgument(f"--days {req.days}: must be from 1 to {MAX_DAYS}")
    if req.path_length is not None and not req.ca:
        raise InvalidArgument("--path-length is for a CA certificate: add --ca")
    if req.path_length is not None and req.path_length < 0:
        raise InvalidArgument("--path-length must be 0 or more")
    if req.key_usage is not None:
        if req.key_usage.key_cert_sign and not req.ca:
            raise InvalidArgument("keyCertSign is for a CA certificate (RFC 5280): add --ca")
        if req.ca and not req.key_usage.key_cert_sign:
            raise InvalidArgument("a CA certificate's --key-usage must include keyCertSign")


def issue(
    csr: x509.CertificateSigningRequest,
    issuer_key: Any,
    req: CertificateRequest,
    *,
    hash_name: str | None,
    issuer_name: str = "the issuer key",
    ca_cert: x509.Certificate | None = None,
) -> x509.Certificate:
    """A certificate of the CSR's public key and subject (and its requested SANs; its other
    requested extensions are not copied), signed by ``issuer_key`` (for a drop-in key: one Sign
    call). With ``ca_cert``, issued under it (checked by :func:`check_ca_certificate`); without,
    only a self-signed CA certificate of the issuer key's own CSR. Checked against the issuer's
    public key before it is returned."""
    if not csr.is_signature_valid:
        raise InvalidArgument("the CSR's signature does not verify: refused")
    subject_key = csr.public_key()
    issuer_public = issuer_key.public_key()
    path_length = req.path_length
    if ca_cert is None:
        if not same_public_key(subject_key, issuer_public):
            raise InvalidArgument(
                f"no --ca-cert: the only certificate issued without one is {issuer_name}'s own "
                "self-signed CA certificate, and this CSR is for another key; give the CA "
                "certificate of the issuer key"
            )
        if not req.ca:
            raise InvalidArgument(
                "no --ca-cert and the CSR is the issuer key's own: that makes a self-signed CA "
                "certificate, so add --ca (or give --ca-cert to issue under an existing one)"
            )
        issuer_subject = csr.subject
        if len(issuer_subject) == 0:
            raise InvalidArgument("a CA certificate needs a subject: the CSR has none")
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public)
    else:
        check_ca_certificate(ca_cert, issuer_public, issuer_name, not_after=req.not_after())
        issuer_subject = ca_cert.subject
        path_length = _below(ca_cert, req)
        try:
            ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public)
    if not isinstance(
        subject_key,
        ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    ):
        raise InvalidArgument(
            f"the CSR's key is a {type(subject_key).__name__}: EC, RSA or Ed25519 only"
        )
    sans = _requested_sans(csr)
    if len(csr.subject) == 0 and sans is None:
        raise InvalidArgument("the CSR has neither a subject nor SANs: nothing to certify")

    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(issuer_subject)
        .public_key(subject_key)
        .serial_number(req.serial if req.serial is not None else random_serial())
        .not_valid_before(req.now - datetime.timedelta(minutes=1))
        .not_valid_after(req.not_after())
        .add_extension(
            x509.BasicConstraints(ca=req.ca, path_length=path_length if req.ca else None),
            critical=True,
        )
        .add_extension(req.key_usage or default_key_usage(subject_key, ca=req.ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
    )
    builder = builder.add_extension(aki, critical=False)
    if req.extended_key_usage is not None:
        builder = builder.add_extension(req.extended_key_usage, critical=False)
    if sans is not None:
        # RFC 5280 4.2.1.6: critical when the subject is empty.
        builder = builder.add_extension(sans, critical=len(csr.subject) == 0)
    cert = builder.sign(
        issuer_key,
        signing_hash(issuer_key, hash_name),
        rsa_padding=_rsa_padding(issuer_key, req.pss),
    )
    try:
        cert.verify_directly_issued_by(cert if ca_cert is None else ca_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise InvalidArgument(
            f"the issued certificate does not verify with the issuer's public key ({exc}): "
            "not written"
        ) from None
    return cert
