"""The caller's commands, each a call to the service over gRPC: ``keys`` create, import, list,
show, public, rotate, set-primary, disable, enable, schedule-destruction, cancel-destruction;
``sign``, ``verify``, ``jwt sign``, ``jwks``. They need nothing but the client."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signer.cli._common import EXIT_INVALID, EXIT_OK, label
from signer.client import DEFAULT_ADDRESS, ClientTLS, SignerClient
from signer.errors import InvalidArgument
from signer.keys import ALGORITHMS
from signer.v1 import signer_pb2 as pb

if TYPE_CHECKING:
    from signer.cli._common import Subparsers


def _client(args: argparse.Namespace) -> SignerClient:
    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if any(given) and not all(given):
        raise InvalidArgument("mTLS needs all of --tls-ca, --tls-cert and --tls-key")
    tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key) if all(given) else None
    return SignerClient(args.address, tls=tls)


def _state(v: pb.KeyVersion) -> str:
    return pb.KeyVersionState.Name(v.state).lower()


def _key_dict(k: pb.Key) -> dict[str, Any]:
    return {
        "name": k.name,
        "algorithm": k.algorithm,
        "scope": k.scope,
        "labels": dict(k.labels),
        "primary_version": k.primary_version,
        **(
            {
                "next_primary_version": k.next_primary_version,
                "next_primary_time": k.next_primary_time.ToDatetime().isoformat() + "Z",
            }
            if k.next_primary_version
            else {}
        ),
        "created": k.create_time.ToDatetime().isoformat() + "Z",
        "versions": [
            {
                "version": v.version,
                "state": _state(v),
                "created": v.create_time.ToDatetime().isoformat() + "Z",
                **(
                    {"destroy_time": v.destroy_time.ToDatetime().isoformat() + "Z"}
                    if v.HasField("destroy_time")
                    else {}
                ),
                **({"pkcs11_uri": v.pkcs11_uri} if v.pkcs11_uri else {}),
            }
            for v in k.versions
        ],
    }


def _print_key(k: pb.Key) -> None:
    print(json.dumps(_key_dict(k), indent=2))


def _print_version(v: pb.KeyVersion) -> None:
    out = {"name": v.name, "version": v.version, "state": _state(v)}
    if v.HasField("destroy_time"):
        out["destroy_time"] = v.destroy_time.ToDatetime().isoformat() + "Z"
    print(json.dumps(out, indent=2))


# --- commands ---------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_key(c.create_key(args.name, args.algorithm, args.scope, dict(args.label)))
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        keys = list(c.iter_keys())
    if args.json:
        print(json.dumps([_key_dict(k) for k in keys], indent=2))
        return EXIT_OK
    print(f"{'NAME':<32} {'ALGORITHM':<10} {'PRIMARY':>7} {'VERSIONS':>8}  SCOPE")
    for k in keys:
        print(
            f"{k.name:<32} {k.algorithm:<10} {k.primary_version:>7} {len(k.versions):>8}  {k.scope}"
        )
    return EXIT_OK


def cmd_keys_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_key(c.get_key(args.name))
    return EXIT_OK


def cmd_keys_public(args: argparse.Namespace) -> int:
    with _client(args) as c:
        pk = c.public_key(args.name, args.version, args.format)
    text = pk.jwk + "\n" if args.format == "jwk" else pk.pem
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_key(c.rotate(args.name, now=args.now))
    return EXIT_OK


def cmd_keys_set_primary(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_key(c.set_primary(args.name, args.version))
    return EXIT_OK


def cmd_keys_version_op(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.op == "disable":
            v = c.disable(args.name, args.version)
        elif args.op == "enable":
            v = c.enable(args.name, args.version)
        elif args.op == "schedule-destruction":
            v = c.schedule_destruction(args.name, args.version, args.waiting_period)
        else:
            v = c.cancel_destruction(args.name, args.version)
    _print_version(v)
    return EXIT_OK


def cmd_keys_import(args: argparse.Namespace) -> int:
    pem = Path(args.infile).read_bytes()  # wrapped by the client below; never sent as is
    with _client(args) as c:
        key = c.import_key(
            args.name, args.algorithm, pem, scope=args.scope, labels=dict(args.label)
        )
    _print_key(key)
    return EXIT_OK


def _read_input(args: argparse.Namespace) -> dict[str, bytes]:
    data = sys.stdin.buffer.read() if args.infile == "-" else Path(args.infile).read_bytes()
    return {"digest": data} if args.digest else {"message": data}


def cmd_jwt_sign(args: argparse.Namespace) -> int:
    claims = sys.stdin.buffer.read() if args.claims == "-" else Path(args.claims).read_bytes()
    with _client(args) as c:
        print(c.sign_jwt(args.name, claims.strip(), set_issuer=args.set_issuer))
    return EXIT_OK


def cmd_jwks(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(json.dumps(c.jwks(args.scope), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    with _client(args) as c:
        sig = c.sign(
            args.name,
            version=args.version,
            signature_format=args.format,
            rsa_padding=args.padding,
            **_read_input(args),
        )
    Path(args.out).write_bytes(sig.signature)
    print(
        json.dumps(
            {
                "name": args.name,
                "version": sig.version,
                "algorithm": sig.algorithm,
                "signature_algorithm": sig.signature_algorithm,
                "out": args.out,
            }
        ),
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    signature = Path(args.signature).read_bytes()
    with _client(args) as c:
        ok = c.verify(
            args.name,
            signature,
            version=args.version,
            signature_format=args.format,
            rsa_padding=args.padding,
            **_read_input(args),
        )
    print("valid" if ok else "INVALID", file=sys.stderr)
    return EXIT_OK if ok else EXIT_INVALID


# --- parser -----------------------------------------------------------------------------------


def _client_parser(parent: Subparsers, name: str, help: str) -> argparse.ArgumentParser:
    sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
    env = os.environ.get
    sp.add_argument(
        "--address",
        default=env("SIGNER_ADDRESS", DEFAULT_ADDRESS),
        help=f"service address: unix:/path or host:port "
        f"(default $SIGNER_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    for what, meta in (("ca", "CA.pem"), ("cert", "CERT.pem"), ("key", "KEY.pem")):
        sp.add_argument(
            f"--tls-{what}",
            default=env(f"SIGNER_TLS_{what.upper()}"),
            metavar=meta,
            help=f"mTLS {what} (default $SIGNER_TLS_{what.upper()})",
        )
    return sp


def register_new_keys(keys: Subparsers) -> None:
    """``keys create`` and ``keys import``: the two ways a caller brings a key in (listed before
    the host's ``keys adopt`` in ``signer keys --help``)."""
    sp = _client_parser(keys, "create", "generate a key in the token")
    sp.add_argument("name")
    sp.add_argument("--algorithm", required=True, choices=list(ALGORITHMS))
    sp.add_argument("--scope", default="", help="key scope, fixed at creation")
    sp.add_argument("--label", action="append", default=[], type=label, metavar="KEY=VALUE")
    sp.set_defaults(func=cmd_keys_create)
    sp = _client_parser(keys, "import", "import a private key, wrapped here for the token")
    sp.add_argument("name", help="a new key (version 1) or an existing one (new primary version)")
    sp.add_argument("--algorithm", required=True, choices=list(ALGORITHMS))
    sp.add_argument("--in", dest="infile", required=True, help="PEM private key")
    sp.add_argument("--scope", default="", help="key scope, fixed at creation")
    sp.add_argument("--label", action="append", default=[], type=label, metavar="KEY=VALUE")
    sp.set_defaults(func=cmd_keys_import)


def register_keys(keys: Subparsers) -> None:
    """``keys`` list, show, public, rotate, set-primary and the version's states."""
    sp = _client_parser(keys, "list", "list keys")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_keys_list)
    sp = _client_parser(keys, "show", "show a key and its versions (JSON)")
    sp.add_argument("name")
    sp.set_defaults(func=cmd_keys_show)
    sp = _client_parser(keys, "public", "print a public key")
    sp.add_argument("name")
    sp.add_argument("--format", choices=["pem", "jwk"], default="pem")
    sp.add_argument("--version", type=int, default=0, help="default: the primary version")
    sp.add_argument("--out", help="write to this file instead of stdout")
    sp.set_defaults(func=cmd_keys_public)
    sp = _client_parser(
        keys,
        "rotate",
        "add a new version and make it primary (in an issuer's scope: publish it now, make it "
        "primary after [jwt] rotation_lead_seconds)",
    )
    sp.add_argument("name")
    sp.add_argument(
        "--now",
        action="store_true",
        help="in an issuer's scope, make it primary at once: verifiers holding a cached JWKS "
        "reject its tokens until they refetch",
    )
    sp.set_defaults(func=cmd_keys_rotate)
    sp = _client_parser(keys, "set-primary", "make a version primary")
    sp.add_argument("name")
    sp.add_argument("version", type=int)
    sp.set_defaults(func=cmd_keys_set_primary)
    for op, help_text in (
        ("disable", "disable a version (it cannot sign or verify)"),
        ("enable", "enable a disabled version"),
        ("schedule-destruction", "destroy a version after a waiting period (default 7 days)"),
        ("cancel-destruction", "cancel a scheduled destruction (the version stays disabled)"),
    ):
        sp = _client_parser(keys, op, help_text)
        sp.add_argument("name")
        sp.add_argument("version", type=int)
        if op == "schedule-destruction":
            sp.add_argument(
                "--waiting-period",
                type=int,
                default=0,
                metavar="SECONDS",
                help="default: the service's configured period",
            )
        else:
            sp.set_defaults(waiting_period=0)
        sp.set_defaults(func=cmd_keys_version_op, op=op)


def register(sub: Subparsers) -> None:
    """``jwt sign``, ``jwks``, ``sign``, ``verify``."""
    jwt_p = sub.add_parser("jwt", help="JWTs signed in the token")
    jwt_sub = jwt_p.add_subparsers(dest="jwt_command", required=True, metavar="COMMAND")
    sp = _client_parser(jwt_sub, "sign", "sign a JWT with KEY's primary version; prints the token")
    sp.add_argument("name", help="key name")
    sp.add_argument("--claims", required=True, help="JSON claims file ('-' for stdin)")
    sp.add_argument(
        "--set-issuer",
        action="store_true",
        help="put iss: the issuer of the key's scope ([jwt] issuers) in the claims",
    )
    sp.set_defaults(func=cmd_jwt_sign)
    sp = _client_parser(sub, "jwks", "print the JWKS of a scope (each JWK carries its scope)")
    sp.add_argument("--scope", required=True)
    sp.set_defaults(func=cmd_jwks)

    # signer sign / verify
    for name, help_text, fn in (
        ("sign", "sign a file (signature written as raw bytes; DER for ECDSA)", cmd_sign),
        ("verify", "verify a signature (exit 0 valid, 1 invalid)", cmd_verify),
    ):
        sp = _client_parser(sub, name, help_text)
        sp.add_argument("name", help="key name")
        sp.add_argument("--in", dest="infile", required=True, help="input file ('-' for stdin)")
        if name == "sign":
            sp.add_argument("--out", required=True, help="signature file to write")
        else:
            sp.add_argument("--signature", required=True, help="signature file")
        sp.add_argument(
            "--digest", action="store_true", help="the input is already a digest, not a message"
        )
        sp.add_argument("--version", type=int, default=0, help="default: the primary version")
        sp.add_argument(
            "--format", choices=["der", "raw"], default="der", help="ECDSA encoding (default der)"
        )
        sp.add_argument(
            "--padding",
            choices=["pss", "pkcs1v15"],
            default="pss",
            help="RSA padding (default pss)",
        )
        sp.set_defaults(func=fn)
