"""Known-secret mode: every representation of every algorithm's components, planted at an odd
offset in random bytes, is reported once, with the right secret, component, representation,
offset and length; fragments are reported with their exact extent, and shorter ones are not.

The expected bytes are computed here from first principles (a CPython int's digits are read from
a real int's memory), not with the scanner's own encoders.
"""

from __future__ import annotations

import base64
import ctypes
import sys
from dataclasses import dataclass
from typing import Literal

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from signer.scan import Finding, Scanner
from signer.scan._secrets import PrivateKey

from .conftest import PIN, Keys, Plant

AT = 1001  # odd, and far from the file's edges
GUARD = b"\xff" * 8  # matches no neighbouring form: not zero, not hex, not base64


def cpython_digits(value: int) -> bytes:
    """The ob_digit array of a real int object, read from its memory."""
    assert sys.int_info.bits_per_digit == 30
    if sys.version_info >= (3, 12):
        ndigits = ctypes.c_size_t.from_address(id(value) + 16).value >> 3
    else:
        ndigits = abs(ctypes.c_ssize_t.from_address(id(value) + 16).value)
    return ctypes.string_at(id(value) + 24, ndigits * 4)


def test_cpython_digits_reads_a_real_int() -> None:
    assert cpython_digits(1) == b"\1\0\0\0"
    assert cpython_digits((5 << 30) | 7) == b"\7\0\0\0\5\0\0\0"


@dataclass(frozen=True)
class Plant_:
    data: bytes  # what is written into the file
    lead: int  # where the finding starts within it
    length: int
    allowed: frozenset[str]  # representation names the finding may carry


def b64_family(text: bytes, urlsafe: bool | None) -> frozenset[str]:
    """Base64 and base64url texts without '+/-_' are the same bytes: either name is right."""
    if b"+" in text or b"/" in text:
        return frozenset({"b64"})
    if b"-" in text or b"_" in text:
        return frozenset({"b64url"})
    return frozenset({"b64", "b64url"})


def embedded_b64(value: bytes, shift: int, urlsafe: bool) -> Plant_:
    """``value`` inside a longer base64 text, ``shift`` bytes after a 3-byte boundary."""
    enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    text = enc(b"\xff" * shift + value + b"\xff" * 3)
    start, end = (8 * shift + 5) // 6, 8 * (shift + len(value)) // 6
    return Plant_(text, start, end - start, b64_family(text[start:end], urlsafe))


def jwk_member(value: bytes) -> Plant_:
    """A JWK member. When the value is its minimal big-endian form and a multiple of 3 bytes,
    its text is exactly its base64url at alignment 0: then the scanner names it that."""
    text = base64.urlsafe_b64encode(value).rstrip(b"=")
    aligned = len(value) % 3 == 0 and value[0] != 0
    names = b64_family(text, True) if aligned else frozenset({"jwk"})
    return Plant_(b'{"d":"' + text + b'"}', 6, len(text), names)


NUMERIC_FORMS = [
    "be",
    "be-padded",
    "le64",
    "le",
    "cpython30",
    "hex",
    "hex-padded",
    "HEX",
    "b64-0",
    "b64-1",
    "b64-2",
    "b64url-0",
    "b64url-1",
    "b64url-2",
    "jwk",
    "jwk-padded",
]


def numeric_plant(value: int, padded_len: int, form: str) -> Plant_:
    n = (value.bit_length() + 7) // 8
    minimal = value.to_bytes(n, "big")
    padded = value.to_bytes(padded_len, "big")
    one = frozenset
    if form == "be":
        return Plant_(minimal, 0, n, one({"be"}))
    if form == "be-padded":
        return Plant_(padded, 0, padded_len, one({"be"}))
    if form == "le64":
        return Plant_(value.to_bytes(-(-n // 8) * 8, "little"), 0, -(-n // 8) * 8, one({"le64"}))
    if form == "le":
        return Plant_(value.to_bytes(n, "little"), 0, n, one({"le64" if n % 8 == 0 else "le"}))
    if form == "cpython30":
        digits = cpython_digits(value)
        return Plant_(digits, 0, len(digits), one({"cpython30"}))
    if form == "hex":
        return Plant_(f"{value:x}".encode(), 0, len(f"{value:x}"), one({"hex"}))
    if form == "hex-padded":
        return Plant_(padded.hex().encode(), 0, 2 * padded_len, one({"hex"}))
    if form == "HEX":
        return Plant_(f"{value:X}".encode(), 0, len(f"{value:X}"), one({"HEX"}))
    if form.startswith("b64"):
        name, shift = form.split("-")
        return embedded_b64(minimal, int(shift), name == "b64url")
    return jwk_member(padded if form == "jwk-padded" else minimal)


def components(keys: Keys, secret_id: str) -> dict[str, tuple[int, int]]:
    """Component name -> (value, padded length), from the key's own numbers."""
    if secret_id == "rsa-2048":
        nums = keys.rsa2048.private_numbers()
        full, half = 256, 128
        return {
            "d": (nums.d, full),
            "p": (nums.p, half),
            "q": (nums.q, half),
            "dP": (nums.dmp1, half),
            "dQ": (nums.dmq1, half),
            "qInv": (nums.iqmp, half),
        }
    if secret_id == "ed25519":
        return {"seed": (int.from_bytes(keys.ed25519.private_bytes_raw(), "big"), 32)}
    key = {"ec-p256": keys.p256, "ec-p384": keys.p384, "ec-p521": keys.p521}[secret_id]
    return {"private_value": (key.private_numbers().private_value, (key.curve.key_size + 7) // 8)}


NUMERIC_CASES = [
    (sid, comp, form)
    for sid, comps in (
        ("rsa-2048", ("d", "p", "q", "dP", "dQ", "qInv")),
        ("ec-p256", ("private_value",)),
        ("ec-p384", ("private_value",)),
        ("ec-p521", ("private_value",)),
        ("ed25519", ("seed",)),
    )
    for comp in comps
    for form in NUMERIC_FORMS
]


def assert_one(findings: list[Finding], secret_id: str, component: str, p: Plant_) -> None:
    assert len(findings) == 1, findings
    f = findings[0]
    assert (f.secret_id, f.component) == (secret_id, component)
    assert f.representation in p.allowed, (f.representation, p.allowed)
    assert (f.offset, f.length) == (AT + len(GUARD) + p.lead, p.length)
    assert f.address is None
    assert f.mapping is None


@pytest.mark.parametrize(("secret_id", "component", "form"), NUMERIC_CASES)
def test_numeric_representation_found(
    scanner: Scanner, keys: Keys, plant: Plant, secret_id: str, component: str, form: str
) -> None:
    value, padded_len = components(keys, secret_id)[component]
    p = numeric_plant(value, padded_len, form)
    result = scanner.scan(plant([(AT, GUARD + p.data + GUARD)], None))
    assert_one(result.findings, secret_id, component, p)


def _key(keys: Keys, secret_id: str) -> PrivateKey:
    by_id: dict[str, PrivateKey] = {
        "rsa-2048": keys.rsa2048,
        "ec-p256": keys.p256,
        "ec-p384": keys.p384,
        "ec-p521": keys.p521,
        "ed25519": keys.ed25519,
    }
    return by_id[secret_id]


WHOLE_KEY_CASES = [
    ("rsa-2048", "pkcs1-der", "der"),
    ("rsa-2048", "pkcs8-der", "der"),
    ("rsa-2048", "pkcs1-der", "pem"),
    ("rsa-2048", "pkcs8-der", "pem"),
    *(
        (sid, comp, enc)
        for sid in ("ec-p256", "ec-p384", "ec-p521")
        for comp in ("sec1-der", "pkcs8-der")
        for enc in ("der", "pem")
    ),
    ("ed25519", "pkcs8-der", "der"),
    ("ed25519", "pkcs8-der", "pem"),
]


@pytest.mark.parametrize(("secret_id", "component", "encoding"), WHOLE_KEY_CASES)
def test_whole_key_found_once(
    scanner: Scanner, keys: Keys, plant: Plant, secret_id: str, component: str, encoding: str
) -> None:
    """A whole key is one finding, not one per component or nested encoding inside it."""
    fmt = (
        serialization.PrivateFormat.PKCS8
        if component == "pkcs8-der"
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    key = _key(keys, secret_id)
    if encoding == "der":
        der = key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
        p = Plant_(der, 0, len(der), frozenset({component}))
    else:
        pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
        header = pem.index(b"\n") + 1
        footer = pem.rindex(b"-----END")
        p = Plant_(pem, header, footer - 1 - header, frozenset({"pem"}))
    result = scanner.scan(plant([(AT, GUARD + p.data + GUARD)], None))
    assert_one(result.findings, secret_id, component, p)


PIN_FORMS = [
    "utf8",
    "utf16le",
    "utf32le",
    "hex",
    "HEX",
    "b64-0",
    "b64-1",
    "b64-2",
    "b64url-0",
    "b64url-1",
    "b64url-2",
]


@pytest.mark.parametrize("form", PIN_FORMS)
def test_pin_representation_found(scanner: Scanner, plant: Plant, form: str) -> None:
    text = PIN.decode()
    if form == "utf8":
        p = Plant_(PIN, 0, len(PIN), frozenset({"utf8"}))
    elif form == "utf16le":
        p = Plant_(text.encode("utf-16-le"), 0, 2 * len(PIN), frozenset({"utf16le"}))
    elif form == "utf32le":
        p = Plant_(text.encode("utf-32-le"), 0, 4 * len(PIN), frozenset({"utf32le"}))
    elif form in ("hex", "HEX"):
        h = PIN.hex().encode()  # all digits when the PIN is hex text: then hex is HEX
        names = frozenset({form}) if h != h.upper() else frozenset({"hex", "HEX"})
        p = Plant_(h if form == "hex" else h.upper(), 0, len(h), names)
    else:
        name, shift = form.split("-")
        p = embedded_b64(PIN, int(shift), name == "b64url")
    result = scanner.scan(plant([(AT, GUARD + p.data + GUARD)], None))
    assert_one(result.findings, "user-pin", "pin", p)


def test_rsa_4096_found(plant: Plant) -> None:
    """One RSA-4096 test (key generation is slow): d little-endian and p big-endian."""
    from signer.scan import secret_from_key

    key = rsa.generate_private_key(65537, 4096)
    nums = key.private_numbers()
    d_le = nums.d.to_bytes(512, "little")
    p_be = nums.p.to_bytes(256, "big")
    result = Scanner([secret_from_key(key, "rsa-4096")]).scan(
        plant([(AT, d_le), (20001, p_be)], None)
    )
    got = {(f.component, f.representation, f.offset, f.length) for f in result.findings}
    assert got == {("d", "le64", AT, 512), ("p", "be", 20001, 256)}


# --- fragments ------------------------------------------------------------------------------


def _guarded_slice(data: bytes, start: int, length: int) -> bytes:
    """data[start:start+length] between bytes that cannot extend the match."""
    before = bytes([data[start - 1] ^ 0xFF])
    after = bytes([data[start + length] ^ 0xFF])
    return before + data[start : start + length] + after


@pytest.mark.parametrize("order", ["big", "little"])
@pytest.mark.parametrize("length", [16, 40])
def test_fragment_of_d_found_with_exact_extent(
    scanner: Scanner, keys: Keys, plant: Plant, order: Literal["big", "little"], length: int
) -> None:
    d = keys.rsa2048.private_numbers().d
    data = d.to_bytes(256, order)
    planted = _guarded_slice(data, 100, length)
    result = scanner.scan(plant([(AT, planted)], None))
    expected = Finding(
        "rsa-2048", "d", "fragment:be" if order == "big" else "fragment:le64", AT + 1, length
    )
    assert result.findings == [expected]


@pytest.mark.parametrize("order", ["big", "little"])
def test_fragment_shorter_than_min_fragment_not_found(
    scanner: Scanner, keys: Keys, plant: Plant, order: Literal["big", "little"]
) -> None:
    d = keys.rsa2048.private_numbers().d
    planted = _guarded_slice(d.to_bytes(256, order), 100, 15)
    assert scanner.scan(plant([(AT, planted)], None)).findings == []


def test_fragment_window_follows_min_fragment(keys: Keys, plant: Plant) -> None:
    """min_fragment=24: a 24-byte slice is found, a 23-byte slice is not."""
    sc = Scanner([k for k in keys.secrets() if k.id == "ec-p384"], min_fragment=24)
    d = keys.p384.private_numbers().private_value.to_bytes(48, "big")
    assert [f.length for f in sc.scan(plant([(AT, _guarded_slice(d, 10, 24))], None)).findings] == [
        24
    ]
    assert sc.scan(plant([(AT, _guarded_slice(d, 10, 23))], None)).findings == []


def test_hex_fragment_needs_min_fragment_bytes_of_secret(
    scanner: Scanner, keys: Keys, plant: Plant
) -> None:
    """A hex fragment must carry 16 bytes of the secret: 32 hex digits, not 16."""
    h = f"{keys.p256.private_numbers().private_value:064x}".encode()
    assert [
        (f.representation, f.length)
        for f in scanner.scan(plant([(AT, _guarded_slice(h, 10, 32))], None)).findings
    ] == [("fragment:hex", 32)]
    assert scanner.scan(plant([(AT, _guarded_slice(h, 10, 31))], None)).findings == []


def test_several_occurrences_each_reported(scanner: Scanner, keys: Keys, plant: Plant) -> None:
    seed = keys.ed25519.private_bytes_raw()
    result = scanner.scan(plant([(101, seed), (5001, seed), (60001, seed[::-1])], None))
    assert [(f.offset, f.component, f.representation) for f in result.findings] == [
        (101, "seed", "be"),
        (5001, "seed", "be"),
        (60001, "seed", "le64"),
    ]


def test_public_key_in_memory_is_not_a_finding(scanner: Scanner, keys: Keys, plant: Plant) -> None:
    """The modulus and public point sit inside the private DER encodings; they are not secret."""
    pubs = [
        k.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for k in (keys.rsa2048, keys.p256, keys.p521, keys.ed25519)
    ]
    pems = [
        keys.rsa2048.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        ),
        keys.rsa2048.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
    ]
    items, at = [], 101
    for blob in pubs + pems:
        items.append((at, blob))
        at += len(blob) + 101
    assert scanner.scan(plant(items, None)).findings == []
