"""``signer``: the one command line of the project.

Exit codes: 0 success; 1 a signature that does not verify; 2 an error (bad usage, or an error
status from the service, printed as ``error: STATUS: message``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from signer.client import DEFAULT_ADDRESS, SignerClient
from signer.errors import SignerError
from signer.keys import ALGORITHMS
from signer.v1 import signer_pb2 as pb

EXIT_OK, EXIT_INVALID, EXIT_ERROR = 0, 1, 2


def _client(args: argparse.Namespace) -> SignerClient:
    return SignerClient(args.address)


def _state(v: pb.KeyVersion) -> str:
    return pb.KeyVersionState.Name(v.state).lower()


def _key_dict(k: pb.Key) -> dict[str, Any]:
    return {
        "name": k.name,
        "algorithm": k.algorithm,
        "scope": k.scope,
        "labels": dict(k.labels),
        "primary_version": k.primary_version,
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


def _label(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"label {text!r} must be KEY=VALUE")
    return k, v


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
        _print_key(c.rotate(args.name))
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


def _read_input(args: argparse.Namespace) -> dict[str, bytes]:
    data = sys.stdin.buffer.read() if args.infile == "-" else Path(args.infile).read_bytes()
    return {"digest": data} if args.digest else {"message": data}


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


def cmd_hsm_init(args: argparse.Namespace) -> int:
    from signer import hsm

    paths = hsm.init(args.dir, args.label)
    print(f"token {args.label!r} created in {paths.root}; PINs are in {paths.root}/*.pin (0600)")
    return EXIT_OK


def cmd_hsm_serve(args: argparse.Namespace) -> int:
    from signer import hsm, logs

    logs.setup(args.log_level)
    return hsm.serve_forever(args.dir, args.label)


def cmd_serve(args: argparse.Namespace) -> int:
    from signer import config, logs, server

    logs.setup(args.log_level)
    return server.serve(config.load(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    from signer import launcher, logs

    logs.setup(args.log_level)
    return launcher.run(args.dir, args.listen)


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signer",
        description="HSM-backed signing: keys stay in a PKCS#11 token in its own process.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_parser(parent: Any, name: str, help: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sp.add_argument(
            "--address",
            default=DEFAULT_ADDRESS,
            help=f"service address (default {DEFAULT_ADDRESS})",
        )
        return sp

    def log_level(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--log-level", default="info", choices=["debug", "info", "warning", "error"]
        )

    # signer hsm ...
    hsm_p = sub.add_parser("hsm", help="the token host (SoftHSM2 behind p11-kit server)")
    hsm_sub = hsm_p.add_subparsers(dest="hsm_command", required=True, metavar="COMMAND")
    sp = hsm_sub.add_parser("init", help="create a token with random PINs in owner-only files")
    sp.add_argument("--dir", default="var/hsm", help="token host directory (default var/hsm)")
    sp.add_argument("--label", default="signer", help="token label (default signer)")
    sp.set_defaults(func=cmd_hsm_init)
    sp = hsm_sub.add_parser("serve", help="serve the token on DIR/run/p11-kit.sock, core dumps off")
    sp.add_argument("--dir", default="var/hsm")
    sp.add_argument("--label", default="signer")
    log_level(sp)
    sp.set_defaults(func=cmd_hsm_serve)

    # signer serve / run
    sp = sub.add_parser("serve", help="run the gRPC service (config: TOML plus SIGNER_* overrides)")
    sp.add_argument("--config", help="TOML configuration file")
    log_level(sp)
    sp.set_defaults(func=cmd_serve)
    sp = sub.add_parser("run", help="token host + service + demo key in the foreground (make run)")
    sp.add_argument("--dir", default="var", help="state directory (default var)")
    sp.add_argument("--listen", default="127.0.0.1:50051")
    log_level(sp)
    sp.set_defaults(func=cmd_run)

    # signer keys ...
    keys_p = sub.add_parser("keys", help="create, inspect, rotate and retire keys")
    keys_sub = keys_p.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    sp = client_parser(keys_sub, "create", "generate a key in the token")
    sp.add_argument("name")
    sp.add_argument("--algorithm", required=True, choices=list(ALGORITHMS))
    sp.add_argument("--scope", default="", help="key scope, fixed at creation")
    sp.add_argument("--label", action="append", default=[], type=_label, metavar="KEY=VALUE")
    sp.set_defaults(func=cmd_keys_create)
    sp = client_parser(keys_sub, "list", "list keys")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_keys_list)
    sp = client_parser(keys_sub, "show", "show a key and its versions (JSON)")
    sp.add_argument("name")
    sp.set_defaults(func=cmd_keys_show)
    sp = client_parser(keys_sub, "public", "print a public key")
    sp.add_argument("name")
    sp.add_argument("--format", choices=["pem", "jwk"], default="pem")
    sp.add_argument("--version", type=int, default=0, help="default: the primary version")
    sp.add_argument("--out", help="write to this file instead of stdout")
    sp.set_defaults(func=cmd_keys_public)
    sp = client_parser(keys_sub, "rotate", "add a new version and make it primary")
    sp.add_argument("name")
    sp.set_defaults(func=cmd_keys_rotate)
    sp = client_parser(keys_sub, "set-primary", "make a version primary")
    sp.add_argument("name")
    sp.add_argument("version", type=int)
    sp.set_defaults(func=cmd_keys_set_primary)
    for op, help_text in (
        ("disable", "disable a version (it cannot sign or verify)"),
        ("enable", "enable a disabled version"),
        ("schedule-destruction", "destroy a version after a waiting period (default 7 days)"),
        ("cancel-destruction", "cancel a scheduled destruction (the version stays disabled)"),
    ):
        sp = client_parser(keys_sub, op, help_text)
        sp.add_argument("name")
        sp.add_argument("version", type=int)
        if op == "schedule-destruction":
            sp.add_argument(
                "--waiting-period", type=int, default=0, metavar="SECONDS",
                help="default: the service's configured period",
            )  # fmt: skip
        else:
            sp.set_defaults(waiting_period=0)
        sp.set_defaults(func=cmd_keys_version_op, op=op)

    # signer sign / verify
    for name, help_text, fn in (
        ("sign", "sign a file (signature written as raw bytes; DER for ECDSA)", cmd_sign),
        ("verify", "verify a signature (exit 0 valid, 1 invalid)", cmd_verify),
    ):
        sp = client_parser(sub, name, help_text)
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except SignerError as exc:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
