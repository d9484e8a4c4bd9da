"""Signatures in two PKCS#11 calls (signer/_internal/token/_direct.py) through the real token
host: every algorithm's signature verifies, RSA PKCS#1 v1.5 is byte for byte python-pkcs11's,
errors come back as python-pkcs11's exceptions, and a connection told not to sign directly
signs as before and says so."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pkcs11.exceptions as p11e
import pytest

from signer._internal.token import Pin, Token
from signer._internal.token._direct import DirectSign
from signer._internal.token._errors import STALE_HANDLE
from signer._internal.token._mechanisms import sign_with
from signer._internal.token._pool import Slot
from signer.keys import Padding, SigFormat, SignMechanism, algorithm, to_be_signed, verify
from tests.conftest import TokenHostHandle

# Each algorithm with each padding it has (EC keys have none: PSS is ignored for them).
CASES = [
    ("ec-p256", Padding.PSS),
    ("ec-p384", Padding.PSS),
    ("ec-p521", Padding.PSS),
    ("rsa-2048", Padding.PSS),
    ("rsa-2048", Padding.PKCS1V15),
]


@pytest.fixture(scope="module")
def token(token_host: TokenHostHandle) -> Iterator[Token]:
    tok = Token(token_host.token_config(sessions=2, lanes=1), Pin(token_host.paths.user_pin))
    tok.start(wait=True)
    yield tok
    tok.close()


def _slot(tok: Token) -> Slot:
    conn = tok._conn
    assert conn is not None
    return conn.slots[0]


def test_the_connection_signs_directly(token: Token) -> None:
    """The probe found python-pkcs11's module instance: every session of the connection
    signs directly (the same DirectSign, so the same function list)."""
    conn = token._conn
    assert conn is not None
    directs = {id(slot.direct) for slot in conn.slots}
    assert _slot(token).direct is not None
    assert len(directs) == 1


@pytest.mark.parametrize(("name", "pad"), CASES)
def test_every_algorithm_signs_directly_and_verifies(
    token: Token, name: str, pad: Padding, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct_calls: list[SignMechanism] = []
    original = DirectSign.sign

    def counted(self: DirectSign, key: Any, mech: SignMechanism, data: bytes | bytearray) -> bytes:
        direct_calls.append(mech)
        return original(self, key, mech, data)

    monkeypatch.setattr(DirectSign, "sign", counted)
    alg = algorithm(name)
    key_id = os.urandom(16)
    public = token.generate(alg, key_id, f"direct-{name}")
    try:
        message = os.urandom(100)
        mech, data = to_be_signed(alg, message, None, pad)
        signature = token.sign(key_id, mech, data)
        assert direct_calls == [mech]  # signed directly, not by python-pkcs11
        fmt = SigFormat.RAW if alg.family.name == "EC" else SigFormat.DER
        assert verify(public, alg, signature, message, None, pad, fmt)
        assert not verify(public, alg, signature, message + b"!", None, pad, fmt)
        if mech is SignMechanism.RSA_PKCS:  # deterministic: the same bytes as python-pkcs11's
            slot = _slot(token)
            key = token._find_private(slot, key_id)
            assert signature == sign_with(key, mech, data)
    finally:
        token.destroy(key_id)


def test_a_token_error_is_python_pkcs11s_exception(token: Token) -> None:
    """A handle the module does not know: the exception python-pkcs11 would raise, which the
    token layer turns into NOT_FOUND after dropping its cached handles."""
    slot = _slot(token)
    direct = slot.direct
    assert direct is not None

    class NoSuchKey:
        session = slot.session
        handle = 0x7FFF_FFF0

    with pytest.raises(STALE_HANDLE):
        direct.sign(NoSuchKey(), SignMechanism.ECDSA, b"\x00" * 32)
    # The session is not left with an operation active: a real signature on the same one.
    alg = algorithm("ec-p256")
    key_id = os.urandom(16)
    token.generate(alg, key_id, "after-error")
    try:
        key = token._find_private(slot, key_id)
        assert len(direct.sign(key, SignMechanism.ECDSA, b"\x01" * 32)) == 64
    finally:
        token.destroy(key_id)


def test_data_too_long_fails_as_it_does_through_python_pkcs11(token: Token) -> None:
    """RSA PKCS#1 v1.5 over more than the modulus holds: the same exception either way (SoftHSM2
    answers CKR_GENERAL_ERROR), and the session signs again after it. (Not a key of one family
    with another's mechanism: SoftHSM2 2.6.1's p11-kit-remote dies on an EC key asked for
    RSA-PSS with a buffer; the service takes the mechanism from the key's algorithm.)"""
    alg = algorithm("rsa-2048")
    key_id = os.urandom(16)
    token.generate(alg, key_id, "too-long")
    try:
        slot = _slot(token)
        direct = slot.direct
        assert direct is not None
        key = token._find_private(slot, key_id)
        raised: list[type[BaseException]] = []
        for sign in (direct.sign, sign_with):
            with pytest.raises(p11e.PKCS11Error) as info:
                sign(key, SignMechanism.RSA_PKCS, b"\x00" * 300)
            raised.append(type(info.value))
        assert raised[0] is raised[1]
        # the same session goes on signing
        assert len(direct.sign(key, SignMechanism.RSA_PKCS_PSS, b"\x02" * 32)) == 256
    finally:
        token.destroy(key_id)


def test_turned_off_the_connection_signs_through_python_pkcs11_and_says_so(
    token_host: TokenHostHandle, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = replace(token_host.token_config(sessions=1, lanes=1), direct_sign=False)
    tok = Token(cfg, Pin(token_host.paths.user_pin))
    with caplog.at_level(logging.INFO, logger="signer.token"):
        tok.start(wait=True)
    try:
        connected = [r for r in caplog.records if r.getMessage() == "token connected"]
        assert [getattr(r, "signing", None) for r in connected] == [
            "turned off (token.direct_sign)"
        ]
        assert _slot(tok).direct is None
        alg = algorithm("ec-p256")
        key_id = os.urandom(16)
        public = tok.generate(alg, key_id, "off")
        try:
            mech, data = to_be_signed(alg, b"m", None, Padding.PSS)
            sig = tok.sign(key_id, mech, data)
            assert verify(public, alg, sig, b"m", None, Padding.PSS, SigFormat.RAW)
        finally:
            tok.destroy(key_id)
    finally:
        tok.close()
