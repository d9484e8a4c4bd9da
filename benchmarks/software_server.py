"""``python -m benchmarks.software_server --listen unix:PATH``: what services had before, built
only to be measured against. The same gRPC stack and API as the service (SignerService.Sign),
private keys generated in memory with ``cryptography`` and used inline on the event loop, no
token, no policy, no audit log. Keys: ``ec-p256``, ``ec-p384``, ``rsa-2048``, ``ed25519``, named
after their algorithm.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc

PSS = padding.PSS(padding.MGF1(hashes.SHA256()), 32)


class SoftwareSigner(pb_grpc.SignerServiceServicer):
    def __init__(self) -> None:
        self.keys: dict[str, Any] = {
            "ec-p256": ec.generate_private_key(ec.SECP256R1()),
            "ec-p384": ec.generate_private_key(ec.SECP384R1()),
            "rsa-2048": rsa.generate_private_key(65537, 2048),
            "ed25519": ed25519.Ed25519PrivateKey.generate(),
        }

    async def Sign(self, request: pb.SignRequest, context: Any) -> pb.SignResponse:
        key = self.keys.get(request.name)
        if key is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"key {request.name!r} not found")
            raise AssertionError("unreachable: abort raises")
        if isinstance(key, ec.EllipticCurvePrivateKey):
            h = hashes.SHA256() if key.curve.key_size == 256 else hashes.SHA384()
            sig = key.sign(request.message, ec.ECDSA(h))
        elif isinstance(key, rsa.RSAPrivateKey):
            sig = key.sign(request.message, PSS, hashes.SHA256())
        else:
            sig = key.sign(request.message)
        return pb.SignResponse(signature=sig, version=1, algorithm=request.name)


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_SignerServiceServicer_to_server(SoftwareSigner(), server)
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.software_server")
    p.add_argument("--listen", required=True, help="unix:/path")
    asyncio.run(serve(p.parse_args(argv).listen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
