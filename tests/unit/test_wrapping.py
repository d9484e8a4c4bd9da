"""signer.wrapping, the caller's side of a wrapped import: keys in (PEM of every form the
service takes), PKCS#8 out, wrapped so that only the holder of the wrapping key's private half
(the token; here, cryptography standing in for it) gets the key back. The token's side and the
service's rules are in tests/unit/keyring/test_imports.py and tests/integration/test_import.py."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from signer import wrapping
from signer.errors import InvalidArgument

PEM, DER = serialization.Encoding.PEM, serialization.Encoding.DER
PKCS8, TRAD = serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
NOENC = serialization.NoEncryption()


@functools.cache
def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def wrapping_pem(bits: int = 4096) -> bytes:
    """The public half of a wrapping key, as GetImportParameters gives it (RSA-4096 there)."""
    return rsa_key(bits).public_key().public_bytes(PEM, SPKI)


def unwrap(blob: bytes, bits: int = 4096) -> bytes:
    """The token's side, in software: one OAEP block, or OAEP of an AES key then RFC 5649."""
    key, k = rsa_key(bits), bits // 8
    if len(blob) == k:
        return key.decrypt(blob, wrapping.oaep_sha1())
    aes = key.decrypt(blob[:k], wrapping.oaep_sha1())
    assert len(aes) == wrapping.AES_KEY_BYTES
    return aes_key_unwrap_with_padding(aes, blob[k:])


KEYS: dict[str, Callable[[], wrapping.PrivateKeyType]] = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ec-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa-2048": lambda: rsa_key(2048),
    "rsa-3072": lambda: rsa_key(3072),
}


# --- the round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KEYS))
def test_a_wrapped_key_unwraps_to_the_same_key(name: str) -> None:
    key = KEYS[name]()
    der = wrapping.pkcs8_der(key)
    blob = wrapping.wrap(der, wrapping_pem())
    assert der not in blob
    assert unwrap(blob) == der
    back = serialization.load_der_private_key(unwrap(blob), None)
    assert back.public_key().public_bytes(DER, SPKI) == wrapping.public_der(key)


@pytest.mark.parametrize(
    ("name", "scheme"),
    [
        ("ec-p256", wrapping.ONE_STEP),
        ("ec-p384", wrapping.ONE_STEP),
        ("ec-p521", wrapping.ONE_STEP),  # 241 bytes: one RSA-4096 block holds 470
        ("ed25519", wrapping.ONE_STEP),
        ("rsa-2048", wrapping.TWO_STEP),  # an RSA key never fits one block
        ("rsa-3072", wrapping.TWO_STEP),
    ],
)
def test_under_rsa_4096_every_ec_key_takes_one_block_and_no_rsa_key_does(
    name: str, scheme: str
) -> None:
    der = wrapping.pkcs8_der(KEYS[name]())
    assert wrapping.scheme_for(len(der), wrapping_pem()) == scheme
    blob = wrapping.wrap(der, wrapping_pem())
    assert (len(blob) == 512) == (scheme == wrapping.ONE_STEP)


@pytest.mark.parametrize("bits", [2048, 4096])
def test_the_schemes_meet_at_one_blocks_capacity(bits: int) -> None:
    """Not only keys: any PKCS#8-sized payload up to k - 42 bytes is one block, one byte more
    is the two-step layout: the RSA block of a 32-byte AES key, then RFC 5649 (8 bytes more
    than the payload rounded up to 8)."""
    k = bits // 8
    capacity = wrapping.one_step_capacity(k)
    assert capacity == k - 42
    for size in (1, capacity - 1, capacity):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert wrapping.scheme_for(size, wrapping_pem(bits)) == wrapping.ONE_STEP
        blob = wrapping.wrap(payload, wrapping_pem(bits))
        assert len(blob) == k
        assert unwrap(blob, bits) == payload
    for size in (capacity + 1, capacity + 8, 3000):
        payload = b"\x30" * size
        assert wrapping.scheme_for(size, wrapping_pem(bits)) == wrapping.TWO_STEP
        blob = wrapping.wrap(payload, wrapping_pem(bits))
        assert len(blob) == k + 8 * -(-size // 8) + 8
        assert unwrap(blob, bits) == payload


def test_wrapping_is_randomised_and_takes_the_pem_as_text_or_bytes() -> None:
    der = wrapping.pkcs8_der(KEYS["rsa-2048"]())
    as_text = wrapping.wrap(der, wrapping_pem().decode("ascii"))
    as_bytes = wrapping.wrap(der, wrapping_pem())
    assert as_text != as_bytes  # a fresh OAEP seed and a fresh AES key each time
    assert unwrap(as_text) == unwrap(as_bytes) == der
    one = wrapping.pkcs8_der(KEYS["ec-p256"]())
    assert wrapping.wrap(one, wrapping_pem()) != wrapping.wrap(one, wrapping_pem())


def test_one_block_holds_470_bytes_under_rsa_4096() -> None:
    assert wrapping.one_step_capacity(512) == 470
    assert wrapping.one_step_capacity(256) == 214


@pytest.mark.parametrize(
    ("make", "scheme"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), wrapping.ONE_STEP),  # 138 bytes
        (lambda: ec.generate_private_key(ec.SECP384R1()), wrapping.ONE_STEP),  # 185 bytes
        (lambda: ec.generate_private_key(ec.SECP521R1()), wrapping.TWO_STEP),  # 241 > 214
        (lambda: ed25519.Ed25519PrivateKey.generate(), wrapping.ONE_STEP),
        (lambda: rsa_key(2048), wrapping.TWO_STEP),
    ],
)
def test_wrap_round_trips_in_the_scheme_that_fits(
    make: Callable[[], wrapping.PrivateKeyType], scheme: str
) -> None:
    """Under an RSA-2048 wrapping key, whose one block holds 214 bytes."""
    key = make()
    der = wrapping.pkcs8_der(key)
    assert wrapping.scheme_for(len(der), wrapping_pem(2048).decode()) == scheme
    blob = wrapping.wrap(der, wrapping_pem(2048).decode())
    assert (len(blob) == 256) == (scheme == wrapping.ONE_STEP)
    assert unwrap(blob, 2048) == der
    assert der not in blob
    # Randomised: wrapping twice gives two different blobs.
    assert wrapping.wrap(der, wrapping_pem(2048).decode()) != blob


# --- PKCS#8 and the forms a key comes in ------------------------------------------------------


@pytest.mark.parametrize("name", list(KEYS))
def test_pkcs8_der_is_the_unencrypted_pkcs8_of_the_key(name: str) -> None:
    key = KEYS[name]()
    der = wrapping.pkcs8_der(key)
    assert der == key.private_bytes(DER, PKCS8, NOENC)
    assert der[0] == 0x30  # a DER SEQUENCE: PrivateKeyInfo
    back = serialization.load_der_private_key(der, None)
    assert back.public_key().public_bytes(DER, SPKI) == wrapping.public_der(key)


@pytest.mark.parametrize("name", list(KEYS))
def test_pem_in_each_form_gives_the_same_pkcs8(name: str) -> None:
    """PKCS#8, and the traditional forms (PKCS#1 for RSA, SEC1 for EC), all load to one key."""
    key = KEYS[name]()
    forms = [PKCS8] if name == "ed25519" else [PKCS8, TRAD]
    for form in forms:
        loaded = wrapping.load_private_key_pem(key.private_bytes(PEM, form, NOENC))
        assert type(loaded) is type(key)
        assert wrapping.pkcs8_der(loaded) == wrapping.pkcs8_der(key)


def test_an_encrypted_pem_needs_its_password_and_the_error_never_shows_it() -> None:
    key = KEYS["ec-p384"]()
    encrypted = key.private_bytes(PEM, PKCS8, serialization.BestAvailableEncryption(b"hunter2"))
    for password in (None, b"guessed-0"):
        with pytest.raises(InvalidArgument, match="missing or wrong password") as exc:
            wrapping.load_private_key_pem(encrypted, password)
        assert "hunter2" not in str(exc.value)
        assert "guessed-0" not in str(exc.value)
    loaded = wrapping.load_private_key_pem(encrypted, b"hunter2")
    assert wrapping.pkcs8_der(loaded) == wrapping.pkcs8_der(key)


# --- refusals ----------------------------------------------------------------------------------


UNSUPPORTED: dict[str, Callable[[], PrivateKeyTypes]] = {
    "DSAPrivateKey": lambda: dsa.generate_private_key(2048),
    "X448PrivateKey": x448.X448PrivateKey.generate,
    "Ed448PrivateKey": ed448.Ed448PrivateKey.generate,
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_keys_of_other_kinds_are_refused_by_name(kind: str) -> None:
    pem = UNSUPPORTED[kind]().private_bytes(PEM, PKCS8, NOENC)
    with pytest.raises(InvalidArgument, match=f"^{kind} keys cannot be imported: use EC, RSA"):
        wrapping.load_private_key_pem(pem)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a key",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 64 + b"\n",  # cut short
        wrapping_pem(2048),  # a public key where a private one belongs
        KEYS["ec-p256"]().private_bytes(DER, PKCS8, NOENC),  # DER, not PEM
    ],
    ids=["empty", "text", "short-body", "truncated", "public-key", "der"],
)
def test_what_is_not_a_pem_private_key_is_refused_without_quoting_it(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"^not a PEM private key") as exc:
        wrapping.load_private_key_pem(data)
    assert exc.value.__cause__ is None  # the parser's own message (which may quote) is dropped
    assert exc.value.__suppress_context__


def test_a_key_that_is_refused_does_not_leak_into_the_refusal() -> None:
    der = KEYS["ec-p256"]().private_bytes(DER, PKCS8, NOENC)
    with pytest.raises(InvalidArgument) as exc:
        wrapping.load_private_key_pem(der)
    assert str(exc.value) == (
        "not a PEM private key, or an encrypted one with a missing or wrong password"
    )


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        (b"", "not a PEM public key"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
        (KEYS["ec-p256"]().private_bytes(PEM, PKCS8, NOENC), "not a PEM public key"),
        (KEYS["ec-p256"]().public_key().public_bytes(PEM, SPKI), "not an RSA key"),
        (ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(PEM, SPKI), "not an RSA"),
    ],
    ids=["empty", "bad-body", "private-key", "ec-key", "ed25519-key"],
)
def test_a_wrapping_key_that_is_not_an_rsa_public_key_is_refused(
    pem: str | bytes, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=f"^the wrapping public key is {message}"):
        wrapping.load_wrapping_key(pem)
    with pytest.raises(InvalidArgument, match=message):
        wrapping.wrap(b"\x30\x00", pem)  # nothing is wrapped for a key that is not one
    with pytest.raises(InvalidArgument, match=message):
        wrapping.scheme_for(2, pem)


def test_the_wrapping_key_loads_from_text_and_bytes() -> None:
    as_bytes = wrapping.load_wrapping_key(wrapping_pem())
    as_text = wrapping.load_wrapping_key(wrapping_pem().decode("ascii"))
    assert (
        as_bytes.public_numbers()
        == as_text.public_numbers()
        == rsa_key(4096).public_key().public_numbers()
    )


def test_private_keys_that_cannot_be_imported() -> None:
    with pytest.raises(InvalidArgument, match="not a PEM private key"):
        wrapping.load_private_key_pem(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(InvalidArgument, match="missing or wrong password") as exc:
        wrapping.load_private_key_pem(encrypted)
    assert "secret" not in str(exc.value)
    assert isinstance(
        wrapping.load_private_key_pem(encrypted, b"secret"), ec.EllipticCurvePrivateKey
    )
    with pytest.raises(InvalidArgument, match="X25519PrivateKey keys cannot be imported"):
        wrapping.load_private_key_pem(
            x25519.X25519PrivateKey.generate().private_bytes(PEM, PKCS8, NOENC)
        )
    with pytest.raises(InvalidArgument, match="not an RSA key"):
        wrapping.load_wrapping_key(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
