"""The service of the README's migration guide ("Migrating a key out of a process's memory"), as
tests/integration/test_migration_guide.py runs it: a long-running process that signs release
artifacts with an EC P-256 key and keeps signing.

    python migration_guide_service.py old PEM-FILE        # before: the PEM key in its memory
    python migration_guide_service.py new NAME ADDRESS    # after: the key in the token

The two differ in one line, where the key comes from (``load_key``); the signing code is the
same. The test writes a marker's hex on the first line of stdin (bytes the process then holds, so
a core that has them is a whole dump of it), then commands, one a line: ``sign HEX`` answers
``sig HEX`` (a signature of those bytes), ``count`` answers ``count N`` (signatures made so
far by the background loop), end of input ends the process. It prints ``ready PUBLIC-KEY-HEX``
(the DER SubjectPublicKeyInfo of ``key.public_key()``) when it is serving.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def allow_any_tracer() -> None:
    """Test scaffolding, not part of the guide: under Yama ptrace_scope 1 only an ancestor may
    attach, and the test's gcore is a sibling (an operator runs gcore as root, who may)."""
    if os.path.exists("/proc/sys/kernel/yama/ptrace_scope"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)  # PR_SET_PTRACER, PR_SET_PTRACER_ANY


def load_key(mode: str, args: list[str]) -> Any:
    if mode == "old":
        key = serialization.load_pem_private_key(Path(args[0]).read_bytes(), None)
    else:
        from signer.client import SignerClient
        from signer.dropin import load_private_key

        key = load_private_key(f"signer://{args[0]}", client=SignerClient(args[1]))
    return key


def sign_release(key: ec.EllipticCurvePrivateKey, artifact: bytes) -> bytes:
    """The service's signing code, unchanged by the migration."""
    return key.sign(artifact, ec.ECDSA(hashes.SHA256()))


def main() -> None:
    allow_any_tracer()
    marker = bytes.fromhex(sys.stdin.readline().strip())
    key = load_key(sys.argv[1], sys.argv[2:])
    signed = 0
    stop = threading.Event()

    def keep_signing() -> None:
        nonlocal signed
        while not stop.is_set():
            sign_release(key, b"nightly build %d" % signed)
            signed += 1
            stop.wait(0.01)

    worker = threading.Thread(target=keep_signing, daemon=True)
    worker.start()
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    print("ready", public.hex(), flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "sign":
            print("sig", sign_release(key, bytes.fromhex(arg)).hex(), flush=True)
        elif command == "count":
            print("count", signed, flush=True)
    stop.set()
    worker.join()
    assert marker  # held until the end


if __name__ == "__main__":
    main()
