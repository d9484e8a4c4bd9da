"""Ed25519 end to end, against a module that offers CKM_EDDSA.

THIS CONFIGURATION KEEPS THE TOKEN IN-PROCESS: the service (in this test process) loads
libsofthsm2.so itself, so key material lives in the service's memory. Debian's p11-kit 0.24.1 does
not forward CKM_EDDSA over its RPC, so this is the only way to exercise ed25519 here; production
uses a module (a network HSM's client) that carries CKM_EDDSA across the process boundary.

It also guards the session-pool policy: python-pkcs11 calls C_Initialize(NULL), after which
SoftHSM2 disables its own mutexes, and 4 threads signing on 4 sessions segfault the process. The
pool must serialise calls for such a module; the concurrent test below would crash pytest if not.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from signer.errors import InvalidArgument
from tests.conftest import RunningService

pytestmark = [pytest.mark.integration, pytest.mark.inprocess]


def test_ed25519_sign_verifies_with_cryptography_and_openssl(
    inprocess_service: RunningService, tmp_path: Path
) -> None:
    client = inprocess_service.client()
    key = client.create_key("ed-inprocess", "ed25519")
    assert key.algorithm == "ed25519"
    message = b"ed25519 signs the message itself" * 3
    sig = client.sign("ed-inprocess", message=message)
    assert sig.signature_algorithm == "Ed25519"
    assert len(sig.signature) == 64
    pem = client.public_key("ed-inprocess").pem
    pub = serialization.load_pem_public_key(pem.encode())
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    pub.verify(sig.signature, message)

    (tmp_path / "pub.pem").write_text(pem)
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(sig.signature)
    out = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "pub.pem",
            "-rawin",
            "-in",
            "msg",
            "-sigfile",
            "sig",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Signature Verified Successfully" in out.stdout

    assert client.verify("ed-inprocess", sig.signature, message=message)
    assert not client.verify("ed-inprocess", sig.signature, message=message + b".")
    import json

    jwk = json.loads(client.public_key("ed-inprocess", format="jwk").jwk)
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("OKP", "Ed25519", "EdDSA")


def test_ed25519_refuses_a_digest(inprocess_service: RunningService) -> None:
    client = inprocess_service.client()
    client.create_key("ed-digest", "ed25519")
    with pytest.raises(InvalidArgument, match="ed25519 signs the message itself"):
        client.sign("ed-digest", digest=bytes(32))


def test_inprocess_module_survives_concurrent_callers(inprocess_service: RunningService) -> None:
    """Without the serialised pool this segfaults (seen here: exit 139 with 4 threads)."""
    client = inprocess_service.client()
    client.create_key("ed-conc", "ed25519")
    client.create_key("ec-conc", "ec-p256")
    errors: list[BaseException] = []
    count = 0
    lock = threading.Lock()

    def work(i: int) -> None:
        nonlocal count
        try:
            for n in range(150):
                name = "ed-conc" if (i + n) % 2 else "ec-conc"
                msg = f"{i}:{n}".encode()
                sig = client.sign(name, message=msg)
                assert client.verify(name, sig.signature, message=msg)
                with lock:
                    count += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert count == 8 * 150
