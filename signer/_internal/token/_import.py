"""Wrapped key import, and adoption of a key provisioned at the token host.

The wrapping key pair is RSA-4096, generated here, its private half able to unwrap and nothing
else. The token unwraps (C_UnwrapKey) straight into a private, sensitive, non-extractable token
object; this process only ever holds the opaque blob. One step is CKM_RSA_PKCS_OAEP (SHA-1,
MGF1-SHA-1, no label: the only OAEP hash SoftHSM2 2.6.1 accepts) of the PKCS#8, enough for EC
keys. RSA keys need two steps: OAEP-unwrap an AES-256 session key, CKM_AES_KEY_WRAP_PAD-unwrap the
PKCS#8 with it, destroy it. Debian's p11-kit 0.24.1 does not carry CKM_AES_KEY_WRAP_PAD (nor
CKM_RSA_AES_KEY_WRAP), so the mechanism list decides, and RSA import is FAILED_PRECONDITION there.
SoftHSM2 does not give an unwrapped EC key a CKA_EC_POINT, so the caller's public key is taken
only after a challenge signed in the token verifies with it. Any failure after C_UnwrapKey
destroys the new object before answering.

Adoption (``signer keys adopt``) takes over a private key an administrator put in the token
(``softhsm2-util --import``): checked as strictly, and never destroyed.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from signer._internal.token._errors import UNWRAP_ERRORS, map_errors
from signer._internal.token._mechanisms import (
    KWP_MECHANISMS,
    MECHANISMS,
    OAEP_SHA1,
    ONE_STEP_MECHANISMS,
    RSA_AES_KEY_WRAP,
    mechanism_name,
    sign_with,
    signing,
)
from signer._internal.token._objects import (
    KEY_TYPES,
    PRIVATE_TEMPLATE,
    TRANSPORT_KEY_TEMPLATE,
    WRAPPING_PRIVATE_TEMPLATE,
    WRAPPING_PUBLIC_TEMPLATE,
    flag,
    object_kind,
    one,
    public_of_private,
    search,
    spki,
    spki_rsa,
)
from signer._internal.token._pool import SessionPool
from signer.errors import FailedPrecondition, InvalidArgument, NotFound, SignerError
from signer.keys import (
    Algorithm,
    Family,
    Padding,
    SigFormat,
    algorithm_kind,
    load_public_key,
    public_key_kind,
    to_be_signed,
    verify,
    with_article,
)

log = logging.getLogger("signer.token")  # named for the component: signer._internal.logs

WRAPPING_KEY_BITS = 4096
# What an RSA import lacks when the module offers no key wrap with padding, by name.
_PAD = mechanism_name(Mechanism.AES_KEY_WRAP_PAD)


class WrappedImport(SessionPool):
    """The session pool's wrapped key import and key adoption (see the module's docstring)."""

    @property
    def two_step_mechanism(self) -> str | None:
        """The key-wrap-with-padding mechanism of the two-step scheme, or None if not offered."""
        two_step = self._two_step()
        return None if two_step is None else mechanism_name(two_step)

    def _two_step(self) -> Mechanism | None:
        have = self.mechanisms
        if not all(m in have for m in ONE_STEP_MECHANISMS):
            return None
        return next((m for m in KWP_MECHANISMS if m in have), None)

    def require_wrapping(self) -> None:
        """FAILED_PRECONDITION unless the module can make a wrapping key and unwrap with it."""
        missing = [mechanism_name(m) for m in ONE_STEP_MECHANISMS if m not in self.mechanisms]
        if missing:
            raise FailedPrecondition(
                f"wrapped key import is not available: the PKCS#11 module "
                f"({Path(self._cfg.module).name}) does not offer {', '.join(missing)}"
            )

    def missing_import_mechanisms(self, alg: Algorithm) -> list[str]:
        have = self.mechanisms
        wanted = (*ONE_STEP_MECHANISMS, *signing(alg))
        missing = [mechanism_name(m) for m in wanted if m not in have]
        if alg.family is Family.RSA and not any(m in have for m in KWP_MECHANISMS):
            missing.append(_PAD)
        return missing

    def require_import(self, alg: Algorithm) -> None:
        """FAILED_PRECONDITION naming what the module lacks to import ``alg`` keys."""
        missing = self.missing_import_mechanisms(alg)
        if not missing:
            return
        module = Path(self._cfg.module).name
        if _PAD in missing:
            offers = (
                "offers CKM_RSA_AES_KEY_WRAP only, and this service unwraps the two steps "
                "itself with CKM_AES_KEY_WRAP_PAD"
                if RSA_AES_KEY_WRAP in self.mechanisms
                else "offers neither"
            )
            raise FailedPrecondition(
                f"importing {alg.name} keys is not available: an RSA private key is too large "
                "for one RSA-OAEP block, so its import needs a two-step wrapping scheme "
                f"(CKM_RSA_AES_KEY_WRAP or CKM_AES_KEY_WRAP_PAD), and the PKCS#11 module "
                f"({module}) {offers}"
            )
        raise FailedPrecondition(
            f"importing {alg.name} keys is not available: the PKCS#11 module ({module}) "
            f"does not offer {', '.join(missing)}"
        )

    def generate_wrapping_key(self, key_id: bytes, label: str) -> bytes:
        """An RSA-4096 wrapping key pair in the token; returns its public half (SPKI DER)."""
        self.require_wrapping()
        with self._session() as slot:
            pub, _ = slot.session.generate_keypair(
                KeyType.RSA,
                WRAPPING_KEY_BITS,
                id=key_id,
                label=label,
                store=True,
                capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                mechanism=MECHANISMS[Family.RSA],
                public_template=dict(WRAPPING_PUBLIC_TEMPLATE),
                private_template=dict(WRAPPING_PRIVATE_TEMPLATE),
            )
            return spki_rsa(pub)

    def unwrap_private(
        self,
        wrapping_key_id: bytes,
        blob: bytes,
        alg: Algorithm,
        key_id: bytes,
        label: str,
        public_der: bytes | None,
    ) -> bytes:
        """Unwraps ``blob`` into a new signing key object; returns its public key (SPKI DER).

        The new object is checked before this returns: its key type and curve must be ``alg``'s,
        and its public key (from the token, else ``public_der``) must verify a challenge it signs.
        Whatever fails, no new object is left behind.
        """
        self.require_import(alg)
        with self._session() as slot:
            s = slot.session
            wanted = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: wrapping_key_id}
            wrapping = one(
                search(s, wanted),
                lambda: FailedPrecondition(
                    "the import token's wrapping key is no longer in the token; "
                    "call GetImportParameters for a new import token"
                ),
            )
            obj = self._unwrap(s, wrapping, blob, alg, key_id, label)
            try:
                public = self._checked_public(obj, alg, public_der)
            except BaseException:
                self._destroy_quietly(s, key_id, obj)
                raise
            slot.keys[key_id] = obj
            return public

    def adopt(self, alg: Algorithm, key_id: bytes) -> bytes:
        """Takes over a private key provisioned at the token host (``softhsm2-util --import``).

        Refuses an object that is not a token, private, sensitive, non-extractable signing key of
        ``alg``'s type; turns off CKA_DECRYPT, CKA_UNWRAP and CKA_DERIVE (softhsm2-util sets
        them on RSA keys); proves the public key (from the public object of the same CKA_ID, else
        the private object) with a challenge signed in the token, and returns it (SPKI DER).
        Never destroys anything: the object is the administrator's.
        """
        missing = [mechanism_name(m) for m in signing(alg) if m not in self.mechanisms]
        if missing:
            raise FailedPrecondition(
                f"algorithm {alg.name} cannot sign: the PKCS#11 module "
                f"({Path(self._cfg.module).name}) does not offer {', '.join(missing)}"
            )
        where = f"the private key object with id {key_id.hex()}"
        with self._session() as slot:
            s = slot.session
            priv = one(
                search(s, {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}),
                lambda: NotFound(f"no private key object with id {key_id.hex()} in the token"),
            )
            kind = object_kind(priv)
            if kind != algorithm_kind(alg):
                raise InvalidArgument(f"{where} is {with_article(kind)} key, not {alg.name}")
            required = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
            }
            weak = [f"CKA_{a.name}={priv[a]}" for a, want in required.items() if priv[a] != want]
            if weak:
                raise FailedPrecondition(
                    f"{where} has {', '.join(weak)}; the service keeps only token, private, "
                    "sensitive, non-extractable signing keys"
                )
            for attr in (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE):
                if flag(priv, attr):
                    priv[attr] = False
            pubs = search(s, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id})
            public = spki(alg, pubs[0]) if len(pubs) == 1 else public_of_private(priv, alg)
            if public is None:
                raise FailedPrecondition(
                    f"{where} has no public key object beside it, and the token does not reveal "
                    "its public key: import the key pair with its public key"
                )
            mismatch = FailedPrecondition(
                f"the public key object with id {key_id.hex()} does not match the private key"
            )
            self._prove(priv, alg, public, mismatch)
            slot.keys[key_id] = priv
            return public

    def relabel(self, key_id: bytes, label: str) -> None:
        """Sets CKA_LABEL on every object with this CKA_ID (an adopted key pair becomes NAME/v1,
        which the key version's PKCS#11 URI names)."""
        with self._session() as slot:
            for obj in search(slot.session, {Attribute.ID: key_id}):
                obj[Attribute.LABEL] = label

    def _unwrap(
        self, s: Any, wrapping: Any, blob: bytes, alg: Algorithm, key_id: bytes, label: str
    ) -> Any:
        k = len(bytes(wrapping[Attribute.MODULUS]))
        key_type = KEY_TYPES[alg.family]
        template = dict(PRIVATE_TEMPLATE)
        two_step = self._two_step()
        # Not only through the table: the caller's wrapped key is the likely cause (see _errors).
        kind = with_article(algorithm_kind(alg))
        refused = functools.partial(map_errors, UNWRAP_ERRORS, kind=kind)
        if len(blob) == k:
            with refused(), self._nothing_left_on_failure(s, key_id):
                return wrapping.unwrap_key(
                    ObjectClass.PRIVATE_KEY,
                    key_type,
                    blob,
                    id=key_id,
                    label=label,
                    mechanism=Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=OAEP_SHA1,
                    store=True,
                    capabilities=MechanismFlag.SIGN,
                    template=template,
                )
        if len(blob) > k and two_step is not None:
            transport = None
            try:
                with refused(), self._nothing_left_on_failure(s, key_id):
                    transport = wrapping.unwrap_key(
                        ObjectClass.SECRET_KEY,
                        KeyType.AES,
                        blob[:k],
                        mechanism=Mechanism.RSA_PKCS_OAEP,
                        mechanism_param=OAEP_SHA1,
                        store=False,
                        capabilities=MechanismFlag.UNWRAP,
                        template=dict(TRANSPORT_KEY_TEMPLATE),
                    )
                    return transport.unwrap_key(
                        ObjectClass.PRIVATE_KEY,
                        key_type,
                        blob[k:],
                        id=key_id,
                        label=label,
                        mechanism=two_step,
                        store=True,
                        capabilities=MechanismFlag.SIGN,
                        template=template,
                    )
            finally:
                if transport is not None:
                    self._quietly(transport.destroy)
        block = f"one RSA-OAEP-SHA1 block under the import token's {k * 8}-bit wrapping key"
        if len(blob) > k:
            raise InvalidArgument(
                f"wrapped_key is {len(blob)} bytes, but this token unwraps only {block} "
                f"({k} bytes): it offers no two-step scheme"
            )
        raise InvalidArgument(
            f"wrapped_key is {len(blob)} bytes; {block} is exactly {k} bytes"
            + (", the two-step scheme more" if two_step is not None else "")
        )

    @contextmanager
    def _nothing_left_on_failure(self, s: Any, key_id: bytes) -> Iterator[None]:
        """A failed C_UnwrapKey ends with whatever it may have left gone.

        A module can leave a half-made object behind on a failure (SoftHSM2 2.6.1 does when a
        template attribute is refused), so every failure ends with a search by the new CKA_ID.
        """
        try:
            yield
        except BaseException:
            self._destroy_quietly(s, key_id)
            raise

    def _checked_public(self, obj: Any, alg: Algorithm, public_der: bytes | None) -> bytes:
        kind, want = object_kind(obj), algorithm_kind(alg)
        if kind != want:
            raise InvalidArgument(f"wrapped key is {with_article(kind)} key, not {alg.name}")
        given: bytes | None = None
        if public_der:
            try:
                key = load_public_key(public_der)
            except (ValueError, TypeError):
                raise InvalidArgument("public_key_der is not a DER SubjectPublicKeyInfo") from None
            if public_key_kind(key) != want:
                raise InvalidArgument(
                    f"public_key_der is {with_article(public_key_kind(key))} key, not {alg.name}"
                )
            given = key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        from_token = public_of_private(obj, alg)
        if from_token is not None and given is not None and from_token != given:
            raise InvalidArgument("public_key_der does not match the wrapped key")
        public = from_token or given
        if public is None:
            raise InvalidArgument(
                f"public_key_der is required: the token does not reveal the public key of an "
                f"unwrapped {alg.name} key"
            )
        self._prove(
            obj, alg, public, InvalidArgument("public_key_der does not match the wrapped key")
        )
        return public

    @staticmethod
    def _prove(obj: Any, alg: Algorithm, public: bytes, mismatch: SignerError) -> None:
        """The key in the token signs a random challenge; ``public`` must verify it."""
        challenge = secrets.token_bytes(32)
        mech, data = to_be_signed(alg, challenge, None, Padding.PSS)
        signature = sign_with(obj, mech, data)
        if not verify(public, alg, signature, challenge, None, Padding.PSS, SigFormat.RAW):
            raise mismatch

    def _destroy_quietly(self, s: Any, key_id: bytes, obj: Any = None) -> None:
        """Destroys ``obj`` and anything else with ``key_id``, whatever the token says."""
        if obj is not None:
            self._quietly(obj.destroy)
        try:
            for other in search(s, {Attribute.ID: key_id}):
                self._quietly(other.destroy)
        except p11e.PKCS11Error as exc:
            log.error(
                "could not check for a half-made key object", extra={"error": type(exc).__name__}
            )
