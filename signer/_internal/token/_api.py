"""The token as the rest of the service uses it: :class:`TokenAPI`.

The keyring, the import tokens, the servicer and ``signer keys reconcile`` are written against
this Protocol, not against :class:`~signer._internal.token.Token`: the unit tests' software
token (``tests/unit/fakes.py``) is then type-checked to be one. What only the assembly does
(start, close, wake, the availability and abandon listeners) stays on the concrete class.
"""

from __future__ import annotations

from typing import Protocol

from signer._internal.token._objects import TokenObject
from signer.keys import Algorithm, SignMechanism


class TokenAPI(Protocol):
    """What the service asks of its token. Every call may raise :class:`signer.errors.Unavailable`
    (the token is down, or not answering) besides the errors each names."""

    @property
    def label(self) -> str:
        """The token's label, as object URIs name it."""
        ...

    @property
    def available(self) -> bool:
        """Whether the token is connected and answering."""
        ...

    def check_answering(self) -> None:
        """UNAVAILABLE at once while the token host is connected but not answering."""
        ...

    # --- signing keys -------------------------------------------------------------------------

    def missing_mechanisms(self, alg: Algorithm) -> list[str]:
        """The names of the mechanisms the module lacks to make and use ``alg`` keys."""
        ...

    def require(self, alg: Algorithm) -> None:
        """FAILED_PRECONDITION naming the mechanisms the module lacks for ``alg``."""
        ...

    def generate(self, alg: Algorithm, key_id: bytes, label: str) -> bytes:
        """A new key pair in the token; its public key (SubjectPublicKeyInfo DER)."""
        ...

    def sign(self, key_id: bytes, mech: SignMechanism, data: bytes) -> bytes:
        """The token's signature (NOT_FOUND: no private key object with this CKA_ID)."""
        ...

    def sign_many(self, key_id: bytes, jobs: list[tuple[SignMechanism, bytes]]) -> list[bytes]:
        """Several signatures with one key, in order."""
        ...

    def destroy(self, key_id: bytes) -> int:
        """Destroys every object with this CKA_ID; how many there were."""
        ...

    def objects(self) -> list[TokenObject]:
        """Every token object the user can see."""
        ...

    def holds_private_half(self, key_id: bytes, alg: Algorithm, public_der: bytes) -> bool:
        """Whether the private key object with this CKA_ID is ``alg``'s and ``public_der``'s."""
        ...

    # --- wrapped import and adoption ----------------------------------------------------------

    @property
    def two_step_mechanism(self) -> str | None:
        """The name of the two-step scheme's key wrap, or None if the module offers none."""
        ...

    def require_wrapping(self) -> None:
        """FAILED_PRECONDITION unless the module can make a wrapping key and unwrap with it."""
        ...

    def missing_import_mechanisms(self, alg: Algorithm) -> list[str]:
        """The names of the mechanisms the module lacks to import ``alg`` keys."""
        ...

    def require_import(self, alg: Algorithm) -> None:
        """FAILED_PRECONDITION naming what the module lacks to import ``alg`` keys."""
        ...

    def generate_wrapping_key(self, key_id: bytes, label: str) -> bytes:
        """A new wrapping key pair; its public half (SubjectPublicKeyInfo DER)."""
        ...

    def unwrap_private(
        self,
        wrapping_key_id: bytes,
        blob: bytes,
        alg: Algorithm,
        key_id: bytes,
        label: str,
        public_der: bytes | None,
    ) -> bytes:
        """``blob`` unwrapped into a new, checked signing key object; its public key."""
        ...

    def adopt(self, alg: Algorithm, key_id: bytes) -> bytes:
        """Takes over a private key provisioned at the token host; its proven public key."""
        ...

    def relabel(self, key_id: bytes, label: str) -> None:
        """Sets CKA_LABEL on every object with this CKA_ID."""
        ...
