"""Blind mode: private keys found without knowing them, given only public keys.

Structural detectors (compiled into the scanner's one Hyperscan pass, so they cover the whole
dump): PEM private-key blocks (also in UTF-16 strings), DER SEQUENCEs shaped like PKCS#8, PKCS#1
and SEC1 private keys (loaded with cryptography to confirm), OpenSSH ``openssh-key-v1`` blobs
(binary and base64), and JWK objects with a ``"d"`` member. A structure that loads is matched
against the public keys.

Mathematical checks, within a time budget: windows of the dump's memory read as an RSA prime
(does it divide N?), an EC scalar (is d*G == Q?) or an Ed25519 seed (does it give the public
key?), big-endian at every offset and little-endian in 64-bit limbs at 8-aligned addresses
(an OpenSSL BIGNUM). One check per kind of key, size and layout serves all the public keys of
that kind and size. numpy pre-filters windows cheaply (range of the top byte, parity, few zero
bytes, enough high bytes, few repeated bytes: random key material has them, pointers, text,
tables, fill patterns and zero pages do not; RSA primes also have no odd prime factor up to 47);
only survivors are verified (EC scalars through libcrypto when it loads, see _ec_verifier).
Each check reports how much of the memory it covered.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import ctypes
import ctypes.util
import functools
import io
import json
import os
import pickle
import re
import select
import signal
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NoReturn

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signer._internal.children import die_with_parent, never_dump
from signer.errors import ScanError, SignerError
from signer.keys import PublicKeyType
from signer.scan._result import BlindCheck, Finding
from signer.scan._secrets import jwk_private_key, public_key_id

# (kind, expression, longest match). Expressions are bytes regexes in Hyperscan syntax.
STRUCTURAL: tuple[tuple[str, bytes, int], ...] = (
    (
        "pem",
        rb"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----\r?\n(?:[A-Za-z0-9+/]{40}|Proc-Type:)",
        128,
    ),
    # The same in a string of two-byte characters (.NET, Java char[] and non-compact strings):
    # UTF-16LE; UTF-16BE text matches it one byte on (see _patterns._wide).
    (
        "pem-utf16",
        rb"(?:-\x00){5}B\x00E\x00G\x00I\x00N\x00 \x00(?:[A-Z0-9 ]\x00){0,40}"
        rb"P\x00R\x00I\x00V\x00A\x00T\x00E\x00 \x00K\x00E\x00Y\x00(?:-\x00){5}(?:\r\x00)?\n\x00"
        rb"(?:(?:[A-Za-z0-9+/]\x00){40}|P\x00r\x00o\x00c\x00-\x00T\x00y\x00p\x00e\x00:\x00)",
        256,
    ),
    ("openssh-bin", rb"openssh-key-v1\x00", 15),
    ("openssh-b64", rb"b3BlbnNzaC1rZXktdjE", 19),
    (
        "der-pkcs8",
        rb"\x30(?:[\x00-\x7f]|\x81[\x80-\xff]|\x82[\x01-\xff][\x00-\xff])"
        rb"\x02\x01[\x00\x01]\x30[\x00-\x7f]\x06",
        11,
    ),
    (
        "der-pkcs1",
        rb"\x30(?:\x81[\x80-\xff]|\x82[\x01-\xff][\x00-\xff])\x02\x01\x00"
        rb"\x02(?:\x81[\x80-\xff]|\x82[\x01-\xff][\x00-\xff])",
        12,
    ),
    ("der-sec1", rb"\x30(?:[\x00-\x7f]|\x81[\x80-\xff])\x02\x01\x01\x04[\x18-\x42]", 9),
    ("jwk", rb'"d"[\t\n\r ]{0,8}:[\t\n\r ]{0,8}"[A-Za-z0-9_-]{20}', 40),
)

_REPRESENTATION = {
    "pem": "pem-private-key",
    "pem-utf16": "utf16-pem-private-key",
    "openssh-bin": "openssh-private",
    "openssh-b64": "openssh-private",
    "der-pkcs8": "der-pkcs8",
    "der-pkcs1": "der-pkcs1",
    "der-sec1": "der-sec1",
    "jwk": "jwk-private",
}

UNKNOWN = "unknown"  # the owner of a private-key structure that could not be loaded
_MAX_BLOB = 1 << 16  # no key encoding we look for is larger
CONTEXT_BEFORE = 8192
"""Bytes before a structural match that :func:`structural_findings` reads (a JWK member's
object begins up to this far back)."""
CONTEXT_AFTER = 2 * _MAX_BLOB
"""Bytes from a structural match on that it reads (a base64 OpenSSH blob, the longest)."""
_BLOCK = 1 << 20  # math checks read memory in blocks of this size
_MAX_DUMP_RSA_BITS = 8192
"""A JWK in a dump with a larger modulus is reported, not loaded: recovering its p and q from
n, e and d costs seconds of modular exponentiation per candidate (1 s at 8192 bits, 8 s at
16384), and a shaped dump can hold thousands. The service's keys are at most 4096 bits."""


class PublicKeys:
    """The public keys of blind mode, by id and by SubjectPublicKeyInfo."""

    def __init__(self, keys: Mapping[str, PublicKeyType] | Sequence[PublicKeyType]) -> None:
        named = dict(keys) if isinstance(keys, Mapping) else {public_key_id(k): k for k in keys}
        for name, k in named.items():
            if not isinstance(
                k, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
            ):
                raise ScanError(
                    f"public key {name!r}: unsupported type {type(k).__name__}; "
                    "use RSA, EC or Ed25519"
                )
        self.keys = named
        self._by_spki = {_spki(k): name for name, k in named.items()}

    def identify(self, key: Any) -> tuple[str, str]:
        """(secret id, detail) for a private key found in the dump."""
        pub = key.public_key()
        spki = _spki(pub)
        name = self._by_spki.get(spki)
        kind = type(pub).__name__.removeprefix("_").replace("PublicKey", "")
        if name is not None:
            return name, f"verified: private key of public key {name}"
        return (
            f"unknown:{public_key_id(pub)}",
            f"loads as a {kind} private key that matches none of the given public keys",
        )


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


# --- structural -----------------------------------------------------------------------------

_Loaded = tuple[int, int, Any, str]  # start, end, key or None, detail when no key


def _der_extent(buf: memoryview, at: int) -> int | None:
    if at + 2 > len(buf) or buf[at] != 0x30:
        return None
    b = buf[at + 1]
    if b < 0x80:
        total = 2 + b
    elif b == 0x81 and at + 3 <= len(buf):
        total = 3 + buf[at + 2]
    elif b == 0x82 and at + 4 <= len(buf):
        total = 4 + (buf[at + 2] << 8 | buf[at + 3])
    else:
        return None
    return total if at + total <= len(buf) else None


def _load_der(buf: memoryview, at: int) -> _Loaded | None:
    total = _der_extent(buf, at)
    if total is None:
        return None
    try:
        key = serialization.load_der_private_key(bytes(buf[at : at + total]), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return at, at + total, key, ""


_PEM_END = re.compile(rb"-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----")
_PEM_BODY = re.compile(rb"-----BEGIN [^\n]*\n(?:[A-Za-z0-9+/=]+\r?\n|[A-Za-z-]+:[^\n]*\n)*")


def _load_pem(buf: memoryview, at: int, wide: bool = False) -> _Loaded:
    """A PEM private-key block at ``at``; ``wide``: in UTF-16 (two bytes a character, read as
    their ASCII characters; any other character ends the block)."""
    if wide:
        raw = bytes(buf[at : at + 2 * _MAX_BLOB])
        text = raw[: len(raw) // 2 * 2].decode("utf-16-le", "replace").encode("ascii", "replace")
    else:
        text = bytes(buf[at : at + _MAX_BLOB])
    unit = 2 if wide else 1
    end = _PEM_END.search(text)
    if end is None:
        m = _PEM_BODY.match(text)
        stop = m.end() if m else text.index(b"\n") + 1
        return at, at + unit * stop, None, "PEM private-key block without an END line"
    block = text[: end.end()]
    stop = at + unit * end.end()
    try:
        if b"OPENSSH" in block[:40]:
            key: Any = serialization.load_ssh_private_key(block, None)
        else:
            key = serialization.load_pem_private_key(block, None)
    except TypeError:
        return at, stop, None, "encrypted PEM private key (not verified)"
    except (ValueError, UnsupportedAlgorithm):
        return at, stop, None, "PEM private-key block that does not parse"
    return at, stop, key, ""


def _ssh_string(blob: bytes, at: int, limit: int) -> tuple[bytes, int]:
    if at + 4 > len(blob):
        raise ValueError("truncated")
    (n,) = struct.unpack_from(">I", blob, at)
    if n > limit or at + 4 + n > len(blob):
        raise ValueError("bad length")
    return blob[at + 4 : at + 4 + n], at + 4 + n


def _openssh_blob(blob: bytes) -> tuple[int, bytes] | None:
    """(length, cipher name) of an ``openssh-key-v1`` structure at the start of ``blob``."""
    try:
        at = 15
        cipher, at = _ssh_string(blob, at, 64)
        _kdf, at = _ssh_string(blob, at, 64)
        _kdfopts, at = _ssh_string(blob, at, 1024)
        if not cipher.isascii() or not cipher:
            return None
        (nkeys,) = struct.unpack_from(">I", blob, at)
        at += 4
        if not 1 <= nkeys <= 16:
            return None
        for _ in range(nkeys):
            _pub, at = _ssh_string(blob, at, 16384)
        _priv, at = _ssh_string(blob, at, _MAX_BLOB)
    except (ValueError, struct.error):
        return None
    return at, cipher


def _load_openssh(blob: bytes, at: int, extent: int | None) -> _Loaded | None:
    parsed = _openssh_blob(blob)
    if parsed is None:
        return None
    length, cipher = parsed
    end = at + (length if extent is None else extent)
    if cipher != b"none":
        return at, end, None, f"encrypted OpenSSH private key ({cipher.decode()}, not verified)"
    pem = (
        b"-----BEGIN OPENSSH PRIVATE KEY-----\n"
        + base64.encodebytes(blob[:length])
        + b"-----END OPENSSH PRIVATE KEY-----\n"
    )
    try:
        key = serialization.load_ssh_private_key(pem, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return at, end, None, "openssh-key-v1 structure that does not load"
    return at, end, key, ""


_B64_RUN = re.compile(rb"[A-Za-z0-9+/=\r\n]+")


def _load_openssh_b64(buf: memoryview, at: int) -> _Loaded | None:
    m = _B64_RUN.match(bytes(buf[at : at + 2 * _MAX_BLOB]))
    if m is None:
        return None
    text = m.group(0)
    compact = text.replace(b"\n", b"").replace(b"\r", b"").split(b"=")[0]
    compact = compact[: len(compact) // 4 * 4]
    try:
        blob = base64.b64decode(compact)
    except binascii.Error:
        return None
    return _load_openssh(blob, at, len(text.rstrip(b"\r\n")))


def _load_jwk(buf: memoryview, at: int) -> _Loaded | None:
    lo = max(0, at - 8192)
    text = bytes(buf[lo : at + 8192]).decode("latin-1")
    rel = at - lo
    decoder = json.JSONDecoder()
    brace = rel
    for _ in range(64):
        brace = text.rfind("{", 0, brace)
        if brace < 0:
            break
        try:
            obj, end = decoder.raw_decode(text, brace)
        except (ValueError, RecursionError):
            # RecursionError: arrays nested thousands deep, which a shaped dump can hold.
            continue
        if end > rel and isinstance(obj, dict) and "d" in obj and "kty" in obj:
            try:
                key = jwk_private_key(obj, "JWK in dump", max_rsa_bits=_MAX_DUMP_RSA_BITS)
            except ScanError as exc:
                return lo + brace, lo + end, None, f"JWK private key that does not load: {exc}"
            return lo + brace, lo + end, key, ""
    # Not parseable (cut short, overwritten): still a private JWK member if its own object,
    # from the last '{' before it, names a key type.
    start = text.rfind("{", 0, rel)
    if start < 0 or "}" in text[start:rel] or '"kty"' not in text[start : rel + 512]:
        return None
    member = re.compile(r'"d"\s*:\s*"[A-Za-z0-9_-]*"?').match(text, rel)
    stop = member.end() if member else rel + 3
    return at, lo + stop, None, 'unparseable JSON object with "kty" and a "d" member'


def structural_findings(
    buf: memoryview, hits: Sequence[tuple[str, int]], keys: PublicKeys, deadline: float
) -> tuple[list[Finding], int]:
    """Confirms structural matches (kind, offset) and turns them into findings; and how many
    were examined. Each costs up to a key load; a dump crowded with decoys (4 million PEM
    headers, JWK members in deep JSON) must not hold the scan: none is begun after
    ``deadline`` (time.monotonic())."""
    out: list[Finding] = []
    for examined, (kind, at) in enumerate(hits):
        if time.monotonic() >= deadline:
            return out, examined
        loaded: _Loaded | None
        if kind == "pem":
            loaded = _load_pem(buf, at)
        elif kind == "pem-utf16":
            loaded = _load_pem(buf, at, wide=True)
        elif kind == "openssh-bin":
            loaded = _load_openssh(bytes(buf[at : at + _MAX_BLOB]), at, None)
        elif kind == "openssh-b64":
            loaded = _load_openssh_b64(buf, at)
        elif kind == "jwk":
            loaded = _load_jwk(buf, at)
        else:
            loaded = _load_der(buf, at)
        if loaded is None:
            continue
        start, end, key, detail = loaded
        representation = _REPRESENTATION[kind]
        if kind == "pem" and b"OPENSSH" in bytes(buf[start : start + 40]):
            representation = "openssh-private"
        elif kind == "pem-utf16" and "OPENSSH" in bytes(buf[start : start + 80]).decode(
            "utf-16-le", "replace"
        ):
            representation = "utf16-openssh-private"
        owner, detail = keys.identify(key) if key is not None else (UNKNOWN, detail)
        out.append(Finding(owner, "private-key", representation, start, end - start, detail=detail))
    return out, len(hits)


# --- mathematical checks --------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """Contiguous process memory: file offset, length, virtual address (file offset if none)."""

    offset: int
    length: int
    address: int


@dataclass(frozen=True)
class _Target:
    key_id: str  # the keys it can find, joined by ","
    component: str
    representation: str
    length: int
    top_min: int  # bounds of the most significant byte
    top_max: int
    odd: bool  # an odd prime: also no small odd prime factor (see _sieve)
    verify: Callable[[int], str | None]  # the window as an integer -> the key it belongs to
    what: str  # for the detail, with {key}: "divides N of public key {key}"


Offsets = Literal["every", "likely"]
"""Where the big-endian checks look: at ``every`` byte offset, or at the ``likely`` ones only:
8-aligned addresses (where every allocator, language runtime and stack frame puts a buffer)
and offsets framed by a length or pad byte (where serialisations put a key: see
:func:`_framed`). Little-endian limbs are always looked for at 8-aligned addresses only."""
OFFSETS: tuple[Offsets, ...] = ("every", "likely")


@dataclass(frozen=True)
class _Check:
    name: str
    target: _Target
    little: bool  # little-endian 64-bit limbs at 8-aligned addresses; else big-endian
    likely: bool = False  # big-endian at the likely offsets only (see Offsets); else at every one


def _rsa_verifier(moduli: Mapping[str, int]) -> Callable[[int], str | None]:
    """A division per key: one Python division of N by the 1024-bit candidate costs about 3 us,
    less than a division of the product of all the N (its cost grows with the product)."""
    pairs = list(moduli.items())

    def verify(c: int) -> str | None:
        if c <= 1:
            return None
        for name, n in pairs:
            if c < n and n % c == 0:
                return name
        return None

    return verify


def _ec_verifier(
    keys: Mapping[str, ec.EllipticCurvePublicKey], fast: bool = True
) -> Callable[[int], str | None]:
    """One scalar multiplication per candidate, checked against every key on the curve.

    The multiplication goes through libcrypto's EC_POINT_mul by ctypes when it is there and
    agrees with cryptography (:func:`_libcrypto_multiplier`): about 13 us a P-256 candidate
    against 41 us through ``ec.derive_private_key`` (most of which is building key objects).
    A match is confirmed through cryptography, which also refuses 0 and d >= the order."""
    curve = next(iter(keys.values())).curve
    x962, uncompressed = serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    points = {key.public_bytes(x962, uncompressed): name for name, key in keys.items()}

    def slow(d: int) -> str | None:
        try:  # refuses 0 and d >= the group order
            derived = ec.derive_private_key(d, curve)
        except ValueError:
            return None
        return points.get(derived.public_key().public_bytes(x962, uncompressed))

    multiply = _libcrypto_multiplier(curve.name) if fast else None
    if multiply is None:
        return slow
    width = (curve.key_size + 7) // 8
    mul = multiply

    def verify(d: int) -> str | None:
        if d.bit_length() > 8 * width or mul(d.to_bytes(width, "big")) not in points:
            return None
        return slow(d)

    return verify


_NIDS = {"secp256r1": 415, "secp384r1": 715, "secp521r1": 716, "secp256k1": 714}
"""OpenSSL's NIDs of the curves (stable: part of its ABI, obj_mac.h)."""
_CURVE_OIDS = {
    "secp256r1": ec.EllipticCurveOID.SECP256R1,
    "secp384r1": ec.EllipticCurveOID.SECP384R1,
    "secp521r1": ec.EllipticCurveOID.SECP521R1,
    "secp256k1": ec.EllipticCurveOID.SECP256K1,
}


class _EcState:
    """One thread's libcrypto objects for a curve: a BN_CTX, a point or a BIGNUM must not be
    shared between threads."""

    def __init__(self, lib: Any, nid: int, width: int) -> None:
        self.group = lib.EC_GROUP_new_by_curve_name(nid)
        self.point = lib.EC_POINT_new(self.group) if self.group else None
        self.bn, self.bnctx = lib.BN_new(), lib.BN_CTX_new()
        self.out = ctypes.create_string_buffer(1 + 2 * width)
        self.ok = bool(self.group and self.point and self.bn and self.bnctx)
        weakref.finalize(self, _EcState._free, lib, self.group, self.point, self.bn, self.bnctx)

    @staticmethod
    def _free(
        lib: Any, group: int | None, point: int | None, bn: int | None, bnctx: int | None
    ) -> None:
        lib.EC_POINT_free(point)  # each accepts NULL
        lib.BN_free(bn)
        lib.BN_CTX_free(bnctx)
        lib.EC_GROUP_free(group)


def _load_libcrypto() -> Any:
    """OpenSSL 3's libcrypto by its soname first: ``find_library`` runs ``ldconfig -p`` (a
    child process, in the dump gate too, which the kernel runs with a bare environment)."""
    try:
        return ctypes.CDLL("libcrypto.so.3")
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so")


@functools.cache
def _libcrypto_multiplier(curve_name: str) -> Callable[[bytes], bytes] | None:
    """d (big-endian, the curve's width) -> d*G, X9.62 uncompressed, through the system's
    libcrypto (OpenSSL 3, which the interpreter's ssl module loads too); None when it cannot be
    loaded or when it does not agree with cryptography on a random scalar. Made once a
    process, for every scan; safe to call from several threads (each gets its own libcrypto
    objects)."""
    nid = _NIDS.get(curve_name)
    if nid is None:
        return None
    curve = ec.get_curve_for_oid(_CURVE_OIDS[curve_name])()
    try:
        lib = _load_libcrypto()
        vp, size = ctypes.c_void_p, ctypes.c_size_t
        for fn, res, args in (
            ("EC_GROUP_new_by_curve_name", vp, [ctypes.c_int]),
            ("EC_GROUP_free", None, [vp]),
            ("EC_POINT_new", vp, [vp]),
            ("EC_POINT_free", None, [vp]),
            ("BN_new", vp, []),
            ("BN_free", None, [vp]),
            ("BN_CTX_new", vp, []),
            ("BN_CTX_free", None, [vp]),
            ("BN_bin2bn", vp, [ctypes.c_char_p, ctypes.c_int, vp]),
            ("EC_POINT_mul", ctypes.c_int, [vp, vp, vp, vp, vp, vp]),
            ("EC_POINT_point2oct", size, [vp, vp, ctypes.c_int, ctypes.c_char_p, size, vp]),
        ):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
    except (OSError, AttributeError):
        return None
    width = (curve.key_size + 7) // 8
    bin2bn, mul, point2oct = lib.BN_bin2bn, lib.EC_POINT_mul, lib.EC_POINT_point2oct
    local = threading.local()

    def multiply(d: bytes) -> bytes:
        st: _EcState | None = getattr(local, "state", None)
        if st is None:
            st = local.state = _EcState(lib, nid, width)
        if not st.ok:
            raise ScanError("libcrypto could not allocate an EC point")
        bin2bn(d, len(d), st.bn)
        if mul(st.group, st.point, st.bn, None, None, st.bnctx) != 1:
            return b""
        n = point2oct(st.group, st.point, 4, st.out, len(st.out), st.bnctx)  # 4: uncompressed
        return st.out.raw[:n]

    probe = ec.generate_private_key(curve)
    d = probe.private_numbers().private_value.to_bytes(width, "big")
    expected = probe.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    try:
        return multiply if multiply(d) == expected else None
    except ScanError:
        return None


def _ed25519_verifier(keys: Mapping[str, ed25519.Ed25519PublicKey]) -> Callable[[int], str | None]:
    """One derivation per candidate, looked up among every Ed25519 public key."""
    raws = {key.public_bytes_raw(): name for name, key in keys.items()}

    def verify(seed: int) -> str | None:
        priv = ed25519.Ed25519PrivateKey.from_private_bytes(seed.to_bytes(32, "big"))
        return raws.get(priv.public_key().public_bytes_raw())

    return verify


def _targets(keys: PublicKeys) -> list[_Target]:
    """One target per kind of secret and size, whatever the number of keys: the keys of one
    size share the pre-filter pass over memory, and each survivor is verified against all of
    them (RSA: a division per N; EC: one scalar multiplication, then a lookup of the point;
    Ed25519: one derivation, then a lookup)."""
    out: list[_Target] = []
    rsa_by_len: dict[int, dict[str, int]] = {}
    tops: dict[int, int] = {}
    by_curve: dict[str, dict[str, ec.EllipticCurvePublicKey]] = {}
    eds: dict[str, ed25519.Ed25519PublicKey] = {}
    for name, key in keys.keys.items():
        if isinstance(key, rsa.RSAPublicKey):
            n = key.public_numbers().n
            plen = (n.bit_length() // 2 + 7) // 8
            # Both primes have at most 8*plen bits, so p > N / 2^(8*plen): a lower bound on its
            # top byte (one less, for rounding). Keys of one length share the lowest bound.
            top = (n >> (8 * plen)) >> (8 * (plen - 1))
            rsa_by_len.setdefault(plen, {})[name] = n
            tops[plen] = min(tops.get(plen, 255), max(0, top - 1))
        elif isinstance(key, ec.EllipticCurvePublicKey):
            by_curve.setdefault(key.curve.name, {})[name] = key
        else:
            eds[name] = key
    for plen, moduli in rsa_by_len.items():
        out.append(
            _Target(
                key_id=",".join(moduli),
                component="factor",
                representation="verified-rsa-factor",
                length=plen,
                top_min=tops[plen],
                top_max=255,
                odd=True,
                verify=_rsa_verifier(moduli),
                what="divides N of public key {key}",
            )
        )
    if eds:
        out.append(
            _Target(
                key_id=",".join(eds),
                component="seed",
                representation="verified-ed25519-seed",
                length=32,
                top_min=0,
                top_max=255,
                odd=False,
                verify=_ed25519_verifier(eds),
                what="derives public key {key}",
            )
        )
    for group in by_curve.values():
        curve = next(iter(group.values())).curve
        width = (curve.key_size + 7) // 8
        top = (1 << (curve.key_size - 8 * (width - 1))) - 1  # d < 2^key_size
        out.append(
            _Target(
                key_id=",".join(group),
                component="private_value",
                representation="verified-ec-scalar",
                length=width,
                top_min=0,
                top_max=top,
                odd=False,
                verify=_ec_verifier(group),
                what="d*G == Q of public key {key}",
            )
        )
    return out


def _checks(keys: PublicKeys, offsets: Offsets = "every") -> list[_Check]:
    """Cheapest first: 8-aligned limbs, then big-endian (RSA division before EC multiplies)."""
    if offsets not in OFFSETS:
        raise ScanError(f"blind offsets must be one of {', '.join(OFFSETS)}, not {offsets!r}")
    targets = _targets(keys)
    aligned = [
        _Check(f"{t.representation.removeprefix('verified-')}-le64-aligned", t, True)
        for t in targets
        if t.component != "seed"
    ]
    # RSA keeps every offset: its candidates are few (a prime's top byte and the small-prime
    # sieve drop nearly all windows) and the lengths that frame a prime vary more.
    big = [
        _Check(f"{t.representation.removeprefix('verified-')}{suffix}", t, False, likely)
        for t in targets
        for likely in [offsets == "likely" and t.component != "factor"]
        for suffix in ["-be-aligned-or-framed" if likely else "-be"]
    ]
    big.sort(key=lambda c: c.target.component != "factor")
    return aligned + big


MISS = 1e-8
"""The repeated-bytes filter is cut where a binomial tail falls below this. Repeats at the
eight distances are not independent (a run of one byte repeats at several), so the rate
measured on random windows is higher, below 1e-6 (``tests/unit/scan/test_blind_filters.py``);
the older zero-byte cut drops about 5e-6 of them."""

_LAGS = (1, 2, 3, 4, 5, 6, 7, 8)
"""Byte repeats counted at these distances: random bytes repeat with probability 1/256 at any
distance; fill patterns (0xa5 of a freed malloc chunk, 0xff runs), arrays of small records,
tables and text repeat far more often."""

_SIEVE = (3 * 5 * 7 * 11 * 13 * 17 * 19 * 23, 29 * 31 * 37 * 41 * 43 * 47)
"""Products of the odd primes an RSA prime candidate must not be divisible by (about 72% of
odd windows are). Each is below 2^32, so a window's residue sum stays below 2^63 in int64."""


def _binomial_cut(trials: int, p: float, miss: float = MISS) -> int:
    """The smallest t with P(X > t) < ``miss`` for X ~ Binomial(trials, p)."""
    term = (1 - p) ** trials  # P(X = 0)
    cdf, k = term, 0
    while 1 - cdf >= miss and k < trials:
        term *= (trials - k) / (k + 1) * p / (1 - p)
        k += 1
        cdf += term
    return k


_REPEATS: dict[int, int] = {}


def _max_repeats(L: int) -> int:
    """Most byte repeats (at the distances of ``_LAGS``, both bytes in the window) a random
    window of ``L`` bytes shows but with probability below ``MISS``."""
    if L not in _REPEATS:
        _REPEATS[L] = _binomial_cut(len(_LAGS) * max(0, L - _LAGS[-1]), 1 / 256)
    return _REPEATS[L]


_WEIGHTS: dict[tuple[int, bool], np.ndarray[Any, Any]] = {}


_RESIZED: dict[tuple[int, bool], np.ndarray[Any, Any]] = {}


def _weights(m: int, little: bool, n: int) -> np.ndarray[Any, Any]:
    """256^j (little-endian) or 256^-j (big-endian) mod ``m`` for j < n, int64: periodic, with
    the period of 256 mod m (495 and 7,245 for the two products of ``_SIEVE``). The last length
    asked for is kept: nearly every block has the same."""
    key = (m, little)
    if key not in _WEIGHTS:
        base = 256 if little else pow(256, -1, m)
        period, x = [1], base
        while x != 1:
            period.append(x)
            x = x * base % m
        _WEIGHTS[key] = np.array(period, dtype=np.int64)
    resized = _RESIZED.get(key)
    if resized is None or len(resized) != n:
        resized = _RESIZED[key] = np.resize(_WEIGHTS[key], n)
        resized.flags.writeable = False
    return resized


def _sieve(a: np.ndarray[Any, Any], idx: np.ndarray[Any, Any], L: int, little: bool) -> Any:
    """The windows of ``idx`` whose value has none of the primes of ``_SIEVE`` as a factor.

    With w_j = 256^-j mod m, the sum of a[j]*w_j over a big-endian window's bytes is its value
    times a power of 256, a unit mod m (m is odd): both are divisible by the same primes of m.
    The sums come from one prefix sum over the block, in exact int64 arithmetic."""
    for m in _SIEVE:
        if not len(idx):
            break
        prefix = np.concatenate(([0], np.cumsum(a * _weights(m, little, len(a)))))
        idx = idx[np.gcd((prefix[idx + L] - prefix[idx]) % m, m) == 1]
    return idx


def _prefix(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.concatenate(([0], np.cumsum(x, dtype=np.int32)))


def _candidates(
    a: np.ndarray[Any, Any], idx: np.ndarray[Any, Any], t: _Target, little: bool
) -> Any:
    """The window starts in ``idx`` whose bytes could be the target's secret: point tests
    first (the top byte's range, parity), then counts over each window from prefix sums (few
    zero bytes, enough high bytes, few repeated bytes), then the small-prime sieve for RSA."""
    L = t.length
    if t.top_min > 0 or t.top_max < 255:
        top = a[idx + (L - 1 if little else 0)]
        idx = idx[(top >= t.top_min) & (top <= t.top_max)]
    if t.odd:
        idx = idx[(a[idx + (0 if little else L - 1)] & 1).astype(bool)]
    if not len(idx):
        return idx
    zeros = _prefix(a == 0)
    idx = idx[(zeros[idx + L] - zeros[idx]) <= 2 + L // 32]
    highs = _prefix(a >= 0x80)
    idx = idx[(highs[idx + L] - highs[idx]) >= L // 8]
    if not len(idx):
        return idx
    # Repeats: r[j] counts the lags k with a[j] == a[j-k]; summed over j >= start + 8, every
    # pair counted lies inside the window. Lags 1 to 8 catch records of any width up to 8
    # (1.6 times fewer EC candidates on the bench's core than lags 1, 2, 4 and 8 alone).
    r = np.zeros(len(a), dtype=np.int8)
    for k in _LAGS:
        r[k:] += a[k:] == a[:-k]
    repeats = _prefix(r)
    first = min(_LAGS[-1], L)
    idx = idx[(repeats[idx + L] - repeats[idx + first]) <= _max_repeats(L)]
    if t.odd:
        idx = _sieve(a, idx, L, little)
    return idx


def _framed(a: np.ndarray[Any, Any], idx: np.ndarray[Any, Any], L: int, address: int) -> Any:
    """The window starts of ``idx`` (of a block at virtual ``address``) at an 8-aligned address
    or right after the bytes that frame an ``L``-byte number (EC scalars and Ed25519 seeds: 32
    to 66 bytes): its length (DER's short form, protobuf, CBOR, MessagePack, Java's and SSH's
    32-bit lengths), twice its length (an Ed25519 seed followed by its public key, as OpenSSH
    and libsodium keep them), a zero pad after a length one larger (a DER or SSH integer whose
    top bit is set: ``02 21 00``, ``00 00 00 21 00``), or a zero pad at an 8-aligned address
    (Java's ``BigInteger.toByteArray()``, an aligned array that starts with its sign byte). A
    random byte frames with probability about 2/256, so about 1 in 128 unaligned windows is
    kept. Windows whose framing bytes fall before the block are kept."""
    lo, twice, padded = L & 0xFF, (2 * L) & 0xFF, (L + 1) & 0xFF
    # A mask over the block's window starts, from byte comparisons (no index arithmetic).
    n = len(a)
    keep = np.zeros(n, dtype=bool)
    keep[-address % 8 :: 8] = True
    keep[:2] = True
    p1, p2 = a[1 : n - 1], a[: n - 2]
    keep[2:] |= (p1 == lo) | (p1 == twice) | ((p1 == 0) & (p2 == padded))
    after_pad = (1 - address) % 8 or 8  # windows at addresses 1 mod 8, their byte before
    keep[after_pad::8] |= a[after_pad - 1 : n - 1 : 8] == 0
    return idx[keep[idx]]


def _blocks(regions: Sequence[Region], L: int) -> Iterator[tuple[Region, int, int]]:
    """(region, block start, own length): windows start in [start, start+own)."""
    for r in regions:
        last = r.length - L  # last window start in the region
        pos = 0
        while pos <= last:
            own = min(_BLOCK, last - pos + 1)
            yield r, pos, own
            pos += own


class Holes:
    """Where a sparse file has data (sorted, disjoint ``(start, end)`` file ranges): a block
    outside all of them is a hole, all zero, tested without being read."""

    def __init__(self, data: Sequence[tuple[int, int]]) -> None:
        self._data = list(data)
        self._starts = [a for a, _ in self._data]

    def data_bytes(self) -> int:
        """Bytes of the file that hold data."""
        return sum(end - start for start, end in self._data)

    def empty(self, start: int, end: int) -> bool:
        """Whether [start, end) holds no data."""
        i = bisect.bisect_left(self._starts, end) - 1  # the last extent starting before end
        return i < 0 or self._data[i][1] <= start


MAX_WORKERS = 64
"""The most processes a scan's math checks may be asked to use (a mistyped setting must not
fork thousands of root processes beside a crashed service)."""


def default_workers() -> int:
    """Processes the math checks of one file scan use by default: the CPUs this process may run
    on, at most 4 (a dump gate shares the host with what crashed)."""
    return max(1, min(4, _cpus()))


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


_MIN_BLOCKS_PER_WORKER = 4
"""A worker is forked only for at least this many blocks of data (4 MiB): below, the fork and
the pipe cost more than the share of work they take."""
_WORKER_GRACE = 10.0
"""Seconds past the deadline a worker has at most to report before it is killed (its share then
counts as not covered); a tenth of the budget when that is less, at least 1 s."""


@dataclass(frozen=True)
class Checked:
    """What the math checks found, how far each got, in how many processes, and why a share
    is missing (a worker that died, failed to report or was killed at the deadline)."""

    findings: list[Finding]
    reports: list[BlindCheck]
    workers: int
    lost: list[str]


def run_checks(
    buf: memoryview,
    regions: Sequence[Region],
    keys: PublicKeys,
    budget: float,
    holes: Holes | None = None,
    offsets: Offsets = "every",
    workers: int = 1,
) -> Checked:
    """Every check over every region, each given an equal share of what is left of ``budget``.

    With ``workers`` > 1 and enough data, the memory's blocks are dealt out in turn to that many
    processes (at most the CPUs; this one and children forked here, which see the same
    mapping): each runs every check over its blocks, in the same order, against the same
    deadline. A check is complete when every share of it is; a share whose process died, failed
    to report or was killed counts as not covered, and ``lost`` says why."""
    checks = _checks(keys, offsets)
    total = sum(r.length for r in regions)
    deadline = time.monotonic() + budget
    data = total if holes is None else holes.data_bytes()
    n = max(1, min(workers, _cpus(), data // (_MIN_BLOCKS_PER_WORKER * _BLOCK)))
    if threading.active_count() > 1:
        # A fork copies only this thread: a lock another Python thread holds (logging's, a
        # pool's) would stay held in the child for ever. The dump gate's scan child and
        # `signer scan` scan in one thread. (numpy's BLAS pool, native threads this does not
        # count, takes no part in these checks and has its own fork handlers.)
        n = 1
    lost: list[str] = []
    work = _Work(buf, regions, checks, deadline, holes)
    if n == 1:
        findings, shares = _run_share(work, 0, 1)
        per = [shares]
    else:
        grace = max(1.0, min(_WORKER_GRACE, budget / 10))
        findings, per, lost = _in_processes(work, grace, n)
    reports = []
    for i, check in enumerate(checks):
        parts = [share[i] for share in per]
        done = len(per) == n and all(p.done for p in parts)
        reports.append(
            BlindCheck(
                check.name,
                check.target.key_id,
                total,
                total if done else min(total, sum(p.covered for p in parts)),
                sum(p.tested for p in parts),
                max(p.seconds for p in parts),
            )
        )
    return Checked(findings, reports, n, lost)


@dataclass(frozen=True)
class _Work:
    """What every process of one scan's math checks works on (a child gets it by the fork)."""

    buf: memoryview
    regions: Sequence[Region]
    checks: Sequence[_Check]
    deadline: float
    holes: Holes | None


@dataclass(frozen=True)
class _Share:
    """One process's part of one check: bytes of its blocks covered, whether it did them all,
    candidates verified, seconds."""

    covered: int
    done: bool
    tested: int
    seconds: float


def _run_share(work: _Work, k: int, n: int) -> tuple[list[Finding], list[_Share]]:
    """Every check over blocks k, k+n, k+2n, ... of memory, each check given an equal share of
    the time left to the deadline."""
    findings: list[Finding] = []
    out: list[_Share] = []
    checks = work.checks
    for i, check in enumerate(checks):
        began = time.monotonic()
        stop = began + max(0.0, work.deadline - began) / (len(checks) - i)
        covered, done, tested = _run_check(
            work.buf, work.regions, check, stop, findings, work.holes, k, n
        )
        out.append(_Share(covered, done, tested, time.monotonic() - began))
    return findings, out


_STOPPING = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _in_processes(
    work: _Work, grace: float, n: int
) -> tuple[list[Finding], list[list[_Share]], list[str]]:
    """Shares 1 to n-1 in forked children, share 0 here. A child dumps no core (it holds the
    dump's memory), dies with this process, and sends its result by a pipe as a pickle that
    only findings and shares may be unpickled from. Whatever happens here, every child is
    killed and reaped before this returns or raises."""
    children: list[tuple[int, int]] = []
    parent = os.getpid()
    try:
        for k in range(1, n):
            # Signals that stop a scan are held across the fork, so that neither process is
            # interrupted between the fork and the child's own handling or its registration.
            # (pthread_sigmask runs pending Python handlers: the first call blocks nothing,
            # so one that raises leaves the mask as it was.)
            held = signal.pthread_sigmask(signal.SIG_BLOCK, ())
            pipe: tuple[int, int] | None = None
            try:
                signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
                pipe = os.pipe()
                pid = _fork()
                if pid == 0:  # the child: never returns into the caller's code
                    try:
                        signal.pthread_sigmask(signal.SIG_SETMASK, held)
                        os.close(pipe[0])
                        _worker(pipe[1], parent, work, k, n)
                    finally:
                        os._exit(70)
                children.append((pid, pipe[0]))
                os.close(pipe[1])
                pipe = None
            finally:
                if pipe is not None:  # no child took it
                    for fd in pipe:
                        os.close(fd)
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        findings, mine = _run_share(work, 0, n)
        per, lost = [mine], []
        fds = [r for _, r in children]
        children = [(pid, -1) for pid, _ in children]  # _collect closes the pipes
        for k, reply in enumerate(_collect(fds, work.deadline + grace), start=1):
            if isinstance(reply, str):
                lost.append(f"blind-mode worker {k} of {n}: {reply}: its share is not covered")
                continue
            status, value = reply
            if status != "ok":
                raise ScanError(f"a blind-mode worker failed: {value}")
            got, share = value
            findings += got
            per.append(share)
        return findings, per, lost
    finally:
        for pid, r in children:
            if r >= 0:
                with contextlib.suppress(OSError):
                    os.close(r)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _fork() -> int:
    # Python 3.12 warns of a fork from a process with several threads: run_checks forks only
    # when it has one Python thread, and the native ones (numpy's pool) have fork handlers.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _worker(w: int, parent: int, work: _Work, k: int, n: int) -> NoReturn:
    reply: tuple[str, Any]
    try:
        never_dump()
        die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)
        reply = ("ok", _run_share(work, k, n))
    except SignerError as exc:  # our own messages never carry a secret
        reply = ("error", f"{type(exc).__name__}: {exc.message}")
    except BaseException as exc:  # others might quote the memory scanned: the type only
        reply = ("error", f"{type(exc).__name__} (message withheld)")
    try:
        with os.fdopen(w, "wb") as out:
            pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)  # 0 and 1 need copyreg
    finally:
        os._exit(0)


class _Replies(pickle.Unpickler):
    """A worker's reply holds findings and shares, in tuples and lists of plain values: any
    other class is refused (the worker read hostile memory; its reply is still ours, but a
    pickle that can name any callable is one bug away from running it)."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("signer.scan._result", "Finding"),
        (__name__, "_Share"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a worker's reply")
        return super().find_class(module, name)


def _collect(fds: Sequence[int], until: float) -> list[Any]:
    """Each pipe's unpickled reply, in order, or a string saying why there is none (the
    worker ended without a whole reply, or had not ended by ``until``). Closes the pipes."""
    chunks: dict[int, list[bytes]] = {r: [] for r in fds}
    open_fds = set(fds)
    try:
        poll = select.poll()
        for r in fds:
            poll.register(r, select.POLLIN)
        while open_fds:
            left = until - time.monotonic()
            # Past ``until``, one look without waiting: replies already in the pipes count.
            ready = poll.poll(max(0.0, left) * 1000)
            if not ready and left <= 0:
                break
            for r, _ in ready:
                data = os.read(r, 1 << 20)
                if data:
                    chunks[r].append(data)
                else:
                    open_fds.discard(r)
                    poll.unregister(r)
    finally:
        for r in fds:
            os.close(r)
    replies: list[Any] = []
    for r in fds:
        if r in open_fds:
            replies.append("no reply by the deadline, killed")
            continue
        try:
            replies.append(_Replies(io.BytesIO(b"".join(chunks[r]))).load())
        except Exception:  # any damaged reply is a lost share
            replies.append("ended without a whole reply (it died)")
    return replies


def _run_check(
    buf: memoryview,
    regions: Sequence[Region],
    check: _Check,
    stop: float,
    findings: list[Finding],
    holes: Holes | None,
    k: int,
    n: int,
) -> tuple[int, bool, int]:
    """Blocks k, k+n, ... of the check's: bytes covered, whether all of them, candidates."""
    L = check.target.length
    covered = tested = 0
    for j, (region, pos, own) in enumerate(_blocks(regions, L)):
        if j % n != k:
            continue
        if time.monotonic() >= stop:
            return covered, False, tested
        at = region.offset + pos
        if holes is not None and holes.empty(at, at + own + L - 1):
            covered += own  # a hole of a sparse file: zeros, not read (a 4 GiB hole is free)
            continue
        block = bytes(buf[at : at + own + L - 1])  # a copy: numpy must not pin the mmap
        done, tests = _test_block(check, block, at, region.address + pos, own, stop, findings)
        tested += tests
        if done < own:
            return covered + done, False, tested
        covered += own
    # Bytes in regions shorter than a window hold no window: done means covered trivially.
    return covered, True, tested


def _test_block(
    check: _Check,
    block: bytes,
    at: int,
    address: int,
    own: int,
    stop: float,
    findings: list[Finding],
) -> tuple[int, int]:
    """Tests the windows starting in ``block[:own]`` (file offset ``at``, virtual address
    ``address``): how many bytes of ``own`` it covered before ``stop`` (all of them unless the
    time ran out), and how many candidates it verified."""
    t = check.target
    L = t.length
    if block == bytes(len(block)):  # a memcmp: 8x faster than counting the zeros
        return own, 0  # untouched memory (most of a gcore): nothing to test
    order: Literal["little", "big"] = "little" if check.little else "big"
    a = np.frombuffer(block, dtype=np.uint8)
    # Limbs: only windows at 8-aligned virtual addresses.
    idx = np.arange(-address % 8, own, 8) if check.little else np.arange(own)
    if check.likely:
        idx = _framed(a, idx, L, address)
    stopped, tested, hits = _verify_run(
        t, block, _candidates(a, idx, t, check.little).tolist(), order, stop
    )
    layout = (
        "little-endian 64-bit limbs at an 8-aligned address"
        if check.little
        else "big-endian, at an 8-aligned or framed offset"
        if check.likely
        else "big-endian"
    )
    findings += [
        Finding(
            key,
            t.component,
            t.representation,
            offset=at + o,
            length=L,
            detail=f"verified ({layout}): {t.what.format(key=key)}",
        )
        for o, key in hits
    ]
    return (own if stopped is None else stopped), tested


def _verify_run(
    t: _Target, block: bytes, offsets: list[int], order: Literal["little", "big"], stop: float
) -> tuple[int | None, int, list[tuple[int, str]]]:
    """Verifies the windows at ``offsets`` of ``block`` until ``stop``: (the first offset left
    unverified or None, how many were verified, (offset, key) of those that verified)."""
    L = t.length
    hits: list[tuple[int, str]] = []
    for k, o in enumerate(offsets):
        if k % 256 == 0 and time.monotonic() >= stop:
            return o, k, hits
        key = t.verify(int.from_bytes(block[o : o + L], order))
        if key is not None:
            hits.append((o, key))
    return None, len(offsets), hits


class StreamChecks:
    """The mathematical checks over memory that arrives a window at a time (a compressed core
    read as a stream): the same windows are tested, with the same filters, as
    :func:`run_checks` tests in a whole file, so the findings and candidate counts are the same.

    The time differs in one way: :func:`run_checks` gives each check in turn an equal share of
    what is left of the budget over all memory; here each window's checks share what is left
    in turn, memory in file order. Within the budget both cover everything; past it, this one
    has covered the start of memory with every check, rather than every check of the first
    kinds over all memory. A check stopped by the deadline stays stopped (its coverage is a
    prefix of memory)."""

    def __init__(self, keys: PublicKeys, offsets: Offsets = "every") -> None:
        self.checks = _checks(keys, offsets)
        self.findings: list[Finding] = []
        self.window = max((c.target.length for c in self.checks), default=1)
        """Bytes a window holds at most: feed() needs this many less one past its range."""
        n = len(self.checks)
        self._covered, self._tested = [0] * n, [0] * n
        self._seconds, self._stopped = [0.0] * n, [False] * n
        self._regions: Sequence[Region] = ()
        self._starts: list[int] = []

    def feed(
        self,
        view: memoryview,
        origin: int,
        start: int,
        end: int,
        regions: Sequence[Region],
        deadline: float,
    ) -> None:
        """Tests the windows that start at file offsets in [start, end) inside ``regions``
        (sorted by offset, disjoint), until ``deadline`` (time.monotonic()). ``view`` holds the
        file's bytes from ``origin`` on, to ``end + window - 1`` or to the end of the file."""
        limit = origin + len(view)
        if regions is not self._regions:
            self._regions, self._starts = regions, [r.offset for r in regions]
        first = max(0, bisect.bisect_right(self._starts, start) - 1)
        for i, check in enumerate(self.checks):
            began = time.monotonic()
            stop = began + max(0.0, deadline - began) / (len(self.checks) - i)
            L = check.target.length
            for r in regions[first:]:
                if r.offset >= end or self._stopped[i]:
                    break
                lo = max(start, r.offset)
                hi = min(end, r.offset + r.length - L + 1, limit - L + 1)
                while lo < hi:
                    own = min(_BLOCK, hi - lo)
                    if time.monotonic() >= stop:
                        self._stopped[i] = True
                        break
                    block = bytes(view[lo - origin : lo - origin + own + L - 1])
                    address = r.address + lo - r.offset
                    done, n = _test_block(check, block, lo, address, own, stop, self.findings)
                    self._covered[i] += done
                    self._tested[i] += n
                    if done < own:
                        self._stopped[i] = True
                        break
                    lo += own
            self._seconds[i] += time.monotonic() - began

    def reports(self, regions: Sequence[Region]) -> list[BlindCheck]:
        """What each check covered of ``regions`` (the memory of the whole stream)."""
        total = sum(r.length for r in regions)
        return [
            BlindCheck(
                c.name,
                c.target.key_id,
                total,
                min(covered, total) if stopped else total,
                tested,
                seconds,
            )
            for c, covered, tested, seconds, stopped in zip(
                self.checks,
                self._covered,
                self._tested,
                self._seconds,
                self._stopped,
                strict=True,
            )
        ]
