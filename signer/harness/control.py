"""The positive control: a process that holds the same keys the way services used to.

It loads every private key with `cryptography` (OpenSSL BIGNUMs in its heap), keeps the PEM text
and the PINs as Python strings, signs in worker threads, and serves TLS the ordinary way (Python's
``ssl``, the endpoint key loaded from its PEM file, handshakes going on) until it is crashed. The
harness crashes and dumps it exactly like the service; the scanner must find every key and PIN in
that dump, or the run proves nothing.

    python -m signer.harness.control --keys DIR --pin-file FILE --ready FILE --marker-file FILE \
        [--tls-key KEY.pem --tls-cert CERT.pem --tls-pin-file FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
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
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-pin-file", type=Path)
    args = p.parse_args(argv)

    pems = {f.name: f.read_bytes() for f in sorted(args.keys.glob("*.pem"))}
    keys = {name: serialization.load_pem_private_key(pem, None) for name, pem in pems.items()}
    pin = args.pin_file.read_text().strip()  # a str, as any service reading a config would
    marker = args.marker_file.read_bytes()
    held = {"pems": pems, "keys": keys, "pin": pin, "marker": marker}
    if args.tls_pin_file is not None:
        held["tls_pin"] = args.tls_pin_file.read_text().strip()
    if args.tls_key is not None and args.tls_cert is not None:
        held["tls_server"] = _serve_tls(args.tls_cert, args.tls_key)

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


def _serve_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """An ordinary TLS server: the key loaded into OpenSSL from its file, handshakes in a loop."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

    def connect() -> None:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port)) as raw,
                client.wrap_socket(raw) as tls,
            ):
                tls.sendall(b"x")
            time.sleep(0.01)

    threading.Thread(target=serve, daemon=True).start()
    threading.Thread(target=connect, daemon=True).start()
    return ctx


if __name__ == "__main__":
    raise SystemExit(main())
