"""Many concurrent clients, mixed algorithms, thousands of signatures: zero errors, all verified."""

from __future__ import annotations

import threading
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tests.conftest import RunningService, UniqueName

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 16
PER_CLIENT = 250
ALGORITHMS = ["ec-p256", "ec-p384", "ec-p521", "rsa-2048"]
HASH = {"ec-p256": hashes.SHA256(), "ec-p384": hashes.SHA384(), "ec-p521": hashes.SHA512()}


def test_sixteen_clients_thousands_of_signatures(
    service: RunningService, unique_name: UniqueName
) -> None:
    setup = service.client()
    names = {alg: unique_name(alg) for alg in ALGORITHMS}
    pubs = {}
    for alg, name in names.items():
        setup.create_key(name, alg)
        pubs[alg] = serialization.load_pem_public_key(setup.public_key(name).pem.encode())

    errors: list[str] = []
    signed: list[tuple[str, bytes, bytes]] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client_loop(i: int) -> None:
        c = service.client()  # its own channel, as a separate caller would have
        mine = []
        start.wait()
        for n in range(PER_CLIENT):
            alg = ALGORITHMS[(i + n) % len(ALGORITHMS)]
            msg = f"client {i} message {n}".encode()
            try:
                mine.append((alg, msg, c.sign(names[alg], message=msg).signature))
            except Exception as exc:
                mine.append((alg, msg, b""))
                with lock:
                    errors.append(f"{alg}: {type(exc).__name__}: {exc}")
        with lock:
            signed.extend(mine)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0

    assert not errors, errors[:5]
    assert len(signed) == CLIENTS * PER_CLIENT
    for alg, msg, sig in signed:
        pub = pubs[alg]
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, msg, ec.ECDSA(HASH[alg]))
        else:
            assert isinstance(pub, rsa.RSAPublicKey)
            pub.verify(sig, msg, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    # A figure for the log, not an assertion: speed belongs to `make bench`.
    print(
        f"\n{len(signed)} mixed signatures by {CLIENTS} clients in {elapsed:.2f}s "
        f"({len(signed) / elapsed:.0f}/s)"
    )
