"""``python -m signer._internal.token.keygen``: generates a key pair inside a token, at the token
host.

:func:`signer._internal.hsm.generate_tls_key` runs this as a short-lived child with core dumps
off, so the module that holds the token (SoftHSM2, loaded in-process here) is never mapped by
a process that lives on. The key is generated in the token, private, sensitive and not
extractable; only the public key comes out, as a PEM file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from signer._internal.config import TokenConfig
from signer._internal.token._token import Token
from signer._internal.token.pin import Pin
from signer.errors import SignerError
from signer.keys import ALGORITHMS


def generate(cfg: TokenConfig, algorithm: str, key_id: bytes, label: str) -> bytes:
    """Generates the pair; returns the public key as SubjectPublicKeyInfo PEM."""
    token = Token(cfg, Pin(Path(cfg.pin_file)))
    token.start(wait=True)
    try:
        if token.exists(key_id):
            raise SignerError(f"the token already holds an object with id {key_id.hex()}")
        spki = token.generate(ALGORITHMS[algorithm], key_id, label)
    finally:
        token.close()
    public = serialization.load_der_public_key(spki)
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m signer._internal.token.keygen")
    p.add_argument("--module", required=True)
    p.add_argument("--uri", required=True, help="RFC 7512 URI of the token")
    p.add_argument("--pin-file", required=True)
    p.add_argument("--algorithm", required=True, choices=list(ALGORITHMS))
    p.add_argument("--label", required=True)
    p.add_argument("--id", required=True, help="CKA_ID in hex")
    p.add_argument("--out", required=True, type=Path, help="public key PEM to write")
    args = p.parse_args(argv)
    cfg = TokenConfig(
        module=args.module, uri=args.uri, pin_file=args.pin_file, sessions=1, thread_safe="false"
    )
    try:
        pem = generate(cfg, args.algorithm, bytes.fromhex(args.id), args.label)
    except SignerError as exc:
        print(f"keygen: {exc}", file=sys.stderr)
        return 1
    args.out.write_bytes(pem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
