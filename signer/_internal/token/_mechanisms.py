"""The PKCS#11 mechanisms the token layer asks for, as python-pkcs11's ``Mechanism``.

:mod:`signer.keys` says what the token is to do in its own terms: make a key pair of a
:class:`~signer.keys.Family`, sign with a :class:`~signer.keys.SignMechanism`. :data:`MECHANISMS`
is the one table from those to PKCS#11 mechanisms; what the module must offer for an algorithm,
and the call that signs, both read it. Names (``CKM_...``) are made only for messages.
"""

from __future__ import annotations

from typing import Any

import pkcs11
from pkcs11 import Mechanism

from signer.keys import Algorithm, Family, SignMechanism

MECHANISMS: dict[Family | SignMechanism, Mechanism] = {
    Family.EC: Mechanism.EC_KEY_PAIR_GEN,
    Family.RSA: Mechanism.RSA_PKCS_KEY_PAIR_GEN,
    Family.ED25519: Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
    SignMechanism.ECDSA: Mechanism.ECDSA,
    SignMechanism.RSA_PKCS_PSS: Mechanism.RSA_PKCS_PSS,
    SignMechanism.RSA_PKCS: Mechanism.RSA_PKCS,
    SignMechanism.EDDSA: Mechanism.EDDSA,
}

# The parameters of those that take some: PSS over a SHA-256 digest, MGF1-SHA-256, 32-byte salt.
PSS_PARAMS = (Mechanism.SHA256, pkcs11.MGF.SHA256, 32)
_PARAMS: dict[SignMechanism, Any] = {SignMechanism.RSA_PKCS_PSS: PSS_PARAMS}

# --- wrapped import ---------------------------------------------------------------------------

OAEP_SHA1 = (Mechanism.SHA_1, pkcs11.MGF.SHA1, None)
# Mechanisms a wrapping key pair and the one-step scheme need.
ONE_STEP_MECHANISMS = (Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS_OAEP)
# The second step, RFC 5649 key wrap with padding: PKCS#11 3.x calls it CKM_AES_KEY_WRAP_KWP;
# SoftHSM2 2.6.1 offers it as CKM_AES_KEY_WRAP_PAD.
KWP_MECHANISMS = (Mechanism.AES_KEY_WRAP_KWP, Mechanism.AES_KEY_WRAP_PAD)
RSA_AES_KEY_WRAP = 0x00001054  # CKM_RSA_AES_KEY_WRAP, unknown to python-pkcs11 0.10


def mechanism_name(m: int) -> str:
    """``CKM_NAME``, or ``CKM_0x...`` for a mechanism python-pkcs11 has no name for."""
    return f"CKM_{m.name}" if isinstance(m, Mechanism) else f"CKM_0x{int(m):08x}"


def signing(alg: Algorithm) -> tuple[Mechanism, ...]:
    """The mechanisms ``alg``'s keys sign with."""
    return tuple(MECHANISMS[m] for m in alg.sign_mechanisms)


def required(alg: Algorithm) -> tuple[Mechanism, ...]:
    """What the module must offer to make ``alg`` keys and sign with them."""
    return (MECHANISMS[alg.family], *signing(alg))


def sign_with(key: Any, mech: SignMechanism, data: bytes) -> bytes:
    return bytes(key.sign(data, mechanism=MECHANISMS[mech], mechanism_param=_PARAMS.get(mech)))
