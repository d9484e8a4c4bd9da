"""The seed corpus, built with code: ``python -m fuzz.seeds`` (re)writes the seeds.

Small valid inputs of each kind: ELF cores of both classes and byte orders with planted key
material, policy and configuration files, key files, tokens. The fuzzer mutates from them; the
keys are the fixed test keys of :mod:`fuzz.targets`, never real ones.

Seeds that hold a private key as text (a PEM or OpenSSH block, a JWK with its ``d``) are not
committed, although their keys are public test keys: such text in a repository reads as a
leaked key to every secret scanner and reviewer's grep. They are written to ``var/fuzz/seeds/``
for the fuzzer and replayed from memory by ``make test``; ``fuzz/corpus/`` holds the others.
"""

from __future__ import annotations

import base64
import json
import lzma
import re
import sys
from pathlib import Path

import lz4.frame
import zstandard
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from fuzz.elfcore import Load, build
from fuzz.targets import EC_KEY, ED_KEY, PIN, TARGETS
from signer._internal import config, policy

CORPUS = Path(__file__).parent / "corpus"
GENERATED = Path(__file__).resolve().parent.parent / "var" / "fuzz" / "seeds"
_KEY_TEXT = re.compile(rb'PRIVATE KEY|"d"\s*:')


def holds_key_text(data: bytes) -> bool:
    """Whether ``data`` holds a private key as text (see the module's docstring)."""
    return _KEY_TEXT.search(data) is not None


HEAP, LIB = 0x5555_5555_0000, 0x7F00_0000_0000


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _filler(n: int, seed: int) -> bytes:
    # Memory-like bytes without high-entropy runs: small integers, pointers, text.
    out = bytearray()
    i = seed
    while len(out) < n:
        out += (0x7F00_0000_0000 + i * 48).to_bytes(8, "little") + b"grpc\0" + bytes(3)
        i += 1
    return bytes(out[:n])


def _pem(fmt: serialization.PrivateFormat, key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _der(fmt: serialization.PrivateFormat, key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())


def _private_jwk() -> dict[str, str]:
    jwk: dict[str, str] = json.loads(ECAlgorithm.to_jwk(EC_KEY))
    return jwk


def _cores(planted: list[bytes]) -> dict[str, bytes]:
    """Cores (64/32-bit, little/big-endian, truncated) whose heap holds ``planted``."""
    heap = bytearray(_filler(1024, 1))
    at = 40
    for item in planted:
        heap[at : at + len(item)] = item
        at += len(item) + 24
    loads = [Load(HEAP, bytes(heap)), Load(LIB, _filler(256, 2), memsz=0x1000)]
    files = [(LIB, LIB + 0x1000, "/usr/lib/libfake.so.1")]
    out = {}
    for is64 in (True, False):
        for big in (False, True):
            if not is64:
                loads = [Load(HEAP & 0xFFFF_FFFF, bytes(heap)), Load(0x7F00_0000, _filler(256, 2))]
                files = [(0x7F00_0000, 0x7F00_1000, "/lib/libfake.so.1")]
            core = build(loads, files, is64=is64, big_endian=big, align=256)
            out[f"core{64 if is64 else 32}{'be' if big else 'le'}"] = core.bytes()
    whole = out["core64le"]
    out["core64le-truncated"] = whole[: len(whole) - 600]
    return out


def seeds() -> dict[str, dict[str, bytes]]:
    d = EC_KEY.private_numbers().private_value.to_bytes(32, "big")
    seed = ED_KEY.private_bytes_raw()
    pkcs8 = serialization.PrivateFormat.PKCS8
    trad = serialization.PrivateFormat.TraditionalOpenSSL
    ssh = serialization.PrivateFormat.OpenSSH
    known = _cores([d, PIN, seed[::-1], PIN.decode().encode("utf-16-le")])
    known["raw-pem"] = b"\0" * 64 + _pem(pkcs8, EC_KEY) + b"\0" * 64
    compressed = {}
    for name, core in known.items():
        if name.startswith("core"):
            compressed[f"{name}.zst"] = zstandard.ZstdCompressor(write_checksum=True).compress(core)
            compressed[f"{name}.lz4"] = bytes(lz4.frame.compress(core, content_checksum=True))
            compressed[f"{name}.xz"] = lzma.compress(core, preset=0)
    blind = _cores([_der(pkcs8, EC_KEY), _der(trad, EC_KEY), json.dumps(_private_jwk()).encode()])
    blind["raw-pem-openssh"] = (
        b"\0" * 32
        + _pem(trad, EC_KEY)
        + b"\0" * 32
        + ED_KEY.private_bytes(serialization.Encoding.PEM, ssh, serialization.NoEncryption())
    )
    blind["raw-scalar"] = b"\x11" * 64 + d[::-1] + b"\0" * 64 + d + b"\x22" * 64

    pol = {
        "docstring": (
            policy.grant_everything(["uid:1000", "user:deploy"])
            + '\n[[grant]]\ncallers = ["x509:O=acme,CN=payments"]\n'
            'issuers = ["CN=signer development CA"]\noperations = ["sign", "verify"]\n'
            'scopes = ["consumer"]\nkeys = ["payments-*"]\n'
            '\n[[revoked]]\nissuer = "CN=signer development CA"\nserials = ["4F:1A:B3"]\n'
        ).encode(),
        "inline": b'grant = [{callers = ["uid:0"], operations = ["read"], keys = ["*"]}]\n',
        "empty": b"",
    }
    cfg = {
        "defaults": config.dump(config.Config()).encode(),
        "partial": b'[server]\nlisten = "unix:/run/s.sock"\ngrace_seconds = 2.5\n'
        b'[token]\nsessions = 4\nlanes = 2\nthread_safe = "false"\n',
    }
    okp = json.loads(OKPAlgorithm.to_jwk(ED_KEY))
    secrets = {
        "ec-pkcs8.pem": _pem(pkcs8, EC_KEY),
        "ec-sec1.der": _der(trad, EC_KEY),
        "ed.openssh": ED_KEY.private_bytes(
            serialization.Encoding.PEM, ssh, serialization.NoEncryption()
        ),
        "jwks.json": json.dumps({"keys": [_private_jwk(), okp]}).encode(),
        "ec-public.pem": EC_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "ed-public.ssh": ED_KEY.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
        "pin-text": PIN + b"\n",
    }
    header = _b64url(b'{"alg":"ES256","kid":"k1","typ":"JWT"}')
    claims = _b64url(b'{"iss":"iss","aud":"aud","exp":4102444800,"sub":"x"}')
    signing_input = f"{header}.{claims}".encode()
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(
        EC_KEY.sign(signing_input, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    )
    token = f"{header}.{claims}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    from fuzz.targets import _jwks

    jwt = {
        "token": token.encode(),
        "token-jwks": token.encode() + b"\n" + json.dumps(_jwks()).encode(),
        "claims": b'{"sub":"alice","exp":4102444800,"nested":{"a":[1,2.5,null,true]}}',
    }
    cores = _cores([d])
    maps = {
        "maps": (
            f"{HEAP:x}-{HEAP + 0x21000:x} rw-p 00000000 00:00 0          [heap]\n"
            f"{LIB:x}-{LIB + 0x2000:x} r-xp 00002000 08:01 1234       /usr/lib/libfake.so.1\n"
            "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0          [stack]\n"
            "7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0\n"
        ).encode()
    }
    return {
        "elf": cores,
        "maps": maps,
        "scan_known": known,
        "scan_compressed": compressed,
        "scan_blind": blind,
        "policy": pol,
        "config": cfg,
        "secrets": secrets,
        "jwt": jwt,
    }


def write(committed: Path = CORPUS, generated: Path = GENERATED) -> None:
    """Every seed to ``generated/<target>/``; those without key text to ``committed``."""
    made = seeds()
    assert set(made) == set(TARGETS)
    for target, files in made.items():
        for root in (committed, generated):
            directory = root / target
            directory.mkdir(parents=True, exist_ok=True)
            for old in directory.glob("seed-*"):
                old.unlink()
        for name, data in files.items():
            (generated / target / f"seed-{name}").write_bytes(data)
            if not holds_key_text(data):
                (committed / target / f"seed-{name}").write_bytes(data)


def main() -> int:
    write()
    for target in TARGETS:
        n = len(list((CORPUS / target).glob("seed-*")))
        print(f"{target}: {n} seeds in {CORPUS / target}, all in {GENERATED / target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
