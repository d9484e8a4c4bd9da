"""The token as the service uses it: :class:`Token`.

:class:`Token` is built in layers, each in its own module: the connection, its session pool and
the health monitor (:mod:`._pool`); wrapped key import and adoption (:mod:`._import`); signing
keys (here). Object templates and key encodings are in :mod:`._objects`, the mechanisms in
:mod:`._mechanisms`, and what PKCS#11 errors mean in :mod:`._errors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

from signer._internal.token._import import WrappedImport
from signer._internal.token._mechanisms import MECHANISMS, mechanism_name, required, sign_with
from signer._internal.token._objects import (
    CURVE_OIDS,
    PRIVATE_TEMPLATE,
    PUBLIC_TEMPLATE,
    TokenObject,
    described,
    object_kind,
    one,
    public_of_private,
    search,
    spki,
)
from signer._internal.token._pool import Slot
from signer.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from signer.keys import Algorithm, Family, SignMechanism, algorithm_kind


def _sign_on(slot: Slot, key: Any, mech: SignMechanism, data: bytes) -> bytes:
    """Two PKCS#11 calls where the connection allows it (:mod:`._direct`), else python-pkcs11's."""
    if slot.direct is not None and slot.direct.covers(mech, key):
        return slot.direct.sign(key, mech, data)
    return sign_with(key, mech, data)


class Token(WrappedImport):
    """A logged-in PKCS#11 token with a session pool; thread-safe. Its connection, session pool
    and health monitor: :class:`SessionPool`; wrapped import and adoption:
    :class:`WrappedImport`; here, the signing keys' life: generate, sign, destroy, list."""

    def missing_mechanisms(self, alg: Algorithm) -> list[str]:
        have = self.mechanisms
        return [mechanism_name(m) for m in required(alg) if m not in have]

    def require(self, alg: Algorithm) -> None:
        """FAILED_PRECONDITION naming the mechanisms the module lacks for ``alg``."""
        missing = self.missing_mechanisms(alg)
        if missing:
            raise FailedPrecondition(
                f"algorithm {alg.name} is not available: the PKCS#11 module "
                f"({Path(self._cfg.module).name}) does not offer {', '.join(missing)}"
            )

    # --- operations ---------------------------------------------------------------------------

    def generate(self, alg: Algorithm, key_id: bytes, label: str) -> bytes:
        """Generates a key pair in the token; returns the public key as SubjectPublicKeyInfo DER."""
        self.require(alg)
        priv_t = dict(PRIVATE_TEMPLATE)
        pub_t = dict(PUBLIC_TEMPLATE)
        caps = MechanismFlag.SIGN | MechanismFlag.VERIFY
        with self._session() as slot:
            s = slot.session
            if alg.family is Family.RSA:
                pub, priv = s.generate_keypair(
                    KeyType.RSA,
                    alg.bits,
                    id=key_id,
                    label=label,
                    store=True,
                    capabilities=caps,
                    public_template=pub_t,
                    private_template=priv_t,
                    mechanism=MECHANISMS[alg.family],
                )
            else:
                curve = alg.curve if alg.family is Family.EC else "ed25519"
                assert curve is not None
                pub_t[Attribute.EC_PARAMS] = CURVE_OIDS[curve]
                key_type = KeyType.EC if alg.family is Family.EC else KeyType.EC_EDWARDS
                pub, priv = s.generate_keypair(
                    key_type,
                    id=key_id,
                    label=label,
                    store=True,
                    capabilities=caps,
                    public_template=pub_t,
                    private_template=priv_t,
                    mechanism=MECHANISMS[alg.family],
                )
            slot.keys[key_id] = priv
            return spki(alg, pub)

    def sign(self, key_id: bytes, mech: SignMechanism, data: bytes) -> bytes:
        with self._session() as slot:
            key = slot.keys.get(key_id)
            if key is None:
                key = self._find_private(slot, key_id)
            return _sign_on(slot, key, mech, data)

    def sign_many(self, key_id: bytes, jobs: list[tuple[SignMechanism, bytes]]) -> list[bytes]:
        """Several signatures with one key on one borrowed session (inputs already checked:
        a token error fails them all, translated like any other)."""
        with self._session() as slot:
            key = slot.keys.get(key_id)
            if key is None:
                key = self._find_private(slot, key_id)
            return [_sign_on(slot, key, mech, data) for mech, data in jobs]

    def destroy(self, key_id: bytes) -> int:
        """Destroys every object with this CKA_ID; returns how many there were."""
        with self._session() as slot:
            objs = search(slot.session, {Attribute.ID: key_id})
            for obj in objs:
                obj.destroy()
            conn = self._conn
            if conn is not None:
                for other in conn.slots:
                    other.keys.pop(key_id, None)
            return len(objs)

    def exists(self, key_id: bytes) -> bool:
        with self._session() as slot:
            return bool(search(slot.session, {Attribute.ID: key_id}))

    # --- reconciliation with the store (signer keys reconcile, issue 12) -----------------------

    def objects(self) -> list[TokenObject]:
        """Every token object the user can see (session objects left out), by CKA_ID, label
        and class: what ``signer keys reconcile`` compares with the store. An object destroyed
        while it is read (by a running service) is left out."""
        found = []
        with self._session() as slot:
            for obj in search(slot.session, {Attribute.TOKEN: True}):
                try:
                    found.append(described(obj))
                except p11e.ObjectHandleInvalid:
                    continue
        return found

    def holds_private_half(self, key_id: bytes, alg: Algorithm, public_der: bytes) -> bool:
        """Whether the one private key object with this CKA_ID is of ``alg``'s kind and the
        private half of ``public_der``: the public key the token shows for it (its public key
        object's, else its own attributes') is that one; where the token shows none (an
        unwrapped EC key on SoftHSM2) it signs a random challenge that ``public_der``
        verifies. The challenge's signature never leaves this method."""
        with self._session() as slot:
            s = slot.session
            priv = one(
                search(s, {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}),
                lambda: NotFound(f"no private key object with id {key_id.hex()} in the token"),
            )
            if object_kind(priv) != algorithm_kind(alg):
                return False
            pubs = search(s, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id})
            shown = public_of_private(pubs[0] if len(pubs) == 1 else priv, alg)
            if shown is not None:
                return shown == public_der
            try:
                self._prove(priv, alg, public_der, InvalidArgument("mismatch"))
            except InvalidArgument:
                return False
            return True

    # --- internals ----------------------------------------------------------------------------

    def _find_private(self, slot: Slot, key_id: bytes) -> Any:
        found = search(
            slot.session, {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}
        )
        if not found:
            raise NotFound(f"no private key object with id {key_id.hex()} in the token")
        if len(found) > 1:
            raise Internal(f"{len(found)} private key objects share id {key_id.hex()}")
        slot.keys[key_id] = found[0]
        return found[0]
