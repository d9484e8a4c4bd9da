"""Every representation of a secret a process could hold, and the sliding windows searched for.

Representations of a number (RSA d, p, q, dP, dQ, qInv; an EC scalar; an Ed25519 seed):

* ``be``: big-endian, minimal and padded to the natural size (modulus, half modulus, field);
* ``le64`` / ``le``: little-endian, as an OpenSSL BIGNUM holds it on x86-64 (64-bit limbs, least
  significant first, so the little-endian bytes padded to a multiple of 8), and unpadded;
* ``cpython30``: a CPython ``int``'s ``ob_digit`` array (uint32 little-endian words of 30 bits);
* ``hex`` / ``HEX``: as printed by ``format(n, 'x')`` and by ``bytes.hex()`` of the padded value;
* ``b64`` / ``b64url``: base64 of the big-endian bytes at each of the 3 byte alignments within a
  longer base64 text, trimmed to the characters the secret alone determines;
* ``jwk``: unpadded base64url of the big-endian value (minimal and padded), as in a JWK.

A whole key (``pkcs1-der``, ``sec1-der``, ``pkcs8-der``) is searched as DER, as ``pem`` (the
base64 body in 64-character lines, without the BEGIN/END lines, so any header matches) and as
base64/base64url at 3 alignments. A PIN is ``utf8``, ``utf16le``, ``utf32le``, ``hex``, ``HEX``,
``b64`` and ``b64url``; a raw secret the same, with ``raw`` for its bytes.

Fragments: a representation is searched as all its windows that carry ``min_fragment`` bytes of
the secret: ``min_fragment`` units for byte forms, twice that for hex and UTF-16, 4/3 for base64,
and so on. Windows of a whole-key encoding that cover only public bytes (the modulus, the curve
parameters, the public point) are left out: a public key in memory is not a leak. The scanner
joins window hits and extends them byte by byte, so a whole representation is recognised from its
windows and a partial one is reported with its exact extent.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

from signer.errors import ScanError
from signer.scan._secrets import MIN_PATTERN, NUMERIC, WHOLE_KEY, Secret

_LINE = 64  # PEM line length as cryptography and OpenSSL write it
_MIN_DISTINCT = 4  # a window of fewer distinct byte values matches filler (zeros, padding)


@dataclass(frozen=True, slots=True)
class Representation:
    """One searched form of one component of one secret."""

    secret: int  # index in the scanner's secret list
    component: str
    name: str
    data: bytes
    window: int  # fragment window length in bytes of ``data``
    starts: tuple[int, ...]  # offsets in ``data`` of the windows searched for


def family(representation: str) -> str:
    """The rule a representation belongs to: 'fragment:be' and 'be' are both 'be'."""
    return representation.removeprefix("fragment:")


# --- encodings --------------------------------------------------------------------------------


def b64_aligned(data: bytes, shift: int, urlsafe: bool) -> tuple[bytes, list[tuple[int, int]]]:
    """Base64 of ``data`` preceded by ``shift`` unknown bytes, trimmed to the characters fully
    determined by ``data``; and, per character, the range of ``data`` bytes it encodes."""
    enc = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(b"\0" * shift + data)
    first = (8 * shift + 5) // 6
    last = (8 * (shift + len(data))) // 6
    src = [((6 * j - 8 * shift) // 8, (6 * j + 5 - 8 * shift) // 8) for j in range(first, last)]
    return enc[first:last], src


def b64url_nopad(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def pem_body(der: bytes) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The base64 lines of a PEM block, and per character the DER bytes it encodes (None for a
    newline; an empty range for '=')."""
    enc = base64.b64encode(der)
    out = bytearray()
    src: list[tuple[int, int] | None] = []
    for j, c in enumerate(enc):
        if j and j % _LINE == 0:
            out += b"\n"
            src.append(None)
        out.append(c)
        lo = 6 * j // 8
        src.append((lo, min((6 * j + 5) // 8, len(der) - 1)) if lo < len(der) else (1, 0))
    return bytes(out), src


def cpython_digits(value: int) -> bytes:
    """The ``ob_digit`` array of a CPython int: 30-bit digits, least significant first."""
    out = bytearray()
    while value:
        out += (value & 0x3FFFFFFF).to_bytes(4, "little")
        value >>= 30
    return bytes(out)


def le64(minimal_be: bytes) -> bytes:
    le = minimal_be[::-1]
    return le + b"\0" * (-len(le) % 8)


# --- representations of one component -------------------------------------------------------

# (name, data, expansion, mask or None); mask: one flag per unit, 1 = derived only from secret
# bytes. Expansion: units of ``data`` per byte of secret, to size the fragment window.
_Form = tuple[str, bytes, Fraction, bytes | None]


def _numeric_forms(padded: bytes) -> Iterator[_Form]:
    minimal = padded.lstrip(b"\0")
    value = int.from_bytes(minimal, "big")
    one, two, b64 = Fraction(1), Fraction(2), Fraction(4, 3)
    yield "be", padded, one, None
    yield "be", minimal, one, None
    yield "le64", le64(minimal), one, None
    yield "le", minimal[::-1], one, None
    yield "cpython30", cpython_digits(value), Fraction(32, 30), None
    for h in (padded.hex(), format(value, "x")):
        yield "hex", h.encode(), two, None
        yield "HEX", h.upper().encode(), two, None
    for urlsafe in (False, True):
        for shift in range(3):
            yield (
                ("b64url" if urlsafe else "b64"),
                b64_aligned(minimal, shift, urlsafe)[0],
                b64,
                None,
            )
    yield "jwk", b64url_nopad(minimal), b64, None
    yield "jwk", b64url_nopad(padded), b64, None


def _text_forms(value: bytes, first: str) -> Iterator[_Form]:
    one, two, four, b64 = Fraction(1), Fraction(2), Fraction(4), Fraction(4, 3)
    yield first, value, one, None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        yield "utf16le", text.encode("utf-16-le"), two, None
        yield "utf32le", text.encode("utf-32-le"), four, None
    yield "hex", value.hex().encode(), two, None
    yield "HEX", value.hex().upper().encode(), two, None
    for urlsafe in (False, True):
        for shift in range(3):
            yield ("b64url" if urlsafe else "b64"), b64_aligned(value, shift, urlsafe)[0], b64, None


def _mask(src: Sequence[tuple[int, int] | None], secret: bytearray) -> bytes:
    """1 where a unit encodes only secret bytes (or is a newline), else 0."""
    return bytes(
        1 if r is None else int(r[0] <= r[1] and all(secret[r[0] : r[1] + 1])) for r in src
    )


def _whole_key_forms(name: str, der: bytes, secret_parts: Sequence[bytes]) -> Iterator[_Form]:
    secret = bytearray(len(der))
    for part in secret_parts:
        at = der.find(part)
        if at >= 0:
            secret[at : at + len(part)] = b"\1" * len(part)
    if not any(secret):
        return
    b64 = Fraction(4, 3)
    yield name, der, Fraction(1), bytes(secret)
    body, src = pem_body(der)
    yield "pem", body, b64, _mask(src, secret)
    for urlsafe in (False, True):
        for shift in range(3):
            text, tsrc = b64_aligned(der, shift, urlsafe)
            yield ("b64url" if urlsafe else "b64"), text, b64, _mask(tsrc, secret)


def _window_starts(data: bytes, window: int, mask: bytes | None) -> tuple[int, ...]:
    starts = []
    run = 0  # secret units in a row ending at i
    for i in range(len(data)):
        run = run + 1 if mask is None or mask[i] else 0
        s = i - window + 1
        if s >= 0 and run >= window and len(set(data[s : i + 1])) >= _MIN_DISTINCT:
            starts.append(s)
    return tuple(starts)


def representations(secret: Secret, index: int, min_fragment: int) -> list[Representation]:
    """Every searched representation of every component of ``secret``."""
    parts = [v.lstrip(b"\0") for c, v in secret.components.items() if c in NUMERIC]
    out: list[Representation] = []
    for comp, value in secret.components.items():
        if comp in NUMERIC:
            forms: Iterator[_Form] = _numeric_forms(value)
        elif comp in WHOLE_KEY:
            forms = _whole_key_forms(comp, value, parts)
        else:
            forms = _text_forms(value, "utf8" if comp == "pin" else "raw")
        seen: set[bytes] = set()
        for name, data, expansion, mask in forms:
            if data in seen or len(data) < MIN_PATTERN:
                continue
            seen.add(data)
            window = min(len(data), math.ceil(min_fragment * expansion))
            starts = _window_starts(data, window, mask)
            if not starts and mask is None:  # not searching would pass for a clean result
                raise ScanError(
                    f"secret {secret.id!r}: component {comp!r} as {name} is too uniform to "
                    f"search for (fewer than {_MIN_DISTINCT} distinct byte values in a window)"
                )
            if starts:
                out.append(Representation(index, comp, name, data, window, starts))
    return out
