"""``signer keys csr`` and ``signer keys certificate``: a CSR signed by a key in the token, and a
certificate signed by another key of the service acting as a CA (issue 17, item 4).

Both sign through a drop-in key (:mod:`signer.dropin`) pinned to one version, so the public key
a CSR or certificate carries and the signature next to it are of the same version even if the
key rotates meanwhile. The x509 work and its checks are :mod:`signer.certs`. Like the other
caller's commands, they need nothing but the client (and the caller's "sign" grant on the key).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signer import certs
from signer.cli._calls import _client, _client_parser
from signer.cli._common import EXIT_OK
from signer.client import SignerClient
from signer.dropin import DropInKey, load_private_key
from signer.errors import InvalidArgument
from signer.keys import ALGORITHMS
from signer.v1 import signer_pb2 as pb

if TYPE_CHECKING:
    from signer.cli._common import Subparsers


def _load(c: SignerClient, name: str, version: int) -> DropInKey:
    return load_private_key(f"signer://{quote(name, safe='')}?version={version}", client=c)


def _pinned(c: SignerClient, name: str, version: int) -> DropInKey:
    """The key at ``version``, or at the primary version of now, pinned to it."""
    if not version:
        version = c.public_key(name, 0).version
    return _load(c, name, version)


def _issuer_for(c: SignerClient, name: str, ca_cert: x509.Certificate) -> DropInKey:
    """The version of ``name`` whose public key is ``ca_cert``'s: the primary if it is, else an
    enabled one; none: the CA certificate is not of this key, refused."""
    key = c.get_key(name)
    versions = [key.primary_version] + [
        v.version
        for v in key.versions
        if v.version != key.primary_version and v.state == pb.ENABLED
    ]
    wanted = ca_cert.public_key()
    for v in versions:
        pem = c.public_key(name, v).pem.encode()
        if certs.same_public_key(serialization.load_pem_public_key(pem), wanted):
            return _load(c, name, v)
    raise InvalidArgument(
        f"--ca-cert (subject {ca_cert.subject.rfc4514_string()!r}) is not a certificate of any "
        f"enabled version of key {name!r}: a certificate issued with it would name an issuer "
        "whose key did not sign it; refused"
    )


def _hash_name(key: DropInKey) -> str | None:
    return ALGORITHMS[key.algorithm].hash_name


def _write(args: argparse.Namespace, pem: bytes) -> None:
    if args.out:
        Path(args.out).write_bytes(pem)
    else:
        sys.stdout.write(pem.decode())


def cmd_keys_csr(args: argparse.Namespace) -> int:
    subject = certs.parse_subject(args.subject)
    sans = [certs.parse_san(s) for s in args.san]
    with _client(args) as c:
        key = _pinned(c, args.name, args.version)
        csr = certs.build_csr(key, subject, sans, hash_name=_hash_name(key), pss=args.pss)
    _write(args, csr.public_bytes(serialization.Encoding.PEM))
    print(
        json.dumps(
            {
                "name": args.name,
                "version": key.version,
                "algorithm": key.algorithm,
                "subject": csr.subject.rfc4514_string(),
                **({"out": args.out} if args.out else {}),
            }
        ),
        file=sys.stderr,
    )
    return EXIT_OK


def _request(args: argparse.Namespace) -> certs.CertificateRequest:
    return certs.CertificateRequest(
        days=args.days,
        ca=args.ca,
        path_length=args.path_length,
        key_usage=certs.parse_key_usage(args.key_usage) if args.key_usage else None,
        extended_key_usage=(
            certs.parse_extended_key_usage(args.extended_key_usage)
            if args.extended_key_usage
            else None
        ),
        serial=certs.parse_serial(args.serial) if args.serial is not None else None,
        pss=args.pss,
    )


def cmd_keys_certificate(args: argparse.Namespace) -> int:
    req = _request(args)  # the arguments' errors before any file or call
    csr = certs.load_csr(Path(args.csr).read_bytes(), args.csr)
    ca_cert = (
        certs.load_certificate(Path(args.ca_cert).read_bytes(), args.ca_cert)
        if args.ca_cert
        else None
    )
    with _client(args) as c:
        if ca_cert is not None and not args.version:
            issuer = _issuer_for(c, args.issuer, ca_cert)
        else:
            issuer = _pinned(c, args.issuer, args.version)
        cert = certs.issue(
            csr,
            issuer,
            req,
            hash_name=_hash_name(issuer),
            issuer_name=f"key {args.issuer!r} version {issuer.version}",
            ca_cert=ca_cert,
        )
    _write(args, cert.public_bytes(serialization.Encoding.PEM))
    summary: dict[str, Any] = {
        "issuer_key": args.issuer,
        "issuer_version": issuer.version,
        "subject": cert.subject.rfc4514_string(),
        "sans": certs.san_strings(cert),  # copied from the CSR: what the operator certified
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ca": req.ca,
        **({"out": args.out} if args.out else {}),
    }
    print(json.dumps(summary), file=sys.stderr)
    return EXIT_OK


def register_keys(keys: Subparsers) -> None:
    """``keys csr`` and ``keys certificate``."""
    sp = _client_parser(keys, "csr", "make a PKCS#10 CSR signed by a key in the token (PEM)")
    sp.add_argument("name", help="key name")
    sp.add_argument(
        "--subject",
        required=True,
        help="RFC 4514 name, most specific first: 'CN=api.example,O=Example'",
    )
    sp.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="TYPE:VALUE",
        help="subjectAltName to request: DNS:name, IP:address, email:addr, URI:uri (repeatable)",
    )
    sp.add_argument(
        "--version", type=int, default=0, help="key version (default: the primary of now)"
    )
    sp.add_argument("--pss", action="store_true", help="RSA: sign with PSS (default PKCS#1 v1.5)")
    sp.add_argument("--out", help="write to this file instead of stdout")
    sp.set_defaults(func=cmd_keys_csr)

    sp = _client_parser(
        keys,
        "certificate",
        "issue a certificate for a CSR, signed by ISSUER_KEY in the token acting as a CA (PEM)",
    )
    sp.add_argument("issuer", metavar="ISSUER_KEY", help="the CA's key name")
    sp.add_argument("--csr", required=True, help="the CSR (PEM or DER); its signature must verify")
    sp.add_argument(
        "--ca-cert",
        help="the CA certificate of ISSUER_KEY (its subject is the issuer name); without it, "
        "only ISSUER_KEY's own self-signed CA certificate, with --ca",
    )
    sp.add_argument(
        "--days", type=int, required=True, help=f"validity in days (1 to {certs.MAX_DAYS})"
    )
    sp.add_argument("--ca", action="store_true", help="a CA certificate (BasicConstraints cA)")
    sp.add_argument(
        "--path-length", type=int, default=None, help="CA: how many CAs may follow below it"
    )
    sp.add_argument(
        "--key-usage",
        action="append",
        default=[],
        metavar="USAGE[,USAGE]",
        help=f"of {', '.join(certs.KEY_USAGES)} (default: CA keyCertSign, cRLSign, "
        "digitalSignature; leaf digitalSignature, RSA also keyEncipherment)",
    )
    sp.add_argument(
        "--extended-key-usage",
        action="append",
        default=[],
        metavar="USAGE[,USAGE]",
        help=f"of {', '.join(certs.EXTENDED_KEY_USAGES)} or a dotted OID (default: none)",
    )
    sp.add_argument(
        "--serial", help="decimal, 0x-hex or aa:bb hex (default: a random 128-bit number)"
    )
    sp.add_argument(
        "--version",
        type=int,
        default=0,
        help="ISSUER_KEY's version (default: the one --ca-cert certifies, else the primary)",
    )
    sp.add_argument(
        "--pss", action="store_true", help="RSA issuer: sign with PSS (default PKCS#1 v1.5)"
    )
    sp.add_argument("--out", help="write to this file instead of stdout")
    sp.set_defaults(func=cmd_keys_certificate)
