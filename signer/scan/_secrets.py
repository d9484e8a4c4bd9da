"""What the scanner looks for: known secrets (private keys, PINs, raw secrets) and public keys.

A :class:`Secret` holds the raw components of one key or PIN as bytes; :mod:`._patterns` turns
them into every representation a process could hold them in. Loading accepts what an operator
has at hand (PEM, DER, OpenSSH, JWK, a PIN file) and refuses what would make a clean result
meaningless (a PIN so short it matches by chance, an encrypted key the scanner cannot read).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import stat
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signer.errors import ScanError, shown
from signer.keys import PublicKeyType

KINDS = ("rsa", "ec", "ed25519", "pin", "raw")

MIN_PATTERN = 6
"""Shorter patterns match by chance all over a dump: a finding would mean nothing."""
MAX_TEXT_SECRET = 1 << 16
"""A PIN or raw secret larger than this is more likely a key file in a format not recognised."""
MAX_KEY_FILE = 4 << 20
"""The largest secrets or public-key file read: a JWK Set or a certificate bundle is far smaller,
and a device or a dump given by mistake must not be read into memory whole."""
MAX_RSA_BITS = 16384
"""OpenSSL's own limit on an RSA modulus. Recovering p and q from a JWK's n, e and d costs
modular exponentiations in Python: about 8 s at 16384 bits, minutes beyond."""
MAX_RSA_EXPONENT_BITS = 64
"""An RSA public exponent wider than this is refused (OpenSSL refuses them for moduli above
3072 bits): the recovery's cost grows with it too."""

# Components by how they are represented (see _patterns); any other component is text-like.
NUMERIC = ("d", "p", "q", "dP", "dQ", "qInv", "private_value", "seed")
WHOLE_KEY = ("pkcs1-der", "sec1-der", "pkcs8-der", "openssh-key", "ppk-private")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}


@dataclass(frozen=True)
class Secret:
    """One known secret. ``components`` are big-endian (numbers, padded to their natural size:
    the modulus or field length) or raw bytes (seed, PIN, DER encodings of the whole key)."""

    id: str
    kind: str
    components: dict[str, bytes] = field(repr=False)
    public_der: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ScanError("secret id must be a non-empty string")
        if self.kind not in KINDS:
            raise ScanError(
                f"secret {self.id!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}"
            )
        if not self.components:
            raise ScanError(f"secret {self.id!r} has no components")
        for name, value in self.components.items():
            if not isinstance(value, bytes):
                raise ScanError(f"secret {self.id!r}: component {name!r} must be bytes")
            if len(value.lstrip(b"\0") if name in NUMERIC else value) < MIN_PATTERN:
                raise ScanError(
                    f"secret {self.id!r}: component {name!r} is shorter than {MIN_PATTERN} "
                    "bytes; it would match by chance all over a dump"
                )


def _be(value: int, length: int) -> bytes:
    return value.to_bytes(max(length, (value.bit_length() + 7) // 8), "big")


def _der(key: PrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())


def _ssh_string_end(blob: bytes, at: int) -> int:
    n: int = struct.unpack_from(">I", blob, at)[0]
    if at + 4 + n > len(blob):
        raise ValueError("SSH string runs past the end")
    return at + 4 + n


def openssh_fields(blob: bytes) -> tuple[int, int]:
    """Where the key fields of an ``openssh-key-v1`` blob's private section are: from the key
    type (after the private section's length and its two check integers) to the end of the last
    private field (before the comment and the padding)."""
    at = len(b"openssh-key-v1\0")
    for _ in range(3):  # cipher, KDF, KDF options
        at = _ssh_string_end(blob, at)
    at = _ssh_string_end(blob, at + 4)  # the number of keys (1), then the public key
    start = at + 4 + 8
    (n,) = struct.unpack_from(">I", blob, start)
    keytype = blob[start + 4 : start + 4 + n]
    # Fields after the type: RSA n e d iqmp p q; Ed25519 public, seed||public; ECDSA curve,
    # public point, scalar.
    fields = 6 if keytype == b"ssh-rsa" else 2 if keytype == b"ssh-ed25519" else 3
    end = _ssh_string_end(blob, start)
    for _ in range(fields):
        end = _ssh_string_end(blob, end)
    return start, end


def _openssh_blob(key: PrivateKey) -> dict[str, bytes]:
    """The key as ssh-keygen writes it unencrypted (``openssh-key-v1``, no comment), with the
    check integers zeroed: they are random per file, and a Secret is the same each time. Nothing
    for a key OpenSSH has no format for (an EC key on another curve than P-256/384/521)."""
    try:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    except (ValueError, UnsupportedAlgorithm):
        return {}
    blob = bytearray(base64.b64decode(b"".join(pem.splitlines()[1:-1])))
    start, _ = openssh_fields(bytes(blob))
    blob[start - 8 : start] = bytes(8)
    return {"openssh-key": bytes(blob)}


def _mpint(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # a 0 first when the top bit is set
    return struct.pack(">I", len(body)) + body


def secret_from_key(key: PrivateKey, id: str) -> Secret:
    """Every component and whole-key encoding of an RSA, EC or Ed25519 private key: numbers,
    DER, the OpenSSH key (``openssh-key``) and, for RSA, PuTTY's private blob
    (``ppk-private``: mpints d, p, q, iqmp)."""
    pkcs8 = serialization.PrivateFormat.PKCS8
    trad = serialization.PrivateFormat.TraditionalOpenSSL
    if isinstance(key, rsa.RSAPrivateKey):
        nums = key.private_numbers()
        n = nums.public_numbers.n
        full = (n.bit_length() + 7) // 8
        half = (n.bit_length() // 2 + 7) // 8
        comps = {
            "d": _be(nums.d, full),
            "p": _be(nums.p, half),
            "q": _be(nums.q, half),
            "dP": _be(nums.dmp1, half),
            "dQ": _be(nums.dmq1, half),
            "qInv": _be(nums.iqmp, half),
            "pkcs1-der": _der(key, trad),
            "pkcs8-der": _der(key, pkcs8),
            **_openssh_blob(key),
            "ppk-private": b"".join(map(_mpint, (nums.d, nums.p, nums.q, nums.iqmp))),
        }
        kind = "rsa"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        width = (key.curve.key_size + 7) // 8
        comps = {
            "private_value": _be(key.private_numbers().private_value, width),
            "sec1-der": _der(key, trad),
            "pkcs8-der": _der(key, pkcs8),
            **_openssh_blob(key),
        }
        kind = "ec"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        comps = {
            "seed": key.private_bytes_raw(),
            "pkcs8-der": _der(key, pkcs8),
            **_openssh_blob(key),
        }
        kind = "ed25519"
    else:
        raise ScanError(
            f"secret {id!r}: unsupported key type {type(key).__name__}; use RSA, EC or Ed25519"
        )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Secret(id, kind, comps, public_der)


def secret_from_pin(pin: bytes, id: str) -> Secret:
    """A PIN (or passphrase), searched as UTF-8/16/32 text, hex and base64."""
    return _text_secret(pin, id, "pin", f"PIN {id!r}")


def secret_from_raw(data: bytes, id: str) -> Secret:
    """Any other secret bytes (a passphrase, a token): searched like a PIN."""
    return _text_secret(data, id, "raw", f"secret {id!r}")


def _text_secret(value: bytes, id: str, kind: str, what: str) -> Secret:
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes")
    if len(value) < MIN_PATTERN:
        raise ScanError(
            f"{what} is {len(value)} bytes; shorter than {MIN_PATTERN} bytes it matches by chance "
            "all over a dump, so a scan for it proves nothing"
        )
    _check_size(value, what)
    return Secret(id, kind, {kind: value})


def _check_size(value: bytes, what: str) -> None:
    if len(value) > MAX_TEXT_SECRET:
        raise ScanError(
            f"{what} is {len(value)} bytes, more than {MAX_TEXT_SECRET}: is it a key file in a "
            "format the scanner does not read (encrypted, PKCS#12)?"
        )


# --- files ----------------------------------------------------------------------------------

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)


def _b64url_int(value: Any, what: str) -> int:
    if not isinstance(value, str):
        raise ScanError(f"{what} must be a base64url string")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ScanError(f"{what} is not valid base64url") from None
    return int.from_bytes(raw, "big")


def _rsa_sizes(n: int, e: int, where: str, max_bits: int) -> None:
    if n.bit_length() > max_bits:
        raise ScanError(f"{where}: RSA modulus of {n.bit_length()} bits, more than {max_bits}")
    if e.bit_length() > MAX_RSA_EXPONENT_BITS:
        raise ScanError(f"{where}: RSA public exponent wider than {MAX_RSA_EXPONENT_BITS} bits")


def jwk_private_key(
    jwk: dict[str, Any], where: str, max_rsa_bits: int = MAX_RSA_BITS
) -> PrivateKey:
    """A private key from an RFC 7517 JWK (RSA, EC P-256/384/521, OKP Ed25519). An RSA modulus
    above ``max_rsa_bits`` is refused before any arithmetic on it (see MAX_RSA_BITS)."""
    kty = jwk.get("kty")
    if "d" not in jwk:
        raise ScanError(f"{where}: JWK has no private part ('d')")

    def num(name: str) -> int:
        return _b64url_int(jwk.get(name), f"{where}: JWK member {name!r}")

    try:
        if kty == "RSA":
            n, e, d = num("n"), num("e"), num("d")
            _rsa_sizes(n, e, where, max_rsa_bits)
            if "p" in jwk and "q" in jwk:
                p, q = num("p"), num("q")
            else:
                p, q = rsa.rsa_recover_prime_factors(n, e, d)
            pub = rsa.RSAPublicNumbers(e, n)
            return rsa.RSAPrivateNumbers(
                p,
                q,
                d,
                rsa.rsa_crt_dmp1(d, p),
                rsa.rsa_crt_dmq1(d, q),
                rsa.rsa_crt_iqmp(p, q),
                pub,
            ).private_key()
        if kty == "EC":
            curve = _CURVES.get(str(jwk.get("crv")))
            if curve is None:
                raise ScanError(f"{where}: JWK curve {shown(jwk.get('crv'))} is not supported")
            key = ec.derive_private_key(num("d"), curve)
            if "x" in jwk and key.public_key().public_numbers().x != num("x"):
                raise ScanError(f"{where}: JWK 'd' does not match its 'x'")
            return key
        if kty == "OKP" and jwk.get("crv") == "Ed25519":
            d = num("d")
            return ed25519.Ed25519PrivateKey.from_private_bytes(d.to_bytes(32, "big"))
    except (ValueError, ArithmeticError) as exc:
        # ArithmeticError: OverflowError (a value no key has), and any other from the
        # arithmetic on numbers the file chose.
        raise ScanError(f"{where}: JWK is not a valid private key ({exc})") from None
    raise ScanError(f"{where}: JWK key type {shown(kty)} is not supported")


def _jwk_objects(data: bytes) -> list[dict[str, Any]] | None:
    """The JWKs in a JSON file (one key or a JWK Set), or None when it is not one."""
    if data.lstrip()[:1] != b"{":
        return None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        # RecursionError: arrays nested thousands deep (json has no depth limit of its own).
        return None
    if isinstance(obj, dict) and isinstance(obj.get("keys"), list):
        return [k for k in obj["keys"] if isinstance(k, dict)]
    if isinstance(obj, dict) and "kty" in obj:
        return [obj]
    return None


def _pem_private_keys(data: bytes, where: str) -> list[PrivateKey] | None:
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        return None
    keys: list[PrivateKey] = []
    for i, m in enumerate(blocks):
        label = m.group(1)
        if not label.endswith(b"PRIVATE KEY"):
            continue
        try:
            if label == b"OPENSSH PRIVATE KEY":
                key: Any = serialization.load_ssh_private_key(m.group(0), None)
            else:
                key = serialization.load_pem_private_key(m.group(0), None)
        except TypeError:
            raise ScanError(
                f"{where}: PEM block {i} is encrypted; decrypt it first (the scanner must know "
                "the key's bytes)"
            ) from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ScanError(f"{where}: PEM block {i} does not load: {exc}") from None
        keys.append(key)
    if not keys:
        raise ScanError(f"{where}: holds PEM blocks but no private key")
    return keys


def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


@contextlib.contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Inside it, an OSError opening or reading ``path`` is a ScanError naming the file and
    the problem (the scanner's callers see one kind of error for an input it cannot use)."""
    try:
        yield
    except OSError as exc:
        raise ScanError(f"{what} {path}: {exc.strerror or exc}") from exc


def read_key_file(path: Path, what: str = "key file") -> bytes:
    """A secrets or public-key file, at most MAX_KEY_FILE bytes. A FIFO or device is refused
    (opened without blocking: a FIFO with no writer would hold the scan forever)."""
    with reading(path, what), open(_open(path), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ScanError(f"{what} {path} is not a regular file")
        data = f.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise ScanError(f"{what} {path} is larger than {MAX_KEY_FILE} bytes")
    return data


def load_secrets(paths: Iterable[Path | str]) -> list[Secret]:
    """Secrets from files: PEM/DER private keys (PKCS#8, PKCS#1, SEC1, OpenSSH), JWK JSON (a key
    or a JWK Set), a ``*.pin`` file (a PIN) or any other file (a raw secret; one trailing newline
    stripped). The id is the file name, with ``#i`` when a file holds several keys; the path as
    given when two files share a name (``/etc/a/key.pem``, ``/etc/b/key.pem``: neither shadows
    the other, and the scanner's refusal of two secrets under one id is not hit)."""
    out: list[Secret] = []
    given = [Path(p) for p in paths]
    names = Counter(p.name for p in given)
    for path in given:
        name = path.name if names[path.name] == 1 else str(path)
        data = read_key_file(path, "secrets file")
        where = str(path)
        keys: list[PrivateKey] | None = _pem_private_keys(data, where)
        if keys is None:
            jwks = _jwk_objects(data)
            if jwks is not None:
                keys = [jwk_private_key(j, f"{where} key {i}") for i, j in enumerate(jwks)]
        if keys is None and data[:1] == b"\x30":
            try:
                key: Any = serialization.load_der_private_key(data, None)
                keys = [key]
            except TypeError:
                raise ScanError(f"{where}: DER private key is encrypted") from None
            except (ValueError, UnsupportedAlgorithm):
                keys = None
        if keys is not None:
            if not keys:
                raise ScanError(f"{where}: holds no key")
            for i, k in enumerate(keys):
                out.append(secret_from_key(k, name if len(keys) == 1 else f"{name}#{i}"))
            continue
        value = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
        if path.suffix == ".pin":
            out.append(secret_from_pin(value, name))
        else:
            out.append(secret_from_raw(value, name))
    return out


def public_key_id(key: PublicKeyType) -> str:
    """A stable name for a public key: its type and a SHA-256 prefix of its SubjectPublicKeyInfo."""
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if isinstance(key, rsa.RSAPublicKey):
        kind = f"rsa-{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"ec-{key.curve.name}"
    else:
        kind = "ed25519"
    return f"{kind}:{hashlib.sha256(spki).hexdigest()[:16]}"


def _as_public(obj: Any, where: str) -> PublicKeyType:
    if isinstance(obj, x509.Certificate):
        try:
            obj = obj.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ScanError(f"{where}: the certificate's public key does not load: {exc}") from None
    if isinstance(obj, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        obj = obj.public_key()
    if isinstance(obj, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        return obj
    raise ScanError(f"{where}: unsupported key type {type(obj).__name__}")


def _public_keys_in(data: bytes, where: str) -> list[PublicKeyType]:
    found: list[Any] = []
    for m in _PEM_BLOCK.finditer(data):
        label = m.group(1)
        try:
            if label == b"CERTIFICATE":
                found.append(x509.load_pem_x509_certificate(m.group(0)))
            elif label.endswith(b"PUBLIC KEY"):
                found.append(serialization.load_pem_public_key(m.group(0)))
            elif label == b"OPENSSH PRIVATE KEY":
                found.append(serialization.load_ssh_private_key(m.group(0), None))
            elif label.endswith(b"PRIVATE KEY"):
                found.append(serialization.load_pem_private_key(m.group(0), None))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ScanError(f"{where}: PEM block {label.decode()} does not load: {exc}") from None
    if found:
        return [_as_public(k, where) for k in found]
    if data.startswith((b"ssh-", b"ecdsa-sha2-")):
        try:
            return [_as_public(serialization.load_ssh_public_key(data.strip()), where)]
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ScanError(f"{where}: OpenSSH public key does not load: {exc}") from None
    jwks = _jwk_objects(data)
    if jwks is not None:
        return [_jwk_public_key(j, f"{where} key {i}") for i, j in enumerate(jwks)]
    for loader in (
        serialization.load_der_public_key,
        x509.load_der_x509_certificate,
        lambda b: serialization.load_der_private_key(b, None),
    ):
        try:
            return [_as_public(loader(data), where)]
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    raise ScanError(f"{where}: not a public key (PEM, DER, certificate, OpenSSH or JWK)")


def _jwk_public_key(jwk: dict[str, Any], where: str) -> PublicKeyType:
    if "d" in jwk:
        return _as_public(jwk_private_key(jwk, where), where)
    kty = jwk.get("kty")

    def num(name: str) -> int:
        return _b64url_int(jwk.get(name), f"{where}: JWK member {name!r}")

    try:
        if kty == "RSA":
            n, e = num("n"), num("e")
            _rsa_sizes(n, e, where, MAX_RSA_BITS)
            return rsa.RSAPublicNumbers(e, n).public_key()
        if kty == "EC" and str(jwk.get("crv")) in _CURVES:
            return ec.EllipticCurvePublicNumbers(
                num("x"), num("y"), _CURVES[str(jwk["crv"])]
            ).public_key()
        if kty == "OKP" and jwk.get("crv") == "Ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(num("x").to_bytes(32, "big"))
    except (ValueError, OverflowError) as exc:
        # OverflowError: an Ed25519 'x' longer than 32 bytes.
        raise ScanError(f"{where}: JWK is not a valid public key ({exc})") from None
    raise ScanError(f"{where}: JWK key type {shown(kty)} is not supported")


def load_public_keys(paths: Sequence[Path | str]) -> dict[str, PublicKeyType]:
    """Public keys (for blind mode) from PEM/DER public keys, certificates, OpenSSH public keys,
    JWKs, or private keys (their public half). Named by file name, ``#i`` for several."""
    out: dict[str, PublicKeyType] = {}
    for raw_path in paths:
        path = Path(raw_path)
        keys = _public_keys_in(read_key_file(path, "public key file"), str(path))
        for i, k in enumerate(keys):
            out[path.name if len(keys) == 1 else f"{path.name}#{i}"] = k
    return out
