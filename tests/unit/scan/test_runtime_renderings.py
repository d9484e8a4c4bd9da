"""Recall in other programs' memory (issue 14): a key as other runtimes hold it and as common tools
print it is found, with the right secret, component, representation and extent; near misses and
random memory are not.

Every rendering is built here from the runtime's own layout rules, written out below (not with
the scanner's encoders), or made by the tool itself: ``openssl pkey -text`` and ``ssh-keygen``
(both in the Makefile's APT_PACKAGES). Each is planted between guard bytes in 64 KiB of random
bytes (or in an ELF core's heap) and scanned with the session's scanner (conftest: RSA-2048,
P-256/384/521, Ed25519, a PIN).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signer.scan import Finding, Scanner, secret_from_key, secret_from_pin
from signer.scan._secrets import PrivateKey

from .conftest import Keys, Plant, memory_like, random_bytes
from .test_elf import HEAP, Seg, build_core

AT = 1001  # odd, and far from the file's edges
GUARD = b"\xff" * 8  # matches no neighbouring form: not zero, not hex, not base64, not a digit

PEM, DER = serialization.Encoding.PEM, serialization.Encoding.DER
PKCS8 = serialization.PrivateFormat.PKCS8
TRAD = serialization.PrivateFormat.TraditionalOpenSSL
NOENC = serialization.NoEncryption()


# --- big integers as runtimes lay them out --------------------------------------------------


def words(value: int, bits: int) -> list[int]:
    """The value's words of ``bits`` bits, least significant first, no zero word on top."""
    out = []
    while value:
        out.append(value & ((1 << bits) - 1))
        value >>= bits
    return out


def java_mag(value: int) -> bytes:
    """java.math.BigInteger: ``final int[] mag``, "the magnitude in big-endian order: the zeroth
    element is the most-significant int", no leading zero int; an int[]'s elements are stored in
    the platform's order (little-endian on x86-64 and arm64)."""
    ints = [w - (1 << 32) if w >= 1 << 31 else w for w in reversed(words(value, 32))]
    return struct.pack(f"<{len(ints)}i", *ints)


def go_nat(value: int) -> bytes:
    """Go math/big: ``type nat []Word``, "little-endian Word slice" (least significant first),
    normalised (no zero Word on top); Word is uint, 64 bits on amd64/arm64. GMP's mpz_t limbs
    (mp_limb_t, 64 bits) and V8's BigInt digits (uintptr_t) are laid out the same."""
    w = words(value, 64)
    return struct.pack(f"<{len(w)}Q", *w)


def dotnet_bits(value: int) -> bytes:
    """.NET System.Numerics.BigInteger: ``uint[]? _bits``, least significant first (a value
    that fits in 31 bits lives in ``int _sign`` and has no _bits; no key component does)."""
    w = words(value, 32)
    return struct.pack(f"<{len(w)}I", *w)


def openssl_bn32(value: int, spare: int = 2) -> bytes:
    """OpenSSL BIGNUM built with 32-bit BN_ULONG: ``d[0..top)`` least significant first; the
    array holds ``dmax >= top`` words, the rest zero (here ``spare`` of them)."""
    w = words(value, 32) + [0] * spare
    return struct.pack(f"<{len(w)}I", *w)


def byte_width(value: int) -> int:
    return (value.bit_length() + 7) // 8


@dataclass(frozen=True)
class Expect:
    data: bytes  # what is planted (between guards)
    lead: int  # where the finding starts within it
    length: int
    names: frozenset[str]  # representation names the finding may carry
    also: frozenset[tuple[str, int, int]] = frozenset()  # other (name, lead, length) allowed


def whole(data: bytes, *names: str) -> Expect:
    return Expect(data, 0, len(data), frozenset(names))


def le_names(value: int, word: int) -> frozenset[str]:
    """Little-endian words of 4 bytes are the le64 form when both round to the same length."""
    n = byte_width(value)
    return frozenset({"le64" if -(-n // word) * word == -(-n // 8) * 8 else "le32"})


def b64_utf16le(raw: bytes, urlsafe: bool) -> Expect:
    """Base64 of a value's bytes as a UTF-16LE string (.NET Convert.ToBase64String, a JWK
    member in a .NET or Java string). Only the characters the value alone determines are its
    b64/b64url form; an unpadded base64url text is its jwk form, which takes the last one
    too."""
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()
    data = text.encode("utf-16-le")
    nopad = text.rstrip("=")
    if len(raw) % 3 == 0:
        return Expect(data, 0, len(data), b64_names("utf16le-", text))
    if "+" in text or "/" in text:
        return Expect(data, 0, 2 * (8 * len(raw) // 6), frozenset({"utf16le-b64"}))
    return Expect(data, 0, 2 * len(nopad), frozenset({"utf16le-jwk"}))


def b64_names(prefix: str, text: str) -> frozenset[str]:
    """Base64 without '+/' and base64url without '-_' are the same text: either name is right;
    an unpadded base64url of a value whose length is a multiple of 3 is also base64url."""
    if "+" in text or "/" in text:
        return frozenset({prefix + "b64"})
    if "-" in text or "_" in text:
        return frozenset({prefix + "b64url", prefix + "jwk"})
    return frozenset({prefix + "b64", prefix + "b64url", prefix + "jwk"})


def hex_names(prefix: str, text: str) -> frozenset[str]:
    """A hex text with no letter is both lower- and upper-case."""
    if text.isdigit():
        return frozenset({prefix + "hex", prefix + "HEX"})
    return frozenset({prefix + ("hex" if text == text.lower() else "HEX")})


def utf16be(text: str, names: frozenset[str]) -> Expect:
    """UTF-16BE text followed by the guard: the finding leaves out the first character's 0 byte
    (see signer.scan._patterns._wide) and ends at the last character."""
    data = text.encode("utf-16-be")
    return Expect(data, 1, len(data) - 1, names)


RENDERINGS: dict[str, Callable[[int, int], Expect]] = {
    # big-integer layouts
    "java-BigInteger-mag": lambda v, n: whole(java_mag(v), "java-mag"),
    "go-big.Int-nat": lambda v, n: whole(go_nat(v), "le64"),
    "dotnet-BigInteger-bits": lambda v, n: Expect(
        dotnet_bits(v), 0, len(dotnet_bits(v)), le_names(v, 4)
    ),
    # dmax > top: zero words follow, so the 64-bit form fits too when it is longer
    "openssl-BIGNUM-32bit": lambda v, n: Expect(
        openssl_bn32(v),
        0,
        len(dotnet_bits(v)),
        le_names(v, 4),
        frozenset({("le64", 0, len(go_nat(v)))}),
    ),
    # text as runtimes print it
    "python-str/java-toString/go-%v": lambda v, n: whole(str(v).encode(), "dec"),
    "go-%x": lambda v, n: whole(f"{v:x}".encode(), *hex_names("", f"{v:x}")),
    "python-bytes.hex(':')": lambda v, n: whole(
        v.to_bytes(byte_width(v), "big").hex(":").encode(), "hex-colon"
    ),
    "padded-bytes.hex(':')": lambda v, n: whole(
        v.to_bytes(n, "big").hex(":").encode(), "hex-colon"
    ),
    # strings of two-byte characters: .NET, Java char[] and non-compact strings, V8, Windows
    "dotnet-ToString()-utf16le": lambda v, n: whole(str(v).encode("utf-16-le"), "utf16le-dec"),
    "java-toString(16)-utf16le": lambda v, n: whole(
        f"{v:x}".encode("utf-16-le"), *hex_names("utf16le-", f"{v:x}")
    ),
    "dotnet-ToString('X')-utf16le": lambda v, n: whole(
        f"{v:X}".encode("utf-16-le"), *hex_names("utf16le-", f"{v:X}")
    ),
    "dotnet-ToBase64String-utf16le": lambda v, n: b64_utf16le(
        v.to_bytes(byte_width(v), "big"), False
    ),
    "jwk-member-utf16le": lambda v, n: b64_utf16le(v.to_bytes(n, "big"), True),
    "java-writeChars-utf16be-hex": lambda v, n: utf16be(f"{v:x}", hex_names("utf16be-", f"{v:x}")),
    "utf16be-dec": lambda v, n: utf16be(str(v), frozenset({"utf16be-dec"})),
}


def numeric_components(keys: Keys) -> dict[tuple[str, str], tuple[int, int]]:
    """(secret id, component) -> (value, padded length), from the keys' own numbers."""
    rn = keys.rsa2048.private_numbers()
    out = {
        ("rsa-2048", "d"): (rn.d, 256),
        ("rsa-2048", "p"): (rn.p, 128),
        ("rsa-2048", "q"): (rn.q, 128),
        ("rsa-2048", "dP"): (rn.dmp1, 128),
        ("rsa-2048", "dQ"): (rn.dmq1, 128),
        ("rsa-2048", "qInv"): (rn.iqmp, 128),
        ("ed25519", "seed"): (int.from_bytes(keys.ed25519.private_bytes_raw(), "big"), 32),
    }
    for sid, key in (("ec-p256", keys.p256), ("ec-p384", keys.p384), ("ec-p521", keys.p521)):
        out[(sid, "private_value")] = (
            key.private_numbers().private_value,
            (key.curve.key_size + 7) // 8,
        )
    return out


COMPONENTS = [
    ("rsa-2048", "d"),
    ("rsa-2048", "p"),
    ("rsa-2048", "q"),
    ("rsa-2048", "dP"),
    ("rsa-2048", "dQ"),
    ("rsa-2048", "qInv"),
    ("ec-p256", "private_value"),
    ("ec-p384", "private_value"),
    ("ec-p521", "private_value"),
    ("ed25519", "seed"),
]


def assert_found(findings: list[Finding], secret_id: str, component: str, e: Expect) -> None:
    assert len(findings) == 1, findings
    f = findings[0]
    assert (f.secret_id, f.component) == (secret_id, component)
    got = (f.representation, f.offset - AT - len(GUARD), f.length)
    if got not in e.also:
        assert f.representation in e.names, (f.representation, e.names)
        assert (f.offset, f.length) == (AT + len(GUARD) + e.lead, e.length)


@pytest.mark.parametrize("rendering", list(RENDERINGS))
@pytest.mark.parametrize(("secret_id", "component"), COMPONENTS)
def test_number_rendered_by_a_runtime_found(
    scanner: Scanner, keys: Keys, plant: Plant, secret_id: str, component: str, rendering: str
) -> None:
    value, padded = numeric_components(keys)[(secret_id, component)]
    e = RENDERINGS[rendering](value, padded)
    result = scanner.scan(plant([(AT, GUARD + e.data + GUARD)], None))
    assert_found(result.findings, secret_id, component, e)


# --- openssl -text, rendered by openssl -------------------------------------------------------


def openssl_text(key: PrivateKey, tmp_path: Path, *args: str) -> bytes:
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_bytes(PEM, PKCS8, NOENC))
    return subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-text", "-noout", *args],
        check=True,
        capture_output=True,
    ).stdout


def labelled_blocks(text: bytes, labels: dict[bytes, str]) -> dict[str, tuple[int, int]]:
    """component -> (start, end) of the hex block after each label line of ``openssl -text``."""
    out = {}
    for label, component in labels.items():
        start = text.index(b"\n" + label + b":\n") + len(label) + 3
        start += len(text[start:]) - len(text[start:].lstrip(b" "))
        end = start
        while True:  # the block's lines: indented colon hex
            stop = text.index(b"\n", end)
            out[component] = (start, stop)
            if not text[stop + 1 :].startswith(b"    "):
                break
            end = stop + 1
    return out


OPENSSL_LABELS = {
    "rsa-2048": {
        b"privateExponent": "d",
        b"prime1": "p",
        b"prime2": "q",
        b"exponent1": "dP",
        b"exponent2": "dQ",
        b"coefficient": "qInv",
    },
    "ec-p256": {b"priv": "private_value"},
    "ec-p384": {b"priv": "private_value"},
    "ec-p521": {b"priv": "private_value"},
    "ed25519": {b"priv": "seed"},
}


def key_of(keys: Keys, secret_id: str) -> PrivateKey:
    by_id: dict[str, PrivateKey] = {
        "rsa-2048": keys.rsa2048,
        "ec-p256": keys.p256,
        "ec-p384": keys.p384,
        "ec-p521": keys.p521,
        "ed25519": keys.ed25519,
    }
    return by_id[secret_id]


@pytest.mark.parametrize("secret_id", list(OPENSSL_LABELS))
def test_openssl_pkey_text_found(
    scanner: Scanner, keys: Keys, plant: Plant, tmp_path: Path, secret_id: str
) -> None:
    """The whole ``openssl pkey -text`` output: one finding per private component, each the
    whole hex block (with the '00:' openssl puts before a number whose top bit is set); the
    modulus and public point are not findings."""
    text = openssl_text(key_of(keys, secret_id), tmp_path)
    blocks = labelled_blocks(text, OPENSSL_LABELS[secret_id])
    result = scanner.scan(plant([(AT, text)], None))
    got = {(f.component, f.representation, f.offset - AT, f.length) for f in result.findings}
    assert {f.secret_id for f in result.findings} == {secret_id}
    assert got == {(c, "openssl-text", a, b - a) for c, (a, b) in blocks.items()}


def test_openssl_public_text_is_not_a_finding(
    scanner: Scanner, keys: Keys, plant: Plant, tmp_path: Path
) -> None:
    items, at = [], 101
    for key in (keys.rsa2048, keys.p256, keys.ed25519):
        text = openssl_text(key, tmp_path, "-pubout")
        items.append((at, text))
        at += len(text) + 101
    assert scanner.scan(plant(items, None)).findings == []


# --- whole keys: PEM as other programs hold it, OpenSSH, PuTTY --------------------------------


def pem_parts(pem: bytes) -> tuple[int, int]:
    """(start, end) of a PEM block's base64 body, without its last line end."""
    start = pem.index(b"\n") + 1
    return start, pem.rindex(b"-----END") - 1


def pkcs8_pem(keys: Keys) -> bytes:
    return keys.rsa2048.private_bytes(PEM, PKCS8, NOENC)


def test_pem_with_crlf_found(scanner: Scanner, keys: Keys, plant: Plant) -> None:
    """Windows and .NET write PEM with CRLF line ends."""
    pem = pkcs8_pem(keys).replace(b"\n", b"\r\n")
    start, end = pem.index(b"\r\n") + 2, pem.rindex(b"-----END") - 2
    result = scanner.scan(plant([(AT, GUARD + pem + GUARD)], None))
    assert_found(
        result.findings,
        "rsa-2048",
        "pkcs8-der",
        Expect(pem, start, end - start, frozenset({"pem-crlf"})),
    )


def test_pem_inside_json_found(scanner: Scanner, keys: Keys, plant: Plant) -> None:
    """A PEM key inside a JSON document (a cloud service-account key file, a secret store's
    response): its line ends are the two characters backslash-n."""
    doc = json.dumps(
        {"type": "service_account", "private_key": pkcs8_pem(keys).decode(), "client_id": "1"},
        indent=2,
    ).encode()
    start = doc.index(b"-----\\n") + 7
    end = doc.index(b"\\n-----END")
    result = scanner.scan(plant([(AT, GUARD + doc + GUARD)], None))
    assert_found(
        result.findings,
        "rsa-2048",
        "pkcs8-der",
        Expect(doc, start, end - start, frozenset({"pem-json"})),
    )


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_pem_in_a_utf16le_string_found(
    scanner: Scanner, keys: Keys, plant: Plant, eol: str
) -> None:
    """A .NET or Java string holding a PEM key."""
    text = pkcs8_pem(keys).decode().replace("\n", eol)
    data = text.encode("utf-16-le")
    start = 2 * (text.index(eol) + len(eol))
    end = 2 * (text.rindex("-----END") - len(eol))
    name = "utf16le-pem" if eol == "\n" else "utf16le-pem-crlf"
    result = scanner.scan(plant([(AT, GUARD + data + GUARD)], None))
    assert_found(
        result.findings,
        "rsa-2048",
        "pkcs8-der",
        Expect(data, start, end - start, frozenset({name})),
    )


def test_pem_body_in_utf16be_found(scanner: Scanner, keys: Keys, plant: Plant) -> None:
    """Big-endian UTF-16 ends show only at the text's last character: a body followed by
    anything but a 0 byte is named utf16be (one followed by another character reads as
    utf16le one byte on: the same bytes)."""
    pem = pkcs8_pem(keys)
    start, end = pem_parts(pem)
    e = utf16be(pem[start:end].decode(), frozenset({"utf16be-pem"}))
    result = scanner.scan(plant([(AT, GUARD + e.data + GUARD)], None))
    assert_found(result.findings, "rsa-2048", "pkcs8-der", e)


def ssh_keygen_file(key: PrivateKey, tmp_path: Path) -> bytes:
    """The key rewritten by ssh-keygen in its own format (openssh-key-v1, 70-column base64,
    random check integers, a comment)."""
    path = tmp_path / "id_key"
    fmt = (
        serialization.PrivateFormat.OpenSSH if isinstance(key, ed25519.Ed25519PrivateKey) else TRAD
    )
    path.write_bytes(key.private_bytes(PEM, fmt, NOENC))
    path.chmod(0o600)
    for args in (["-p", "-N", ""], ["-c", "-C", "ops@build-7"]):  # rewrite, then a comment
        subprocess.run(
            ["ssh-keygen", "-q", "-P", "", *args, "-f", str(path)], check=True, capture_output=True
        )
    return path.read_bytes()


def ssh_string(blob: bytes, at: int) -> int:
    (n,) = struct.unpack_from(">I", blob, at)
    return int(at + 4 + n)


def openssh_key_fields(blob: bytes, comment: bytes) -> tuple[int, int]:
    """[start, end) of the private section's key fields: after the check integers, up to the
    comment, with the first two (zero) bytes of the comment's length."""
    pub_at = 15
    for _ in range(3):
        pub_at = ssh_string(blob, pub_at)
    after_pub = ssh_string(blob, pub_at + 4)
    start = after_pub + 4 + 8
    end = blob.rindex(struct.pack(">I", len(comment)) + comment)
    return start, end + 2


def chars_within(blob_len: int, lo: int, hi: int, line: int) -> tuple[int, int]:
    """The [first, last+1) offsets, in the base64 text with a line end every ``line``
    characters, of the characters that encode only bytes in [lo, hi)."""
    chars = [j for j in range(-(-4 * blob_len // 3)) if lo <= 6 * j // 8 and (6 * j + 5) // 8 < hi]
    first, last = chars[0], chars[-1]
    return first + first // line, last + last // line + 1


@pytest.mark.parametrize("secret_id", list(OPENSSL_LABELS))
def test_ssh_keygen_private_key_found(
    scanner: Scanner, keys: Keys, plant: Plant, tmp_path: Path, secret_id: str
) -> None:
    """An OpenSSH private key file, as written by ssh-keygen: one finding, the base64 of the
    key fields (the random check integers and the comment are not part of it)."""
    text = ssh_keygen_file(key_of(keys, secret_id), tmp_path)
    lines = text.splitlines()
    assert len(lines[1]) == 70
    blob = base64.b64decode(b"".join(lines[1:-1]))
    lo, hi = openssh_key_fields(blob, b"ops@build-7")
    first, last = chars_within(len(blob), lo, hi, 70)
    body = len(lines[0]) + 1
    result = scanner.scan(plant([(AT, text)], None))
    assert [(f.secret_id, f.component, f.representation) for f in result.findings] == [
        (secret_id, "openssh-key", "pem")
    ]
    assert (result.findings[0].offset - AT, result.findings[0].length) == (
        body + first,
        last - first,
    )
    # The same key fields in binary (the blob as ssh-agent or a library decodes it).
    result = scanner.scan(plant([(AT, blob)], None))
    assert [(f.component, f.representation, f.offset - AT, f.length) for f in result.findings] == [
        ("openssh-key", "openssh-key", lo, hi - lo)
    ]


@pytest.mark.parametrize("secret_id", ["rsa-2048", "ed25519"])
def test_ssh_keygen_private_key_in_a_utf16_string_found(
    scanner: Scanner, keys: Keys, plant: Plant, tmp_path: Path, secret_id: str
) -> None:
    text = ssh_keygen_file(key_of(keys, secret_id), tmp_path)
    lines = text.splitlines()
    blob = base64.b64decode(b"".join(lines[1:-1]))
    first, last = chars_within(len(blob), *openssh_key_fields(blob, b"ops@build-7"), 70)
    body = len(lines[0]) + 1
    result = scanner.scan(plant([(AT, text.decode().encode("utf-16-le"))], None))
    assert [(f.component, f.representation, f.offset - AT, f.length) for f in result.findings] == [
        ("openssh-key", "utf16le-pem", 2 * (body + first), 2 * (last - first))
    ]


def mpint(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return struct.pack(">I", len(body)) + body


def ssh_str(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def ppk3(key: rsa.RSAPrivateKey, comment: bytes, eol: bytes) -> tuple[bytes, bytes]:
    """A PuTTY-User-Key-File-3, unencrypted (PuTTY's sshpubk.c): public blob (string "ssh-rsa",
    mpint e, mpint n) and private blob (mpint d, p, q, iqmp) in 64-column base64, and the
    private MAC (HMAC-SHA-256, empty key when unencrypted); and the private blob."""
    nums = key.private_numbers()
    pub = ssh_str(b"ssh-rsa") + mpint(nums.public_numbers.e) + mpint(nums.public_numbers.n)
    priv = mpint(nums.d) + mpint(nums.p) + mpint(nums.q) + mpint(nums.iqmp)

    def lines(blob: bytes) -> list[bytes]:
        b64 = base64.b64encode(blob)
        return [b64[i : i + 64] for i in range(0, len(b64), 64)]

    mac_data = b"".join(map(ssh_str, (b"ssh-rsa", b"none", comment, pub, priv)))
    mac = hmac.new(b"", mac_data, hashlib.sha256).hexdigest().encode()
    out = [
        b"PuTTY-User-Key-File-3: ssh-rsa",
        b"Encryption: none",
        b"Comment: " + comment,
        b"Public-Lines: %d" % len(lines(pub)),
        *lines(pub),
        b"Private-Lines: %d" % len(lines(priv)),
        *lines(priv),
        b"Private-MAC: " + mac,
    ]
    return eol.join(out) + eol, priv


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_putty_ppk_found(scanner: Scanner, keys: Keys, plant: Plant, eol: bytes) -> None:
    text, priv = ppk3(keys.rsa2048, b"rsa-key-20240101", eol)
    start = text.index(b"Private-Lines: ")
    start = text.index(eol, start) + len(eol)
    end = text.index(eol + b"Private-MAC")
    result = scanner.scan(plant([(AT, text)], None))
    name = "pem" if eol == b"\n" else "pem-crlf"
    assert [(f.component, f.representation, f.offset - AT, f.length) for f in result.findings] == [
        ("ppk-private", name, start, end - start)
    ]
    result = scanner.scan(plant([(AT, GUARD + priv + GUARD)], None))
    assert_found(result.findings, "rsa-2048", "ppk-private", whole(priv, "ppk-private"))


# --- PINs as runtimes hold text -----------------------------------------------------------

TEXT_PIN = "Grüße-pässwörd-4711"  # Latin-1 can hold it; UTF-8 is not Latin-1 for it
ASTRAL_PIN = "pin-\U0001f511-Grüße-4711"  # outside the BMP: CPython holds it as UCS-4


@pytest.fixture(scope="module")
def pin_scanner() -> Scanner:
    return Scanner(
        [
            secret_from_pin(TEXT_PIN.encode(), "text-pin"),
            secret_from_pin(ASTRAL_PIN.encode(), "astral-pin"),
        ]
    )


PIN_RENDERINGS = {
    # Java compact String, V8 one-byte string, CPython 1-byte str: Latin-1
    "latin1-compact-string": ("text-pin", TEXT_PIN.encode("latin-1"), 0, "latin1"),
    # Java char[] (Console.readPassword), .NET string, Windows wide string
    "java-char[]": ("text-pin", TEXT_PIN.encode("utf-16-le"), 0, "utf16le"),
    # Java DataOutput.writeChars, network byte order (the first character's 0 byte left out)
    "utf16be": ("text-pin", TEXT_PIN.encode("utf-16-be"), 1, "utf16be"),
    # CPython str of a PIN with a character outside the BMP: 4 bytes a character
    "cpython-ucs4": ("astral-pin", ASTRAL_PIN.encode("utf-32-le"), 0, "utf32le"),
    # Java/JS string of the same: UTF-16 with a surrogate pair
    "java-surrogates": ("astral-pin", ASTRAL_PIN.encode("utf-16-le"), 0, "utf16le"),
    "utf8": ("astral-pin", ASTRAL_PIN.encode(), 0, "utf8"),
}


@pytest.mark.parametrize("rendering", list(PIN_RENDERINGS))
def test_pin_as_runtimes_hold_text_found(
    pin_scanner: Scanner, plant: Plant, rendering: str
) -> None:
    sid, data, lead, name = PIN_RENDERINGS[rendering]
    e = Expect(data, lead, len(data) - lead, frozenset({name}))
    result = pin_scanner.scan(plant([(AT, GUARD + data + GUARD)], None))
    assert_found(result.findings, sid, "pin", e)


# --- fragments of the sparsely searched forms ---------------------------------------------


def guarded(data: bytes, start: int, length: int) -> bytes:
    """data[start:start+length] between bytes that cannot extend the match."""
    return b"\xfe" + data[start : start + length] + b"\xfe"


@pytest.mark.parametrize(
    ("form", "render", "unit", "per_byte", "worth"),
    [
        ("dec", lambda v: str(v).encode(), 1, 2.41, 24),
        ("hex-colon", lambda v: v.to_bytes(256, "big").hex(":").encode(), 3, 3, 24),
        ("utf16le-hex", lambda v: f"{v:x}".encode("utf-16-le"), 2, 4, 32),
    ],
)
def test_fragment_of_a_sparse_form_found_shorter_not(
    scanner: Scanner,
    keys: Keys,
    plant: Plant,
    form: str,
    render: Callable[[int], bytes],
    unit: int,
    per_byte: float,
    worth: int,
) -> None:
    """Sparsely searched forms: a fragment carrying ``worth`` bytes of d (1.5 x min_fragment
    for the new text forms, 2 x for UTF-16 forms) is found at every offset (in whole units:
    characters, a byte's hex pair), with its exact extent; 15 bytes' worth never is."""
    text = render(keys.rsa2048.private_numbers().d)
    long, short = round(worth * per_byte), int(15 * per_byte)
    if form == "hex-colon":  # pairs and the colons between them
        long, short = 3 * worth - 1, 3 * 15 - 1
    for start in range(30, 130, unit):
        result = scanner.scan(plant([(AT, guarded(text, start, long))], None))
        assert [(f.representation, f.offset, f.length) for f in result.findings] == [
            (f"fragment:{form}", AT + 1, long)
        ], start
        assert scanner.scan(plant([(AT, guarded(text, start, short))], None)).findings == []


# --- in an ELF core ------------------------------------------------------------------------


def test_renderings_in_an_elf_core_heap(scanner: Scanner, keys: Keys, tmp_path: Path) -> None:
    """Several runtimes' renderings in one core's heap: each found at its virtual address."""
    rn = keys.rsa2048.private_numbers()
    planted = [
        (0x100, java_mag(rn.d), "d", "java-mag"),
        (0x900, str(rn.p).encode("utf-16-le"), "p", "utf16le-dec"),
        (0x1700, go_nat(rn.q), "q", "le64"),
        (0x2100, rn.iqmp.to_bytes(128, "big").hex(":").encode(), "qInv", "hex-colon"),
    ]
    heap = memory_like(0x3000, seed=7)
    for at, data, _, _ in planted:
        heap[at - 1 : at + len(data) + 1] = GUARD[:1] + data + GUARD[:1]
    core, offsets = build_core([Seg(HEAP, bytes(heap))], [])
    path = tmp_path / "core.42"
    path.write_bytes(core)
    result = scanner.scan(path)
    assert [(f.component, f.representation, f.address) for f in result.findings] == [
        (c, name, HEAP + at) for at, _, c, name in planted
    ]
    assert all(f.offset == offsets[0] + f.address - HEAP for f in result.findings if f.address)


# --- negative controls ---------------------------------------------------------------------


def test_random_and_memory_like_bytes_find_nothing(scanner: Scanner, plant: Plant) -> None:
    for filler in (random_bytes(8 << 20, seed=11), memory_like(8 << 20, seed=12)):
        assert scanner.scan(plant([], filler)).findings == []


def test_another_keys_renderings_find_nothing(
    scanner: Scanner, plant: Plant, tmp_path: Path
) -> None:
    """Every new rendering of keys the scanner was not given: near misses of the same shape."""
    other = rsa.generate_private_key(65537, 2048)
    other_ec = ec.generate_private_key(ec.SECP256R1())
    items: list[bytes] = []
    for value in (other.private_numbers().d, other_ec.private_numbers().private_value):
        items += [RENDERINGS[r](value, byte_width(value)).data for r in RENDERINGS]
    items.append(openssl_text(other, tmp_path))
    items.append(ssh_keygen_file(other, tmp_path))
    items.append(ppk3(other, b"c", b"\r\n")[0])
    items.append(pkcs8_pem_of(other).decode().encode("utf-16-le"))
    at, placed = 101, []
    for data in items:
        placed.append((at, data))
        at += len(data) + 64
    filler = random_bytes(at + 4096, seed=13)
    assert scanner.scan(plant(placed, filler)).findings == []


def pkcs8_pem_of(key: PrivateKey) -> bytes:
    return key.private_bytes(PEM, PKCS8, NOENC)


def test_near_misses_of_the_layouts_find_nothing(
    scanner: Scanner, keys: Keys, plant: Plant, tmp_path: Path
) -> None:
    """The loaded key in layouts no runtime uses (32-bit words in the wrong order or byte
    order), slices under min_fragment, and its public halves as tools print them."""
    d = keys.rsa2048.private_numbers().d
    w = words(d, 32)
    items = [
        struct.pack(f">{len(w)}I", *w),  # least significant word first, each big-endian
        str(d).encode()[100:138],  # 38 digits: under 16 bytes' worth
        d.to_bytes(256, "big").hex(":").encode()[30 : 30 + 3 * 15 - 1],
        f"{d:x}".encode("utf-16-le")[64 : 64 + 4 * 15],
        ssh_public(keys.rsa2048),
        ssh_public(keys.ed25519),
    ]
    fenced = [b"\xfe" + data + b"\xfe" for data in items]
    # A fixed fence equals the binary form's neighbour byte once in 128 keys and turns the
    # 15-byte slice into a 16-byte match: fence it with the neighbours' complements.
    mag = java_mag(d)
    fenced.append(bytes([mag[39] ^ 0xFF]) + mag[40:55] + bytes([mag[55] ^ 0xFF]))
    at, placed = 101, []
    for data in fenced:
        placed.append((at, data))
        at += len(data) + 64
    assert scanner.scan(plant(placed, random_bytes(at + 4096, seed=14))).findings == []


def ssh_public(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def test_openssh_component_is_deterministic(keys: Keys) -> None:
    """ssh-keygen's check integers are random: the component leaves them out, so the same key
    is the same Secret each time (load_secrets compares equal)."""
    a = secret_from_key(keys.ed25519, "k").components["openssh-key"]
    b = secret_from_key(keys.ed25519, "k").components["openssh-key"]
    assert a == b
    assert secret_from_key(ec.generate_private_key(ec.SECP256K1()), "k").components.keys() == {
        "private_value",
        "sec1-der",
        "pkcs8-der",
    }  # no OpenSSH format for that curve: no component, no error


# --- blind mode: a PEM private key in a UTF-16 string ---------------------------------------


@pytest.fixture(scope="module")
def blind(keys: Keys) -> Scanner:
    return Scanner(
        [],
        public_keys={"rsa": keys.rsa2048.public_key(), "ed": keys.ed25519.public_key()},
        blind_budget_seconds=30,
    )


@pytest.mark.parametrize(
    ("key_id", "fmt", "codec", "representation"),
    [
        ("rsa", PKCS8, "utf-16-le", "utf16-pem-private-key"),
        ("rsa", TRAD, "utf-16-le", "utf16-pem-private-key"),
        ("ed", serialization.PrivateFormat.OpenSSH, "utf-16-le", "utf16-openssh-private"),
        ("rsa", PKCS8, "utf-16-be", "utf16-pem-private-key"),
    ],
)
def test_blind_finds_a_pem_key_in_a_utf16_string(
    blind: Scanner,
    keys: Keys,
    plant: Plant,
    key_id: str,
    fmt: serialization.PrivateFormat,
    codec: str,
    representation: str,
) -> None:
    """A .NET or Java string holding a PEM private key, with only the public key known: loaded
    and verified. Big-endian text is read one byte on, as UTF-16LE: the finding leaves out the
    first character's 0 byte and takes the next character's."""
    key = keys.rsa2048 if key_id == "rsa" else keys.ed25519
    pem = key.private_bytes(PEM, fmt, NOENC).decode().replace("\n", "\r\n")
    data = pem.encode(codec)
    lead = 1 if codec == "utf-16-be" else 0
    result = blind.scan(plant([(AT, data)], memory_like(64 << 10, seed=21)))
    got = [(f.secret_id, f.representation, f.offset, f.length) for f in result.findings]
    end = 2 * (pem.rindex("-----") + 5)
    assert got == [(key_id, representation, AT + lead, end)]
    assert result.findings[0].detail.startswith("verified")


def test_blind_utf16_pem_header_without_a_key_is_unverified(blind: Scanner, plant: Plant) -> None:
    """A UTF-16 PEM private-key header over a body that is not a key: reported as unknown, not
    attributed to a given public key."""
    fake = "-----BEGIN PRIVATE KEY-----\n" + "QUJD" * 40 + "\n-----END PRIVATE KEY-----\n"
    result = blind.scan(plant([(AT, fake.encode("utf-16-le"))], memory_like(64 << 10, seed=22)))
    assert [(f.secret_id, f.representation) for f in result.findings] == [
        ("unknown", "utf16-pem-private-key")
    ]


def test_sarif_rules_describe_the_new_representations() -> None:
    from signer.scan.report import _rule_text

    assert _rule_text("java-mag") == "A key component as a Java BigInteger (int[] mag)"
    assert _rule_text("utf16le-dec") == "Decimal text of a key component, in a UTF-16LE string"
    assert _rule_text("utf16be-pem-crlf").endswith("CRLF line ends, in a UTF-16BE string")
