"""The PKCS#11 client: the one place in the service that calls the token.

Session and lock policy (issue #2, "concurrency, correctly")
------------------------------------------------------------
* One module instance (one ``C_Initialize``), logged in once, with a fixed pool of read-write
  sessions. Each session is used by one thread at a time: a thread borrows it from a queue for one
  operation and gives it back. No session is ever shared between threads, so two threads never
  run ``C_FindObjectsInit`` or ``C_SignInit`` on the same session (the cause of the GeneralError
  seen when threads shared a session).
* python-pkcs11 calls ``C_Initialize(NULL)``: no locking callbacks, no ``CKF_OS_LOCKING_OK``. A
  module is then entitled to assume it is called from one thread at a time; SoftHSM2 takes that
  literally and disables its mutexes (the in-process segfault with 4 threads). p11-kit's client
  locks internally whatever the flags, so the pool is concurrent for it; for any other module the
  pool has one session and every call is serialised (``token.thread_safe`` overrides this).
* Object handles are looked up once per (session, key) and cached on the session: no object
  search per signature. A reconnect starts with empty caches, because handles are only valid
  within the connection (each p11-kit connection is served by its own ``p11-kit-remote``).
* A lost token host (DeviceError and friends) marks the connection down at once, so calls fail
  fast with UNAVAILABLE; a monitor thread reconnects, logs in again and flips health back.

Wrapped key import
------------------
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
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import _pkcs11 as _p11

from signer._internal.config import TokenConfig
from signer._internal.token._errors import (
    ATTRIBUTE_UNREADABLE,
    CONNECTION_LOST,
    PIN_REFUSED,
    STALE_HANDLE,
    UNWRAP_ERRORS,
    map_errors,
)
from signer._internal.token._logins import LoginGuard
from signer._internal.token.pin import Pin
from signer._internal.token.uri import TokenURI
from signer.errors import (
    ConfigError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LoginRefused,
    NotFound,
    SignerError,
    Unavailable,
)
from signer.keys import (
    ALGORITHMS,
    Algorithm,
    Family,
    Padding,
    SigFormat,
    SignMechanism,
    algorithm_kind,
    load_public_key,
    public_key_kind,
    to_be_signed,
    verify,
    with_article,
)

log = logging.getLogger(__name__)

# DER-encoded OIDs for CKA_EC_PARAMS.
_CURVE_OIDS = {
    "secp256r1": bytes.fromhex("06082a8648ce3d030107"),
    "secp384r1": bytes.fromhex("06052b81040022"),
    "secp521r1": bytes.fromhex("06052b81040023"),
    "ed25519": bytes.fromhex("06032b6570"),
}
_CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
}

_PSS_SHA256 = (Mechanism.SHA256, pkcs11.MGF.SHA256, 32)

# Attributes of every private key we create. Why each matters: TOKEN persists it; PRIVATE makes
# SoftHSM2 encrypt it at rest and demand a login; SENSITIVE and EXTRACTABLE=false keep its value
# inside the token for good (and make ALWAYS_SENSITIVE/NEVER_EXTRACTABLE true).
_PRIVATE_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
    # python-pkcs11 may fill these public-key attributes in, which SoftHSM2 rejects on a private
    # key (CKR_ATTRIBUTE_TYPE_INVALID); DEFAULT drops them from the template.
    Attribute.ENCRYPT: pkcs11.DEFAULT,
    Attribute.VERIFY: pkcs11.DEFAULT,
    Attribute.WRAP: pkcs11.DEFAULT,
}
_PUBLIC_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}


# --- wrapped import ---------------------------------------------------------------------------

WRAPPING_KEY_BITS = 4096
# The wrapping key pair: the private half unwraps and does nothing else, and never leaves.
_WRAPPING_PRIVATE_TEMPLATE: dict[Attribute, Any] = {
    **_PRIVATE_TEMPLATE,
    Attribute.SIGN: False,
    Attribute.UNWRAP: True,
}
_WRAPPING_PUBLIC_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: False,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}
# The two-step scheme's AES key: a session object that can only unwrap, destroyed after one use.
_TRANSPORT_KEY_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.UNWRAP: True,
    Attribute.WRAP: False,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}
_OAEP_SHA1 = (Mechanism.SHA_1, pkcs11.MGF.SHA1, None)
# Mechanisms a wrapping key pair and the one-step scheme need.
_ONE_STEP_MECHANISMS = ("CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_RSA_PKCS_OAEP")
# The second step, RFC 5649 key wrap with padding: PKCS#11 3.x calls it CKM_AES_KEY_WRAP_KWP;
# SoftHSM2 2.6.1 offers it as CKM_AES_KEY_WRAP_PAD.
_KWP_MECHANISMS = ("CKM_AES_KEY_WRAP_KWP", "CKM_AES_KEY_WRAP_PAD")
_RSA_AES_KEY_WRAP = "CKM_0x00001054"  # CKM_RSA_AES_KEY_WRAP, unknown to python-pkcs11 0.10
_KEY_TYPES = {Family.EC: KeyType.EC, Family.RSA: KeyType.RSA, Family.ED25519: KeyType.EC_EDWARDS}
_CURVE_KINDS = {
    _CURVE_OIDS["secp256r1"]: "P-256",
    _CURVE_OIDS["secp384r1"]: "P-384",
    _CURVE_OIDS["secp521r1"]: "P-521",
}
# Ed25519's CKA_EC_PARAMS: the OID, or (PKCS#11 3.0) the curve name as a PrintableString.
_ED25519_PARAMS = (_CURVE_OIDS["ed25519"], b"\x13\x0cedwards25519")


def mechanism_name(m: Any) -> str:
    return f"CKM_{m.name}" if isinstance(m, Mechanism) else f"CKM_0x{int(m):08x}"


@dataclass
class _Slot:
    """One pooled session and the private-key objects already found on it: at most
    ``_KEYS_PER_SESSION``, the least recently used going first (the soak: the administrative
    connection's sessions kept a handle for every key, import and wrapping key they ever made,
    about 3 KB each, since destruction runs on the other connection)."""

    session: Any
    keys: _Handles = field(default_factory=lambda: _Handles(_KEYS_PER_SESSION))


_KEYS_PER_SESSION = 256
# A dead connection's calls fail at once (its socket is gone): a session not back this long
# after is held by a thread stuck in the module for good (see Token._abandon_dead).
ABANDON_AFTER_SECONDS = 5.0


class _Handles(OrderedDict[bytes, Any]):
    """A dict of key handles that keeps its ``most`` most recently used."""

    def __init__(self, most: int) -> None:
        super().__init__()
        self.most = most

    def get(self, key: bytes, default: Any = None) -> Any:
        found = super().get(key, default)
        if found is not default:
            self.move_to_end(key)
        return found

    def __setitem__(self, key: bytes, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.most:
            self.popitem(last=False)


@dataclass
class _Connection:
    token: Any
    slots: list[_Slot]
    free: queue.Queue[_Slot]
    mechanisms: frozenset[str]
    label: str


class Token:
    """A logged-in PKCS#11 token with a session pool; thread-safe.

    ``follows``: another connection to the same token; this one logs in only while that one is
    up. A second connection (the service's administrative one) then never adds failed logins
    of its own to an HSM that counts them and locks the user out after a few."""

    def __init__(self, cfg: TokenConfig, pin: Pin, follows: Token | None = None) -> None:
        self._cfg = cfg
        self._pin = pin
        self._follows = follows
        self._uri = TokenURI.parse(cfg.uri)
        self._pool_size = cfg.sessions if cfg.concurrent else 1
        self._lib: Any = None
        self._conn: _Connection | None = None
        # A connection marked down whose sessions may still be in a thread's hands.
        self._dead: _Connection | None = None
        self._dead_since = 0.0
        # Module instances given up with their connection (see _abandon_dead): kept, never
        # finalized or freed, since a thread is still inside them.
        self._abandoned: list[tuple[Any, _Connection]] = []
        self._down_reason = "not connected to the token yet"
        self._state_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._abandon_listeners: list[Callable[[float], None]] = []
        stamp = pin.stamp  # what tells an operator's new file from the one that was refused
        self._logins = LoginGuard(cfg.max_failed_logins, cfg.pin_file, stamp)
        # Failed connection attempts in a row: the monitor backs off between them.
        self._connect_failures = 0
        self._checks = 0
        # A health check that has not come back, and whether it has been out too long.
        self._ping: _Ping | None = None
        self._stalled = False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, wait: bool = False) -> None:
        """Connects (or keeps trying in the background) and starts the health monitor."""
        if self._cfg.server_address:
            # p11-kit-client.so reads its server address from the environment when initialised.
            os.environ["P11_KIT_SERVER_ADDRESS"] = self._cfg.server_address
        if not Path(self._cfg.module).exists():
            raise FailedPrecondition(f"PKCS#11 module not found: {self._cfg.module}")
        self._try_connect()
        if wait and self._conn is None:
            raise self._why_down()
        self._monitor = threading.Thread(
            target=self._run_monitor, name="token-monitor", daemon=True
        )
        self._monitor.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        with self._state_lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                self._drain(conn)
                for slot in conn.slots:
                    self._quietly(slot.session.close)
            if self._lib is not None:
                self._quietly(self._lib.finalize)
        self._pin.wipe()

    def wake(self) -> None:
        """Checks the connection (or tries to make it) now rather than at the next interval."""
        self._wake.set()

    def on_abandon(self, listener: Callable[[float], None]) -> None:
        """``listener(since)`` is called when a dead connection is given up with calls stuck
        in it (see :meth:`_abandon_dead`); ``since``: when it died (time.monotonic())."""
        self._abandon_listeners.append(listener)

    def on_availability(self, listener: Callable[[bool], None]) -> None:
        """``listener(True/False)`` is called whenever the token becomes reachable or not."""
        self._listeners.append(listener)

    @property
    def available(self) -> bool:
        return self._conn is not None and not self._stalled

    @property
    def checks(self) -> int:
        """How many times the monitor has looked at the connection (or tried to make it)."""
        return self._checks

    @property
    def failed_logins(self) -> int:
        """Failed logins in a row (see :mod:`signer._internal.token._logins`)."""
        return self._logins.failures

    def check_answering(self) -> None:
        """UNAVAILABLE while the token host is connected but not answering. For a call about
        to queue for a thread that would only wait on the token with the calls already stuck
        there (threads, sessions, callers' deadlines): fail fast instead, until it answers
        again. (A token that is down makes calls fail fast by itself.)"""
        if self._stalled:
            raise Unavailable(
                "token unavailable: the token host has not answered a health check for more "
                f"than {self._cfg.stall_seconds:g} s"
            )

    def _why_down(self) -> SignerError:
        """What a call meets while there is no connection: FAILED_PRECONDITION when the PIN is
        the problem (waiting will not cure it), else UNAVAILABLE."""
        refusal = self._logins.refusal
        if refusal is not None:
            return LoginRefused(refusal)
        return Unavailable(f"token unavailable: {self._down_reason}")

    @property
    def label(self) -> str:
        conn = self._conn
        return conn.label if conn is not None else (self._uri.token or "")

    @property
    def mechanisms(self) -> frozenset[str]:
        conn = self._conn
        if conn is None:
            raise self._why_down()
        return conn.mechanisms

    def missing_mechanisms(self, alg: Algorithm) -> list[str]:
        have = self.mechanisms
        return [m for m in alg.required_mechanisms if m not in have]

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
        priv_t = dict(_PRIVATE_TEMPLATE)
        pub_t = dict(_PUBLIC_TEMPLATE)
        caps = MechanismFlag.SIGN | MechanismFlag.VERIFY
        with self._session() as slot:
            s = slot.session
            if alg.family is Family.RSA:
                pub, priv = s.generate_keypair(
                    KeyType.RSA, alg.bits, id=key_id, label=label, store=True,
                    capabilities=caps, public_template=pub_t, private_template=priv_t,
                )  # fmt: skip
            else:
                curve = alg.curve if alg.family is Family.EC else "ed25519"
                assert curve is not None
                pub_t[Attribute.EC_PARAMS] = _CURVE_OIDS[curve]
                key_type = KeyType.EC if alg.family is Family.EC else KeyType.EC_EDWARDS
                pub, priv = s.generate_keypair(
                    key_type, id=key_id, label=label, store=True, capabilities=caps,
                    public_template=pub_t, private_template=priv_t,
                )  # fmt: skip
            slot.keys[key_id] = priv
            return _spki(alg, pub)

    def sign(self, key_id: bytes, mech: SignMechanism, data: bytes) -> bytes:
        with self._session() as slot:
            key = slot.keys.get(key_id)
            if key is None:
                key = self._find_private(slot, key_id)
            return _sign_with(key, mech, data)

    def sign_many(self, key_id: bytes, jobs: list[tuple[SignMechanism, bytes]]) -> list[bytes]:
        """Several signatures with one key on one borrowed session (inputs already checked:
        a token error fails them all, translated like any other)."""
        with self._session() as slot:
            key = slot.keys.get(key_id)
            if key is None:
                key = self._find_private(slot, key_id)
            return [_sign_with(key, mech, data) for mech, data in jobs]

    def destroy(self, key_id: bytes) -> int:
        """Destroys every object with this CKA_ID; returns how many there were."""
        with self._session() as slot:
            objs = _search(slot.session, {Attribute.ID: key_id})
            for obj in objs:
                obj.destroy()
            conn = self._conn
            if conn is not None:
                for other in conn.slots:
                    other.keys.pop(key_id, None)
            return len(objs)

    def exists(self, key_id: bytes) -> bool:
        with self._session() as slot:
            return bool(_search(slot.session, {Attribute.ID: key_id}))

    def count_objects(self) -> int:
        """How many objects the logged-in user can see, token and session objects alike."""
        with self._session() as slot:
            return len(_search(slot.session, {}))

    # --- reconciliation with the store (signer keys reconcile, issue 12) -----------------------

    def objects(self) -> list[TokenObject]:
        """Every token object the user can see (session objects left out), by CKA_ID, label
        and class: what ``signer keys reconcile`` compares with the store. An object destroyed
        while it is read (by a running service) is left out."""
        found = []
        with self._session() as slot:
            for obj in _search(slot.session, {Attribute.TOKEN: True}):
                try:
                    found.append(_described(obj))
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
            priv = _one(
                _search(s, {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}),
                lambda: NotFound(f"no private key object with id {key_id.hex()} in the token"),
            )
            if _object_kind(priv) != algorithm_kind(alg):
                return False
            pubs = _search(s, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id})
            shown = _public_of_private(pubs[0] if len(pubs) == 1 else priv, alg)
            if shown is not None:
                return shown == public_der
            try:
                self._prove(priv, alg, public_der, InvalidArgument("mismatch"))
            except InvalidArgument:
                return False
            return True

    # --- wrapped import -----------------------------------------------------------------------

    @property
    def two_step_mechanism(self) -> str | None:
        """The key-wrap-with-padding mechanism of the two-step scheme, or None if not offered."""
        have = self.mechanisms
        if not all(m in have for m in _ONE_STEP_MECHANISMS):
            return None
        return next((m for m in _KWP_MECHANISMS if m in have), None)

    def require_wrapping(self) -> None:
        """FAILED_PRECONDITION unless the module can make a wrapping key and unwrap with it."""
        missing = [m for m in _ONE_STEP_MECHANISMS if m not in self.mechanisms]
        if missing:
            raise FailedPrecondition(
                f"wrapped key import is not available: the PKCS#11 module "
                f"({Path(self._cfg.module).name}) does not offer {', '.join(missing)}"
            )

    def missing_import_mechanisms(self, alg: Algorithm) -> list[str]:
        have = self.mechanisms
        missing = [m for m in (*_ONE_STEP_MECHANISMS, *alg.sign_mechanisms) if m not in have]
        if alg.family is Family.RSA and not any(m in have for m in _KWP_MECHANISMS):
            missing.append("CKM_AES_KEY_WRAP_PAD")
        return missing

    def require_import(self, alg: Algorithm) -> None:
        """FAILED_PRECONDITION naming what the module lacks to import ``alg`` keys."""
        missing = self.missing_import_mechanisms(alg)
        if not missing:
            return
        module = Path(self._cfg.module).name
        if "CKM_AES_KEY_WRAP_PAD" in missing:
            offers = (
                "offers CKM_RSA_AES_KEY_WRAP only, and this service unwraps the two steps "
                "itself with CKM_AES_KEY_WRAP_PAD"
                if _RSA_AES_KEY_WRAP in self.mechanisms
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
                KeyType.RSA, WRAPPING_KEY_BITS, id=key_id, label=label, store=True,
                capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                public_template=dict(_WRAPPING_PUBLIC_TEMPLATE),
                private_template=dict(_WRAPPING_PRIVATE_TEMPLATE),
            )  # fmt: skip
            return _spki_rsa(pub)

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
            wrapping = _one(
                _search(s, wanted),
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
        missing = [m for m in alg.sign_mechanisms if m not in self.mechanisms]
        if missing:
            raise FailedPrecondition(
                f"algorithm {alg.name} cannot sign: the PKCS#11 module "
                f"({Path(self._cfg.module).name}) does not offer {', '.join(missing)}"
            )
        where = f"the private key object with id {key_id.hex()}"
        with self._session() as slot:
            s = slot.session
            priv = _one(
                _search(s, {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}),
                lambda: NotFound(f"no private key object with id {key_id.hex()} in the token"),
            )
            kind = _object_kind(priv)
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
                if _flag(priv, attr):
                    priv[attr] = False
            pubs = _search(s, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id})
            public = _spki(alg, pubs[0]) if len(pubs) == 1 else _public_of_private(priv, alg)
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
            for obj in _search(slot.session, {Attribute.ID: key_id}):
                obj[Attribute.LABEL] = label

    def _unwrap(
        self, s: Any, wrapping: Any, blob: bytes, alg: Algorithm, key_id: bytes, label: str
    ) -> Any:
        k = len(bytes(wrapping[Attribute.MODULUS]))
        key_type = _KEY_TYPES[alg.family]
        template = dict(_PRIVATE_TEMPLATE)
        two_step = self.two_step_mechanism
        # Not only through the table: the caller's wrapped key is the likely cause (see _errors).
        kind = with_article(algorithm_kind(alg))
        refused = functools.partial(map_errors, UNWRAP_ERRORS, kind=kind)
        if len(blob) == k:
            with refused(), self._nothing_left_on_failure(s, key_id):
                return wrapping.unwrap_key(
                    ObjectClass.PRIVATE_KEY, key_type, blob, id=key_id, label=label,
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1,
                    store=True, capabilities=MechanismFlag.SIGN, template=template,
                )  # fmt: skip
        if len(blob) > k and two_step is not None:
            transport = None
            try:
                with refused(), self._nothing_left_on_failure(s, key_id):
                    transport = wrapping.unwrap_key(
                        ObjectClass.SECRET_KEY, KeyType.AES, blob[:k],
                        mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_SHA1,
                        store=False, capabilities=MechanismFlag.UNWRAP,
                        template=dict(_TRANSPORT_KEY_TEMPLATE),
                    )  # fmt: skip
                    return transport.unwrap_key(
                        ObjectClass.PRIVATE_KEY, key_type, blob[k:], id=key_id, label=label,
                        mechanism=Mechanism[two_step.removeprefix("CKM_")],
                        store=True, capabilities=MechanismFlag.SIGN, template=template,
                    )  # fmt: skip
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
        kind, want = _object_kind(obj), algorithm_kind(alg)
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
        from_token = _public_of_private(obj, alg)
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
        signature = _sign_with(obj, mech, data)
        if not verify(public, alg, signature, challenge, None, Padding.PSS, SigFormat.RAW):
            raise mismatch

    def _destroy_quietly(self, s: Any, key_id: bytes, obj: Any = None) -> None:
        """Destroys ``obj`` and anything else with ``key_id``, whatever the token says."""
        if obj is not None:
            self._quietly(obj.destroy)
        try:
            for other in _search(s, {Attribute.ID: key_id}):
                self._quietly(other.destroy)
        except p11e.PKCS11Error as exc:
            log.error(
                "could not check for a half-made key object", extra={"error": type(exc).__name__}
            )

    def ping(self) -> None:
        """One cheap round trip to the token host (C_GetSessionInfo through python-pkcs11)."""
        with self._session() as slot:
            slot.session.token.slot.get_token()

    # --- internals ----------------------------------------------------------------------------

    def _find_private(self, slot: _Slot, key_id: bytes) -> Any:
        found = _search(
            slot.session, {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}
        )
        if not found:
            raise NotFound(f"no private key object with id {key_id.hex()} in the token")
        if len(found) > 1:
            raise Internal(f"{len(found)} private key objects share id {key_id.hex()}")
        slot.keys[key_id] = found[0]
        return found[0]

    @contextmanager
    def _session(self) -> Iterator[_Slot]:
        conn = self._conn
        if conn is None:
            raise self._why_down()
        self.check_answering()
        slot = conn.free.get()
        try:
            with map_errors():
                try:
                    yield slot
                except CONNECTION_LOST as exc:
                    # Not through the table: the connection is marked down first, and the
                    # answer says why the token is down.
                    self._mark_down(conn, f"lost the token host ({type(exc).__name__})")
                    raise Unavailable(f"token unavailable: {self._down_reason}") from None
                except STALE_HANDLE:
                    slot.keys.clear()  # the cached handle may be the stale one; NOT_FOUND
                    raise
        finally:
            conn.free.put(slot)

    def _mark_down(self, conn: _Connection, reason: str) -> None:
        with self._state_lock:
            if self._conn is not conn:
                return
            self._conn = None
            self._dead = conn
            self._dead_since = time.monotonic()
            self._down_reason = reason
        log.warning("token unavailable", extra={"reason": reason})
        self._notify(False)
        self._wake.set()

    def _notify(self, up: bool) -> None:
        for listener in self._listeners:
            try:
                listener(up)
            except Exception:
                log.exception("availability listener failed")

    def _drain(self, conn: _Connection, timeout: float = 10.0) -> bool:
        """Takes every session of ``conn`` back (calls on a dead connection fail fast)."""
        taken: list[_Slot] = []
        try:
            for _ in conn.slots:
                taken.append(conn.free.get(timeout=timeout))
        except queue.Empty:
            for slot in taken:
                conn.free.put(slot)
            return False
        return True

    def _try_connect(self) -> bool:
        if self._follows is not None and not self._follows.available:
            self._down_reason = "waiting for the main connection to the token"
            return False
        if not self._logins.may_try():
            return False
        with self._state_lock:
            if self._conn is not None:
                return True
            if self._dead is not None:
                # Calls on a dead connection fail fast; wait for them before C_Finalize.
                if self._drain(self._dead, timeout=1.0):
                    self._dead = None
                elif time.monotonic() - self._dead_since < ABANDON_AFTER_SECONDS:
                    return False
                else:
                    self._abandon_dead()
            try:
                conn = self._connect()
            except (p11e.PKCS11Error, Unavailable, ConfigError, OSError) as exc:
                # Not through the table: a failed attempt is no call's error; its reason is kept
                # for the calls that meet the token down. ConfigError: the PIN file missing or
                # opened up for a moment while an operator rotates it; the next attempt reads it
                # again.
                reason = exc.message if isinstance(exc, SignerError) else type(exc).__name__
                self._down_reason = f"cannot reach the token ({reason})"
                self._connect_failures += 1
                return False
            self._conn = conn
            self._connect_failures = 0
        log.info("token connected", extra={"token": conn.label, "sessions": len(conn.slots)})
        self._notify(True)
        return True

    def _abandon_dead(self) -> None:
        """Gives up on a dead connection whose sessions do not come back: a thread is stuck in
        the module for good. p11-kit-client 0.24 does that (rpc_socket_read): when the token
        host dies while several calls wait on one connection, a call whose reply header another
        thread had read, and whose body then fails, leaves the others waiting on a condition
        nobody signals again. C_Finalize under a thread inside the module is undefined, so the
        old instance is kept, unfinalized and referenced, and a fresh one (a new connection)
        takes over; the stuck thread's caller is answered by the lanes (Lanes.replace_stuck).
        Found by the soak: the service stayed NOT_SERVING for good after a token host restart."""
        assert self._dead is not None
        held = len(self._dead.slots) - self._dead.free.qsize()
        log.error(
            "token connection abandoned: calls stuck in the PKCS#11 module never returned",
            extra={"sessions_held": held, "seconds": round(time.monotonic() - self._dead_since)},
        )
        self._abandoned.append((self._lib, self._dead))
        died = self._dead_since
        self._lib, self._dead = None, None
        if self._ping is not None and self._ping.thread.is_alive():
            self._ping, self._stalled = None, False  # that health check is stuck with them
        for listener in self._abandon_listeners:
            try:
                listener(died)
            except Exception:
                log.exception("abandon listener failed")

    def _connect(self) -> _Connection:
        if self._lib is None:
            # A fresh lib object, not pkcs11.lib()'s process-wide cache: the pool owns its module.
            self._lib = _p11.lib(self._cfg.module)
        elif not self._lib.initialized:
            self._lib.initialize()
        else:
            self._lib.reinitialize()
        token = self._find_token()
        slots: list[_Slot] = []
        try:
            first = self._pin.login(token)
        except tuple(PIN_REFUSED) as exc:
            # Not through the table: a refused login counts against the PIN file (see _logins).
            self._logins.failed(PIN_REFUSED[type(exc)])
            log.error(
                "token login refused",
                extra={"error": type(exc).__name__, "failed_logins": self._logins.failures},
            )
            raise Unavailable(f"the token refused the login ({type(exc).__name__})") from None
        self._logins.succeeded()
        try:
            slots.append(_Slot(first))
            for _ in range(self._pool_size - 1):
                slots.append(_Slot(token.open(rw=True)))
            mechs = frozenset(mechanism_name(m) for m in token.slot.get_mechanisms())
        except BaseException:
            for slot in slots:
                self._quietly(slot.session.close)
            raise
        free: queue.Queue[_Slot] = queue.Queue()
        for slot in slots:
            free.put(slot)
        return _Connection(token, slots, free, mechs, token.label)

    def _find_token(self) -> Any:
        slots = self._lib.get_slots(token_present=True)
        if not slots:
            # p11-kit-client.so shows no slot at all when its server cannot be reached.
            where = f" at {self._cfg.server_address}" if self._cfg.server_address else ""
            raise Unavailable(f"the PKCS#11 module shows no token; is the token host{where} up?")
        for slot in slots:
            tok = slot.get_token()
            serial = tok.serial.decode("ascii", "replace").strip()
            if self._uri.matches(tok.label, serial, tok.manufacturer_id, tok.model):
                return tok
        raise Unavailable(f"no token matches {self._uri}")

    def _next_check(self) -> float:
        """Seconds until the monitor looks again: the health interval while connected, doubling
        after each failed connection attempt up to ``token.reconnect_max_seconds`` (a network
        HSM, or a token host coming back, is not helped by a reconnect storm). ``wake()``
        cuts the wait short, e.g. when a supervisor has just restarted the token host."""
        interval = self._cfg.health_interval_seconds
        if self._conn is not None or self._connect_failures == 0:
            return interval
        backoff: float = interval * 2.0 ** min(self._connect_failures - 1, 16)
        return min(backoff, max(interval, self._cfg.reconnect_max_seconds))

    def _run_monitor(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._next_check())
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._check()
            except Exception:
                # A bug here must not end the only thread that brings the token back.
                log.exception("token check failed")
            self._checks += 1

    def _check(self) -> None:
        conn = self._conn
        if conn is None:
            if not self._try_connect():
                log.debug("token still unavailable", extra={"reason": self._down_reason})
            return
        # The round trip runs on a thread of its own, so a token host that stops answering (a
        # frozen process, a hung network HSM) is noticed after ``token.stall_seconds`` rather
        # than never; only one is ever out.
        ping = self._ping
        if ping is None:
            ping = self._ping = _Ping(self.ping)
        ping.thread.join(self._cfg.stall_seconds)
        if ping.thread.is_alive():
            if not self._stalled:
                self._stalled = True
                log.warning("token not answering", extra={"seconds": self._cfg.stall_seconds})
                self._notify(False)
            return
        self._ping = None
        if self._stalled:
            self._stalled = False
            log.info("token answering again")
            self._notify(True)
        if isinstance(ping.error, Unavailable):
            return  # _session has marked it down; reconnect on the next tick
        if isinstance(ping.error, SignerError):
            # The token answers, but not as a working token does: fail closed and start afresh
            # rather than keep reporting it healthy.
            self._mark_down(conn, f"health check failed ({ping.error.message})")
        elif ping.error is not None:
            raise ping.error

    @staticmethod
    def _quietly(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            log.debug("ignored during cleanup", extra={"error": type(exc).__name__})


class _Ping:
    """One health check running on a thread of its own; its error, if it failed."""

    def __init__(self, ping: Callable[[], None]) -> None:
        self.error: Exception | None = None

        def run() -> None:
            try:
                ping()
            except Exception as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, name="token-ping", daemon=True)
        self.thread.start()


def _sign_with(key: Any, mech: SignMechanism, data: bytes) -> bytes:
    if mech is SignMechanism.ECDSA:
        return bytes(key.sign(data, mechanism=Mechanism.ECDSA))
    if mech is SignMechanism.RSA_PKCS_PSS:
        return bytes(key.sign(data, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=_PSS_SHA256))
    if mech is SignMechanism.RSA_PKCS:
        return bytes(key.sign(data, mechanism=Mechanism.RSA_PKCS))
    return bytes(key.sign(data, mechanism=Mechanism.EDDSA))


def _one(found: list[Any], missing: Callable[[], Exception]) -> Any:
    if not found:
        raise missing()
    if len(found) > 1:
        raise FailedPrecondition(f"{len(found)} objects match where one was expected")
    return found[0]


def _flag(obj: Any, attr: Attribute) -> bool:
    try:
        return bool(obj[attr])
    except p11e.AttributeTypeInvalid:
        return False


def _object_kind(obj: Any) -> str:
    """What a key object holds, named as :func:`signer.keys.algorithm_kind` names algorithms."""
    key_type = obj[Attribute.KEY_TYPE]
    if key_type == KeyType.EC:
        params = bytes(obj[Attribute.EC_PARAMS])
        return _CURVE_KINDS.get(params, f"EC (curve parameters {params.hex()})")
    if key_type == KeyType.RSA:
        return f"RSA-{int.from_bytes(bytes(obj[Attribute.MODULUS]), 'big').bit_length()}"
    if key_type == KeyType.EC_EDWARDS:
        params = bytes(obj[Attribute.EC_PARAMS])
        return "Ed25519" if params in _ED25519_PARAMS else f"EdDSA ({params.hex()})"
    return f"key type 0x{int(key_type):x}"


def _public_of_private(obj: Any, alg: Algorithm) -> bytes | None:
    """The public key a private key object reveals (RSA: always; EC: not on SoftHSM2), or None."""
    try:
        return _spki(alg, obj)
    except ATTRIBUTE_UNREADABLE:
        return None


def _spki_rsa(pub: Any) -> bytes:
    n = int.from_bytes(pub[Attribute.MODULUS], "big")
    e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
    return (
        rsa.RSAPublicNumbers(e, n)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _search(session: Any, attrs: dict[Attribute, Any]) -> list[Any]:
    """``session.get_objects`` without python-pkcs11 0.10's leak on a failed C_FindObjectsInit.

    python-pkcs11 marks the search active (and takes the session's operation lock) before it calls
    C_FindObjectsInit and does not undo that when the call fails: the session stays locked, and
    the search's ``__del__`` later calls C_FindObjectsFinal and prints a raw traceback.
    """
    search = _p11.SearchIter(session, attrs, 16)  # type: ignore[attr-defined]  # not in its stubs
    try:
        with search:
            return [obj for batch in search for obj in batch]
    except p11e.PKCS11Error:
        with contextlib.suppress(p11e.PKCS11Error):
            search._finalize()  # clears the active flag and releases the session's lock
        raise


def _spki(alg: Algorithm, pub: Any) -> bytes:
    """The public key object's value as SubjectPublicKeyInfo DER, built with cryptography."""
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    if alg.family is Family.RSA:
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        key = rsa.RSAPublicNumbers(e, n).public_key()
    else:
        if alg.family is Family.EC:
            assert alg.curve is not None
            curve = _CURVES[alg.curve]
            point = _ec_point(bytes(pub[Attribute.EC_POINT]), 1 + 2 * ((curve.key_size + 7) // 8))
            key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        else:
            key = ed25519.Ed25519PublicKey.from_public_bytes(
                _ec_point(bytes(pub[Attribute.EC_POINT]), 32)
            )
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ec_point(value: bytes, size: int) -> bytes:
    """CKA_EC_POINT is DER OCTET STRING { point } (PKCS#11 2.40); some modules give it bare."""
    if len(value) == size:
        return value
    header = bytes([0x04, size]) if size < 0x80 else bytes([0x04, 0x81, size])
    if value.startswith(header) and len(value) == len(header) + size:
        return value[len(header) :]
    raise Internal(f"the token returned a malformed CKA_EC_POINT ({len(value)} bytes)")


@dataclass(frozen=True)
class TokenObject:
    """A token object as :meth:`Token.objects` lists it. ``kind``: private, public, secret or
    other (certificates, data). For key pairs' objects, ``key_kind`` names what it holds (as
    :func:`signer.keys.algorithm_kind` names algorithms) and ``public_der`` is the public key it
    shows (SubjectPublicKeyInfo DER): a public key object's, an RSA private key's; None where
    the token shows none (an EC private key on SoftHSM2)."""

    key_id: bytes
    label: str
    kind: str
    key_kind: str = ""
    public_der: bytes | None = None


_KINDS = {
    ObjectClass.PRIVATE_KEY: "private",
    ObjectClass.PUBLIC_KEY: "public",
    ObjectClass.SECRET_KEY: "secret",
}
# Any algorithm of the family (and curve) serves to read a public key's value.
_READERS = {
    **{_CURVE_OIDS[a.curve]: a for a in ALGORITHMS.values() if a.curve in _CURVE_OIDS},
    **{params: ALGORITHMS["ed25519"] for params in _ED25519_PARAMS},
}


def _described(obj: Any) -> TokenObject:
    """One object, read once: a listing of the whole token then compares every key version
    with its object without a search per version (each search reads every object in
    SoftHSM2: 43 ms a version at 440 objects, measured)."""

    def read(attr: Attribute) -> Any:
        try:
            return obj[attr]
        except ATTRIBUTE_UNREADABLE:
            return None

    key_id, label, cls = read(Attribute.ID), read(Attribute.LABEL), read(Attribute.CLASS)
    kind = _KINDS.get(cls, "other")
    key_kind, public = "", None
    if kind in ("private", "public"):
        key_kind = _object_kind(obj)
        key_type = read(Attribute.KEY_TYPE)
        reader = (
            ALGORITHMS["rsa-2048"]
            if key_type == KeyType.RSA
            else _READERS.get(bytes(read(Attribute.EC_PARAMS) or b""))
        )
        if reader is not None:
            with contextlib.suppress(Internal):  # a malformed point shows nothing
                public = _public_of_private(obj, reader)
    return TokenObject(bytes(key_id or b""), str(label or ""), kind, key_kind, public)
