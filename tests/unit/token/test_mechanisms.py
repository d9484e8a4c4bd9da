"""signer._internal.token._mechanisms: the one table from what signer.keys asks to Mechanism."""

from __future__ import annotations

import pytest
from pkcs11 import Mechanism

from signer._internal.token._mechanisms import (
    KWP_MECHANISMS,
    MECHANISMS,
    RSA_AES_KEY_WRAP,
    mechanism_name,
    required,
    signing,
)
from signer.keys import ALGORITHMS, Family, SignMechanism


def test_every_family_and_sign_mechanism_has_one() -> None:
    assert set(MECHANISMS) == set(Family) | set(SignMechanism)
    assert all(isinstance(m, Mechanism) for m in MECHANISMS.values())


@pytest.mark.parametrize(
    ("family", "names"),
    [
        (Family.EC, ["CKM_EC_KEY_PAIR_GEN", "CKM_ECDSA"]),
        (Family.RSA, ["CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_RSA_PKCS_PSS", "CKM_RSA_PKCS"]),
        (Family.ED25519, ["CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA"]),
    ],
)
def test_what_an_algorithm_needs_by_name(family: Family, names: list[str]) -> None:
    """The names the messages give (and the tests match) for a module that lacks them: the key
    pair generation first, then the signing mechanisms."""
    algs = [a for a in ALGORITHMS.values() if a.family is family]
    assert algs
    for alg in algs:
        assert [mechanism_name(m) for m in required(alg)] == names
        assert required(alg)[0] == MECHANISMS[alg.family]
        assert set(signing(alg)) <= set(required(alg))


def test_names_of_mechanisms_python_pkcs11_does_not_know() -> None:
    assert mechanism_name(RSA_AES_KEY_WRAP) == "CKM_0x00001054"
    assert [mechanism_name(m) for m in KWP_MECHANISMS] == [
        "CKM_AES_KEY_WRAP_KWP",
        "CKM_AES_KEY_WRAP_PAD",
    ]
