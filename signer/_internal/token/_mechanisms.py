"""The PKCS#11 mechanisms the token layer asks for, and their parameters."""

from __future__ import annotations

from typing import Any

import pkcs11
from pkcs11 import Mechanism

from signer.keys import SignMechanism


def mechanism_name(m: Any) -> str:
    return f"CKM_{m.name}" if isinstance(m, Mechanism) else f"CKM_0x{int(m):08x}"


_PSS_SHA256 = (Mechanism.SHA256, pkcs11.MGF.SHA256, 32)


def sign_with(key: Any, mech: SignMechanism, data: bytes) -> bytes:
    if mech is SignMechanism.ECDSA:
        return bytes(key.sign(data, mechanism=Mechanism.ECDSA))
    if mech is SignMechanism.RSA_PKCS_PSS:
        return bytes(key.sign(data, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=_PSS_SHA256))
    if mech is SignMechanism.RSA_PKCS:
        return bytes(key.sign(data, mechanism=Mechanism.RSA_PKCS))
    return bytes(key.sign(data, mechanism=Mechanism.EDDSA))


OAEP_SHA1 = (Mechanism.SHA_1, pkcs11.MGF.SHA1, None)

# Mechanisms a wrapping key pair and the one-step scheme need.
ONE_STEP_MECHANISMS = ("CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_RSA_PKCS_OAEP")

# The second step, RFC 5649 key wrap with padding: PKCS#11 3.x calls it CKM_AES_KEY_WRAP_KWP;
# SoftHSM2 2.6.1 offers it as CKM_AES_KEY_WRAP_PAD.
KWP_MECHANISMS = ("CKM_AES_KEY_WRAP_KWP", "CKM_AES_KEY_WRAP_PAD")

RSA_AES_KEY_WRAP = "CKM_0x00001054"  # CKM_RSA_AES_KEY_WRAP, unknown to python-pkcs11 0.10
