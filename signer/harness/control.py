"""The positive control: a process that holds the same keys the way services used to.

It loads every private key with `cryptography` (OpenSSL BIGNUMs in its heap), keeps the PEM text
and the PIN as Python objects, and signs in worker threads until it is crashed. The harness
crashes and dumps it exactly like the service; the scanner must find every key in that dump,
or the run proves nothing.

    python -m signer.harness.control --keys DIR --pin-file FILE --ready FILE
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--keys", type=Path, required=True)
    p.add_argument("--pin-file", type=Path, required=True)
    p.add_argument("--ready", type=Path, required=True)
    p.add_argument("--marker-file", type=Path, required=True)
    args = p.parse_args(argv)

    pems = {f.name: f.read_bytes() for f in sorted(args.keys.glob("*.pem"))}
    keys = {name: serialization.load_pem_private_key(pem, None) for name, pem in pems.items()}
    pin = args.pin_file.read_text().strip()  # a str, as any service reading a config would
    marker = args.marker_file.read_bytes()
    held = {"pems": pems, "keys": keys, "pin": pin, "marker": marker}

    def sign_forever(key: object) -> None:
        while True:
            if isinstance(key, rsa.RSAPrivateKey):
                key.sign(marker, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
            elif isinstance(key, ec.EllipticCurvePrivateKey):
                key.sign(marker, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, ed25519.Ed25519PrivateKey):
                key.sign(marker)
            time.sleep(0.001)

    for key in keys.values():
        threading.Thread(target=sign_forever, args=(key,), daemon=True).start()
    args.ready.write_text(str(len(held["keys"])))
    while True:
        time.sleep(1)


if __name__ == "__main__":
    raise SystemExit(main())
