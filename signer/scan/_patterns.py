"""Every representation of a secret a process could hold, and the sliding windows searched for.

The dump gate scans other programs' dumps too, so a number is searched as the runtimes and
tools that commonly hold or print keys render it. Representations of a number (RSA d, p, q, dP,
dQ, qInv; an EC scalar; an Ed25519 seed), by the name a finding carries:

* ``be``: big-endian, minimal and padded to the natural size (modulus, half modulus, field);
  also the body of an SSH ``mpint``, a Java ``toByteArray()``, a DER INTEGER;
* ``le64``: little-endian in 64-bit words, least significant first: OpenSSL BIGNUM on 64-bit
  builds, Go ``math/big`` ``nat``, GMP ``mpz_t`` limbs, Rust ``num-bigint``, V8 ``BigInt``;
* ``le32``: the same in 32-bit words: .NET ``BigInteger._bits``, OpenSSL BIGNUM with 32-bit
  ``BN_ULONG``, GMP and Go on 32-bit builds (the same bytes as ``le64`` when the lengths agree);
* ``le``: little-endian, unpadded (.NET ``ToByteArray()``);
* ``java-mag``: a Java ``BigInteger``'s ``int[] mag``: 32-bit words, most significant word first,
  each word little-endian (the JVM's native order on x86-64 and arm64);
* ``cpython30``: a CPython ``int``'s ``ob_digit`` array (uint32 little-endian words of 30 bits);
* ``hex`` / ``HEX``: as printed by ``format(n, 'x')``, Go ``%x``, Java ``toString(16)`` and by
  ``bytes.hex()`` of the padded value;
* ``dec``: decimal, as Python ``str(n)``, Java ``BigInteger.toString()`` and Go ``%v`` print it;
* ``hex-colon``: ``c3:5a:...`` (``bytes.hex(':')``), of the minimal and the padded value;
* ``openssl-text``: ``openssl pkey/rsa/ec -text``: colon hex, 15 bytes a line, each further line
  indented by 4 spaces; a ``00:`` before a number whose top bit is set (RSA), the padded buffer
  as is (EC, Ed25519);
* ``b64`` / ``b64url``: base64 of the big-endian bytes at each of the 3 byte alignments within a
  longer base64 text, trimmed to the characters the secret alone determines;
* ``jwk``: unpadded base64url of the big-endian value (minimal and padded), as in a JWK;
* ``utf16le-X`` / ``utf16be-X``: the text form X (hex, HEX, dec, jwk; b64 and b64url at
  alignment 0: a base64 string of the value itself) as a string of a runtime with two-byte
  characters (Java ``char[]`` and non-compact strings, .NET, V8 two-byte strings, Windows
  APIs; big-endian: Java serialisation, network protocols). UTF-16BE of ASCII text is UTF-16LE
  one byte on: a big-endian finding leaves out the first character's 0 byte, and text followed
  by another character reads as either (the little-endian name is reported).

Latin-1 "compact" strings (Java 9+, V8 one-byte strings, CPython's 1-byte kind) hold text forms
as the same bytes as ASCII: the plain forms find them. CPython keeps a str as UTF-32 only when it
holds a character outside the BMP, which a rendered key never does: UTF-32 is searched for PINs.

A whole key is searched as DER (``pkcs1-der``, ``sec1-der``, ``pkcs8-der``) and as its PEM body
(base64 in 64-character lines, without the BEGIN/END lines, so any header matches), with the
line ends a PEM text commonly has: ``pem`` (LF), ``pem-crlf`` (CRLF, Windows), ``pem-json``
(the two characters backslash-n, a PEM inside a JSON string such as a cloud service-account
key); ``utf16le-pem``/``utf16be-pem`` and the same of ``pem-crlf``; and base64/base64url at 3
alignments. An OpenSSH private key (component ``openssh-key``) is searched as the key fields of
its ``openssh-key-v1`` private section (``openssh-key``: key type, public and private fields; the
random check integers before them and the comment after them are left out) and as the base64 of
those fields in an ``ssh-keygen`` file (``pem``: 70-character lines; 64 as pyca writes them;
and both in UTF-16). A PuTTY ``.ppk`` RSA key's private blob (component ``ppk-private``:
mpints d, p, q, iqmp) is searched as ``ppk-private`` and as its ``Private-Lines``
(``pem``/``pem-crlf``: 64-character lines).

A PIN is ``utf8``, ``latin1`` (a Latin-1 compact string, when the PIN has non-ASCII characters
Latin-1 can hold), ``utf16le``, ``utf16be``, ``utf32le``, ``hex``, ``HEX``, ``b64`` and
``b64url``, and the UTF-16 forms of the last four (base64 at alignment 0); a raw secret the
same, with ``raw`` for its bytes.

Fragments: a representation is searched as all its windows that carry ``min_fragment`` bytes of
the secret: ``min_fragment`` units for byte forms, twice that for hex and UTF-16, 4/3 for base64,
2.41 for decimal, and so on; windows start where a unit starts (a character of UTF-16 text, a
byte's first hex digit of colon hex). Windows of a whole-key encoding that cover only public
bytes (the modulus, the curve parameters, the public point) are left out: a public key in memory
is not a leak.

Cost: the forms added for other runtimes are searched sparsely, so the pattern database grows by
a sixth, not threefold: ``dec``, ``hex-colon``, ``openssl-text``, ``pem-crlf``, ``pem-json`` and
the OpenSSH and PuTTY base64 with a window every half window (a whole rendering is always found,
a fragment from 1.5 x ``min_fragment``; a hit within a line is extended across the other line
ends), the UTF-16 forms with a window every window (fragments from 2 x ``min_fragment``). The
UTF-16 patterns are what costs scan time, and only in memory full of UTF-16 text (README,
"Scanning a dump yourself"). The scanner joins window hits and extends them byte by byte, so a
whole representation is recognised from its windows and a partial one is reported with its
exact extent.
"""

from __future__ import annotations

import base64
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

from signer.errors import ScanError
from signer.scan._secrets import MIN_PATTERN, NUMERIC, WHOLE_KEY, Secret, openssh_fields

_LINE = 64  # PEM line length as cryptography and OpenSSL write it (and PuTTY's .ppk)
_SSH_LINE = 70  # ssh-keygen's line length for OPENSSH PRIVATE KEY
_PEM_ENDS = ((b"\n", "pem"), (b"\r\n", "pem-crlf"), (b"\\n", "pem-json"))
_OPENSSL_PER_LINE = 15  # bytes per line of `openssl pkey -text`
_OPENSSL_BREAK = b":\n    "
_MIN_DISTINCT = 4  # a window of fewer distinct byte values matches filler (zeros, padding)

_ONE, _TWO, _FOUR, _B64 = Fraction(1), Fraction(2), Fraction(4), Fraction(4, 3)
_DEC = Fraction(240824, 100000)  # decimal digits per byte: log10(256), rounded up
_WIDE = (("utf-16-le", "utf16le"), ("utf-16-be", "utf16be"))
_SPARSE = Fraction(1, 2)  # new text forms: whole, and fragments of 1.5 windows
_SPARSER = Fraction(1)  # UTF-16 forms of text forms: whole, and fragments of 2 windows


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


def pem_body(
    der: bytes, line: int = _LINE, eol: bytes = b"\n"
) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The base64 lines of a PEM block (``line`` characters, ended by ``eol``), and per
    character the DER bytes it encodes (None for a line end; an empty range for '=')."""
    enc = base64.b64encode(der)
    out = bytearray()
    src: list[tuple[int, int] | None] = []
    for j, c in enumerate(enc):
        if j and j % line == 0:
            out += eol
            src += [None] * len(eol)
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


def le_words(minimal_be: bytes, word: int) -> bytes:
    """Little-endian words of ``word`` bytes, least significant first (a BIGNUM's limbs)."""
    le = minimal_be[::-1]
    return le + b"\0" * (-len(le) % word)


def le64(minimal_be: bytes) -> bytes:
    return le_words(minimal_be, 8)


def java_mag(minimal_be: bytes) -> bytes:
    """A Java BigInteger's ``int[] mag``: 32-bit words, most significant first (no zero word
    before the first significant one), each in the JVM's native little-endian order."""
    be = b"\0" * (-len(minimal_be) % 4) + minimal_be
    return b"".join(be[i : i + 4][::-1] for i in range(0, len(be), 4))


def colon_hex(data: bytes, per_line: int = 0) -> tuple[bytes, list[int]]:
    """``data`` as lowercase hex pairs joined by ':' (as ``openssl -text`` prints them when
    ``per_line``: ':\\n    ' after every ``per_line``-th byte); and where each pair starts."""
    out = bytearray()
    starts = []
    for i, b in enumerate(data):
        if i:
            out += _OPENSSL_BREAK if per_line and i % per_line == 0 else b":"
        starts.append(len(out))
        out += b"%02x" % b
    return bytes(out), starts


# --- representations of one component -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Form:
    name: str
    data: bytes
    expansion: Fraction  # units of ``data`` per byte of secret, to size the fragment window
    mask: bytes | None = None  # one flag per unit: 1 = derived only from secret bytes
    starts: Sequence[int] | None = None  # where windows may start (None: anywhere)
    window: int | None = None  # a window fixed by the form (then ``expansion`` is not used)
    spacing: Fraction = Fraction(0)  # windows every this many windows (0: at every start)


def _wide(form: _Form, codec: str, prefix: str) -> _Form:
    """An ASCII text form as a string of two-byte characters, searched sparsely.

    UTF-16BE of ASCII text is UTF-16LE one byte earlier: the big-endian form leaves out its
    first byte (the first character's 0) and is then the little-endian form less its last 0,
    with the same windows, so it costs no pattern. Text in either order matches both forms;
    the one whose ends fit is reported (in little-endian text the big-endian match lies inside
    the little-endian one and is dropped)."""
    data = form.data.decode("ascii").encode(codec)
    unit = len(data) // len(form.data)
    mask = None if form.mask is None else bytes(m for m in form.mask for _ in range(unit))
    if codec == "utf-16-be":
        data, mask = data[1:], None if mask is None else mask[:-1]
    return _Form(
        f"{prefix}-{form.name}",
        data,
        form.expansion * unit,
        mask,
        range(0, len(data), unit) if form.starts is None else [unit * s for s in form.starts],
        None if form.window is None else unit * form.window,
        spacing=_SPARSER,
    )


def _colon_forms(padded: bytes, minimal: bytes, min_fragment: int) -> Iterator[_Form]:
    """``hex-colon`` and ``openssl-text``: windows start at a byte's first hex digit and hold
    ``min_fragment`` bytes whatever the line breaks inside them."""
    for raw in (minimal, padded):
        text, starts = colon_hex(raw)
        yield _Form("hex-colon", text, Fraction(3), None, starts, 3 * min_fragment - 1, _SPARSE)
    # print_labeled_bignum (RSA): minimal, '00' first when the top bit is set; the padded
    # buffer as is (EC and Ed25519 private keys).
    for raw, lead in ((minimal, minimal[0] >= 0x80), (padded, False)):
        text, starts = colon_hex(b"\0" + raw if lead else raw, _OPENSSL_PER_LINE)
        if lead:
            starts = starts[1:]  # a window from the '00' would hold one byte too few
        k = min(min_fragment, len(starts))
        window = max(starts[i + k - 1] + 2 - starts[i] for i in range(len(starts) - k + 1))
        yield _Form("openssl-text", text, Fraction(3), None, starts, window, _SPARSE)


def _numeric_forms(padded: bytes, min_fragment: int) -> Iterator[_Form]:
    minimal = padded.lstrip(b"\0")
    value = int.from_bytes(minimal, "big")
    yield _Form("be", padded, _ONE)
    yield _Form("be", minimal, _ONE)
    yield _Form("le64", le_words(minimal, 8), _ONE)
    yield _Form("le32", le_words(minimal, 4), _ONE)
    yield _Form("le", minimal[::-1], _ONE)
    yield _Form("java-mag", java_mag(minimal), _ONE)
    yield _Form("cpython30", cpython_digits(value), Fraction(32, 30))
    text: list[_Form] = []
    for h in (padded.hex(), format(value, "x")):
        text.append(_Form("hex", h.encode(), _TWO))
        text.append(_Form("HEX", h.upper().encode(), _TWO))
    text.append(_Form("dec", str(value).encode(), _DEC, spacing=_SPARSE))
    first_b64 = set()
    for urlsafe in (False, True):
        for shift in range(3):
            name = "b64url" if urlsafe else "b64"
            text.append(_Form(name, b64_aligned(minimal, shift, urlsafe)[0], _B64))
            if shift == 0:
                first_b64.add(text[-1].data)
    text.append(_Form("jwk", b64url_nopad(minimal), _B64))
    text.append(_Form("jwk", b64url_nopad(padded), _B64))
    yield from text
    yield from _colon_forms(padded, minimal, min_fragment)
    # Two-byte strings of the value's own texts: base64 at alignment 0 only (a base64 string of
    # the value; a key's base64 inside a longer text is its PEM, searched as UTF-16 too).
    wide = [f for f in text if not f.name.startswith("b64") or f.data in first_b64]
    for codec, prefix in _WIDE:
        for form in wide:
            yield _wide(form, codec, prefix)


def _text_forms(value: bytes, first: str) -> Iterator[_Form]:
    yield _Form(first, value, _ONE)
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        if max(map(ord, text), default=0) < 0x100:
            # A Latin-1 compact string (Java, V8, CPython): not UTF-8 when not ASCII.
            yield _Form("latin1", text.encode("latin-1"), _ONE)
        for codec, name, unit in (
            ("utf-16-le", "utf16le", 2),
            ("utf-16-be", "utf16be", 2),
            ("utf-32-le", "utf32le", 4),
        ):
            # UTF-16BE without its first byte: see _wide.
            data = text.encode(codec)[1 if codec == "utf-16-be" else 0 :]
            yield _Form(name, data, Fraction(unit), None, range(0, len(data), unit))
    forms = [
        _Form("hex", value.hex().encode(), _TWO),
        _Form("HEX", value.hex().upper().encode(), _TWO),
    ]
    for urlsafe in (False, True):
        for shift in range(3):
            name = "b64url" if urlsafe else "b64"
            forms.append(_Form(name, b64_aligned(value, shift, urlsafe)[0], _B64))
    yield from forms
    for codec, prefix in _WIDE:
        for form in forms[:4]:  # hex, HEX, base64 and base64url at alignment 0
            yield _wide(form, codec, prefix)


def _mask(src: Sequence[tuple[int, int] | None], secret: bytearray) -> bytes:
    """1 where a unit encodes only secret bytes (or is a line end), else 0."""
    return bytes(
        1 if r is None else int(r[0] <= r[1] and all(secret[r[0] : r[1] + 1])) for r in src
    )


def _secret_map(blob: bytes, secret_parts: Sequence[bytes]) -> bytearray:
    secret = bytearray(len(blob))
    for part in secret_parts:
        at = blob.find(part)
        if at >= 0:
            secret[at : at + len(part)] = b"\1" * len(part)
    return secret


def _pem_forms(
    blob: bytes,
    secret: bytearray,
    line: int,
    ends: Sequence[tuple[bytes, str]],
    wide: bool,
    spacing: Fraction = Fraction(0),
) -> Iterator[_Form]:
    for eol, name in ends:
        body, src = pem_body(blob, line, eol)
        # Only the first line end of the list is searched densely: the others' windows within
        # a line are its windows, and a hit there is extended across their line ends.
        first = eol == ends[0][0]
        form = _Form(name, body, _B64, _mask(src, secret), spacing=spacing if first else _SPARSE)
        yield form
        if wide and eol != b"\\n":
            for codec, prefix in _WIDE:
                yield _wide(form, codec, prefix)


def _whole_key_forms(name: str, der: bytes, secret_parts: Sequence[bytes]) -> Iterator[_Form]:
    secret = _secret_map(der, secret_parts)
    if not any(secret):
        return
    yield _Form(name, der, _ONE, bytes(secret))
    if name == "ppk-private":
        yield from _pem_forms(der, secret, _LINE, _PEM_ENDS[:2], False, spacing=_SPARSE)
        return
    yield from _pem_forms(der, secret, _LINE, _PEM_ENDS, True)
    for urlsafe in (False, True):
        for shift in range(3):
            text, tsrc = b64_aligned(der, shift, urlsafe)
            yield _Form("b64url" if urlsafe else "b64", text, _B64, _mask(tsrc, secret))


def _openssh_forms(blob: bytes, secret_parts: Sequence[bytes]) -> Iterator[_Form]:
    """The key fields of an ``openssh-key-v1`` blob, and their base64 in ssh-keygen's lines:
    only the characters the fields alone determine (the check integers before them are random,
    the comment after them is the owner's). The fields are taken with the two 0 bytes that
    begin the comment's length (any comment under 64 KiB): the base64 character across the
    last field's end is then the key's too (a base64 form of the last number, whose last
    character those 0 bits complete, would otherwise be a second finding beside the key)."""
    lo, hi = openssh_fields(blob)
    hi = min(len(blob), hi + 2)
    secret = _secret_map(blob, secret_parts)
    secret[:lo] = bytes(lo)
    if not any(secret):
        return
    yield _Form("openssh-key", blob[lo:hi], _ONE, bytes(secret[lo:hi]))
    for line in (_SSH_LINE, _LINE):  # ssh-keygen's lines; cryptography's (pyca) are 64 long
        body, src = pem_body(blob, line)
        inside = [j for j, r in enumerate(src) if r is not None and lo <= r[0] <= r[1] < hi]
        a, b = inside[0], inside[-1] + 1
        form = _Form("pem", body[a:b], _B64, _mask(src[a:b], secret), spacing=_SPARSE)
        yield form
        for codec, prefix in _WIDE:
            yield _wide(form, codec, prefix)


def _window_starts(
    data: bytes,
    window: int,
    mask: bytes | None,
    allowed: Sequence[int] | None,
    spacing: Fraction,
) -> tuple[int, ...]:
    """Where windows of ``window`` units start: at an allowed start, covering only secret units
    (mask), with enough distinct byte values; with a ``spacing``, about every ``spacing``
    windows and the last one (a whole occurrence is always hit, and a fragment of 1 +
    ``spacing`` windows)."""
    secret = None if mask is None else list(itertools.accumulate(mask, initial=0))

    def fits(s: int) -> bool:
        e = s + window
        whole = secret is None or secret[e] - secret[s] == window
        return whole and len(set(data[s:e])) >= _MIN_DISTINCT

    last = len(data) - window
    candidates = range(last + 1) if allowed is None else [s for s in allowed if s <= last]
    if not spacing:
        return tuple(s for s in candidates if fits(s))
    step = max(1, int(window * spacing))
    out: list[int] = []
    for s in candidates:
        if (not out or s - out[-1] >= step) and fits(s):
            out.append(s)
    end = next((s for s in reversed(candidates) if fits(s)), None)
    if end is not None and out[-1] != end:
        out.append(end)
    return tuple(out)


def representations(secret: Secret, index: int, min_fragment: int) -> list[Representation]:
    """Every searched representation of every component of ``secret``."""
    parts = [v.lstrip(b"\0") for c, v in secret.components.items() if c in NUMERIC]
    out: list[Representation] = []
    for comp, value in secret.components.items():
        if comp in NUMERIC:
            forms: Iterator[_Form] = _numeric_forms(value, min_fragment)
        elif comp == "openssh-key":
            forms = _openssh_forms(value, parts)
        elif comp in WHOLE_KEY:
            forms = _whole_key_forms(comp, value, parts)
        else:
            forms = _text_forms(value, "utf8" if comp == "pin" else "raw")
        seen: set[bytes] = set()
        for form in forms:
            data = form.data
            if data in seen or len(data) < MIN_PATTERN:
                continue
            seen.add(data)
            window = min(len(data), form.window or math.ceil(min_fragment * form.expansion))
            allowed = [0] if window == len(data) else form.starts
            starts = _window_starts(data, window, form.mask, allowed, form.spacing)
            if not starts and form.mask is None:  # not searching would pass for a clean result
                raise ScanError(
                    f"secret {secret.id!r}: component {comp!r} as {form.name} is too uniform "
                    f"to search for (fewer than {_MIN_DISTINCT} distinct byte values in a "
                    "window)"
                )
            if starts:
                out.append(Representation(index, comp, form.name, data, window, starts))
    return out
