"""``python -m benchmarks.raw``: one raw signing baseline, run in its own process, printing
JSON. No gRPC, no service: the speed of the CPU (``cryptography``), of the token itself
(python-pkcs11 with SoftHSM2 loaded in this process) and of the process boundary
(python-pkcs11 through ``p11-kit-client.so``).

This is benchmark code at the token host's side: it authenticates with the PIN file as python-pkcs11
expects (a ``str``), which the service never does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

PSS = padding.PSS(padding.MGF1(hashes.SHA256()), 32)


def _software(algorithm: str) -> Any:
    if algorithm == "ec-p256":
        key = ec.generate_private_key(ec.SECP256R1())
        return lambda m: key.sign(m, ec.ECDSA(hashes.SHA256()))
    if algorithm == "rsa-2048":
        rkey = rsa.generate_private_key(65537, 2048)
        return lambda m: rkey.sign(m, PSS, hashes.SHA256())
    ekey = ed25519.Ed25519PrivateKey.generate()
    return ekey.sign


def _token_signer(args: argparse.Namespace) -> Any:
    import pkcs11
    from pkcs11 import MGF, Mechanism, ObjectClass

    if args.server_address:
        os.environ["P11_KIT_SERVER_ADDRESS"] = args.server_address
    lib = pkcs11.lib(args.module)
    token = lib.get_token(token_label=args.token)
    pin = open(args.pin_file).read().strip()  # noqa: SIM115 (benchmark tool, token host side)
    key_id = bytes.fromhex(args.key_id)

    opened: list[Any] = []

    def make() -> Any:
        # Login is per token, not per session: the first session logs in, the others share it.
        session = token.open(user_pin=None if opened else pin)
        opened.append(session)
        key: Any = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
        if args.algorithm == "rsa-2048":
            return lambda m: key.sign(
                hashlib.sha256(m).digest(),
                mechanism=Mechanism.RSA_PKCS_PSS,
                mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32),
            )
        if args.algorithm == "ed25519":
            return lambda m: key.sign(m, mechanism=Mechanism.EDDSA)
        return lambda m: key.sign(hashlib.sha256(m).digest(), mechanism=Mechanism.ECDSA)

    return make


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.raw")
    p.add_argument("--mode", choices=["cryptography", "pkcs11"], required=True)
    p.add_argument("--algorithm", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--module")
    p.add_argument("--server-address", default="")
    p.add_argument("--token", default="signer")
    p.add_argument("--pin-file")
    p.add_argument("--key-id")
    args = p.parse_args(argv)

    signers: list[Callable[[bytes], bytes]]
    if args.mode == "cryptography":
        signers = [_software(args.algorithm)] * args.threads
    else:
        make = _token_signer(args)
        signers = [make() for _ in range(args.threads)]
    counts = [0] * args.threads
    stop = threading.Event()

    def work(i: int) -> None:
        sign = signers[i]
        while not stop.is_set():
            sign(os.urandom(32))
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(args.threads)]
    cpu0, began = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    done, elapsed = sum(counts), time.perf_counter() - began
    stop.set()
    for t in threads:
        t.join()
    cpu = time.process_time() - cpu0
    print(json.dumps({"per_second": done / elapsed, "calls": done, "cpu_seconds": cpu}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
