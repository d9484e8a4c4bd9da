"""The signer's behaviour, free of gRPC: keys, versions, lifecycle, signing, verification.

Every method is synchronous and may block on the token or the store; :mod:`signer.server` runs
them on a thread pool, off the event loop. Every method validates its input first and changes
nothing when it fails.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from signer.config import Config
from signer.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SignerError,
    Unavailable,
)
from signer.keys import (
    ALGORITHMS,
    Algorithm,
    Key,
    Padding,
    SigFormat,
    State,
    Version,
    algorithm,
    check_labels,
    check_name,
    check_scope,
    check_usable,
    format_signature,
    to_be_signed,
    verify,
)
from signer.store import Store
from signer.token import Token

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
KEY_ID_BYTES = 16
# Far beyond any sane schedule, and well inside datetime's range (a uint64 on the wire is not).
MAX_WAITING_PERIOD_SECONDS = 100 * 365 * 24 * 3600


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SignResult:
    signature: bytes
    version: int
    algorithm: str
    signature_algorithm: str


def token_label(name: str, version: int) -> str:
    return f"{name}/v{version}"


class Signer:
    """Key lifecycle and signing over a :class:`Token` and a :class:`Store`."""

    def __init__(self, cfg: Config, token: Token, store: Store, clock: Clock = utcnow) -> None:
        self._cfg = cfg
        self._token = token
        self._store = store
        self._clock = clock
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def now(self) -> datetime:
        return self._clock()

    # --- keys ---------------------------------------------------------------------------------

    def offered_algorithms(self) -> list[str]:
        """Algorithms whose mechanisms the module offers (empty while the token is unreachable)."""
        try:
            return [a.name for a in ALGORITHMS.values() if not self._token.missing_mechanisms(a)]
        except Unavailable:
            return []

    def create_key(
        self, name: str, alg_name: str, scope: str = "", labels: dict[str, str] | None = None
    ) -> Key:
        check_name(name)
        alg = algorithm(alg_name)
        check_scope(scope)
        labels = check_labels(dict(labels or {}))
        with self._lock(name):
            try:
                self._store.get_key(name)
            except NotFound:
                pass
            else:
                raise AlreadyExists(f"key {name!r} already exists")
            self._token.require(alg)
            now = self.now()
            version = self._new_version(name, 1, alg, now)
            key = Key(name, alg.name, 1, scope, labels, now, (version,))
            try:
                self._store.create_key(key)
            except Exception:
                self._discard(version)
                raise
        log.info("key created", extra={"key": name, "algorithm": alg.name, "scope": scope})
        return key

    def _new_version(self, name: str, number: int, alg: Algorithm, now: datetime) -> Version:
        key_id = secrets.token_bytes(KEY_ID_BYTES)
        public = self._token.generate(alg, key_id, token_label(name, number))
        return Version(name, number, alg.name, State.ENABLED, key_id, public, now, None)

    def _discard(self, version: Version) -> None:
        """Undoes a token generation whose metadata could not be stored."""
        try:
            self._token.destroy(version.key_id)
        except SignerError:
            log.error("could not remove orphaned token objects", extra={"key": version.name})

    def get_key(self, name: str) -> Key:
        check_name(name)
        return self._with_effective_states(self._store.get_key(name))

    def _with_effective_states(self, key: Key) -> Key:
        now = self.now()
        versions = tuple(
            replace(v, state=v.effective_state(now)) if v.effective_state(now) != v.state else v
            for v in key.versions
        )
        return replace(key, versions=versions)

    def list_keys(self, page_size: int, page_token: str) -> tuple[list[Key], str]:
        if page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, got {page_size}")
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be at most {MAX_PAGE_SIZE}, got {page_size}")
        size = page_size or DEFAULT_PAGE_SIZE
        after = ""
        if page_token:
            after = _decode_page_token(page_token)
        keys = self._store.list_keys(after, size + 1)
        more = len(keys) > size
        keys = keys[:size]
        next_token = _encode_page_token(keys[-1].name) if more else ""
        return [self._with_effective_states(k) for k in keys], next_token

    def public_key(self, name: str, version: int) -> tuple[Version, Algorithm]:
        key = self.get_key(name)
        v = key.version(version)
        if v.state is State.DESTROYED:
            raise FailedPrecondition(f"key {name!r} version {v.version} is destroyed")
        return v, algorithm(key.algorithm)

    # --- signing ------------------------------------------------------------------------------

    def _check_input(self, message: bytes | None, digest: bytes | None) -> None:
        if message is None and digest is None:
            raise InvalidArgument("one of message or digest is required")
        if message is not None:
            if not message:
                raise InvalidArgument("message is empty")
            limit = self._cfg.server.max_message_bytes
            if len(message) > limit:
                raise InvalidArgument(
                    f"message is {len(message)} bytes; the limit is {limit} (send a digest instead)"
                )

    def sign(
        self,
        name: str,
        version: int,
        message: bytes | None,
        digest: bytes | None,
        fmt: SigFormat = SigFormat.DER,
        pad: Padding = Padding.PSS,
    ) -> SignResult:
        check_name(name)
        self._check_input(message, digest)
        v = self._store.get_version(name, version)
        check_usable(v, self.now())
        alg = algorithm(v.algorithm)
        mech, data = to_be_signed(alg, message, digest, pad)
        raw = self._token.sign(v.key_id, mech, data)
        return SignResult(
            format_signature(alg, raw, fmt), v.version, alg.name, alg.signature_algorithm(pad)
        )

    def verify(
        self,
        name: str,
        version: int,
        message: bytes | None,
        digest: bytes | None,
        signature: bytes,
        fmt: SigFormat = SigFormat.DER,
        pad: Padding = Padding.PSS,
    ) -> tuple[bool, int]:
        check_name(name)
        self._check_input(message, digest)
        if not signature:
            raise InvalidArgument("signature is empty")
        v = self._store.get_version(name, version)
        check_usable(v, self.now())
        alg = algorithm(v.algorithm)
        return verify(v.public_key_der, alg, signature, message, digest, pad, fmt), v.version

    # --- lifecycle ----------------------------------------------------------------------------

    def rotate(self, name: str) -> Key:
        check_name(name)
        with self._lock(name):
            key = self._store.get_key(name)
            alg = algorithm(key.algorithm)
            self._token.require(alg)
            number = max(v.version for v in key.versions) + 1
            version = self._new_version(name, number, alg, self.now())
            try:
                self._store.add_version(version, make_primary=True)
            except Exception:
                self._discard(version)
                raise
        log.info("key rotated", extra={"key": name, "version": number})
        return self.get_key(name)

    def set_primary(self, name: str, version: int) -> Key:
        check_name(name)
        self._require_version_number(version)
        with self._lock(name):
            key = self._store.get_key(name)
            v = key.version(version)
            state = v.effective_state(self.now())
            if state is not State.ENABLED:
                raise FailedPrecondition(
                    f"key {name!r} version {version} is {_state_words(state)}; "
                    "only an enabled version can be primary"
                )
            self._store.set_primary(name, version)
        log.info("primary version set", extra={"key": name, "version": version})
        return self.get_key(name)

    def disable(self, name: str, version: int) -> Version:
        return self._transition(name, version, {State.ENABLED, State.DISABLED}, State.DISABLED)

    def enable(self, name: str, version: int) -> Version:
        return self._transition(name, version, {State.ENABLED, State.DISABLED}, State.ENABLED)

    def cancel_destruction(self, name: str, version: int) -> Version:
        # As in cloud KMSs, a cancelled version comes back disabled: enabling it is a second,
        # deliberate step.
        return self._transition(name, version, {State.DESTRUCTION_SCHEDULED}, State.DISABLED)

    def schedule_destruction(self, name: str, version: int, waiting_seconds: int) -> Version:
        keys_cfg = self._cfg.keys
        if waiting_seconds == 0:
            waiting_seconds = keys_cfg.destruction_waiting_period_seconds
        if waiting_seconds < keys_cfg.min_destruction_waiting_period_seconds:
            raise InvalidArgument(
                f"waiting_period_seconds must be at least "
                f"{keys_cfg.min_destruction_waiting_period_seconds}, got {waiting_seconds}"
            )
        if waiting_seconds > MAX_WAITING_PERIOD_SECONDS:
            raise InvalidArgument(
                f"waiting_period_seconds must be at most {MAX_WAITING_PERIOD_SECONDS}, "
                f"got {waiting_seconds}"
            )
        check_name(name)
        self._require_version_number(version)
        with self._lock(name):
            key = self._store.get_key(name)
            v = key.version(version)
            if v.version == key.primary:
                raise FailedPrecondition(
                    f"key {name!r} version {version} is the primary version; "
                    "make another version primary first"
                )
            return self._transition_locked(
                key,
                v,
                {State.ENABLED, State.DISABLED},
                State.DESTRUCTION_SCHEDULED,
                self.now() + timedelta(seconds=waiting_seconds),
            )

    def _transition(self, name: str, version: int, allowed: set[State], to: State) -> Version:
        check_name(name)
        self._require_version_number(version)
        with self._lock(name):
            key = self._store.get_key(name)
            return self._transition_locked(key, key.version(version), allowed, to, None)

    def _transition_locked(
        self, key: Key, v: Version, allowed: set[State], to: State, destroy_at: datetime | None
    ) -> Version:
        state = v.effective_state(self.now())
        if state not in allowed:
            raise FailedPrecondition(
                f"key {key.name!r} version {v.version} is {_state_words(state)}; "
                f"cannot make it {_state_words(to)}"
            )
        if state is not to:
            self._store.set_state(key.name, v.version, to, destroy_at)
            log.info(
                "key version state changed",
                extra={"key": key.name, "version": v.version, "state": to.value},
            )
        return replace(v, state=to, destroy_at=destroy_at)

    @staticmethod
    def _require_version_number(version: int) -> None:
        if version <= 0:
            raise InvalidArgument("version is required (a positive number)")

    def reap(self) -> int:
        """Destroys the token objects of versions whose waiting period has passed."""
        done = 0
        for v in self._store.due_for_destruction(self.now()):
            with self._lock(v.name):
                try:
                    self._token.destroy(v.key_id)
                except Unavailable:
                    log.warning("destruction postponed: token unavailable", extra={"key": v.name})
                    return done
                except SignerError as exc:
                    # One version the token will not destroy must not hold up the others.
                    log.error(
                        "destruction failed; will retry",
                        extra={"key": v.name, "version": v.version, "error": exc.message},
                    )
                    continue
                self._store.set_state(v.name, v.version, State.DESTROYED, v.destroy_at)
            log.info("key version destroyed", extra={"key": v.name, "version": v.version})
            done += 1
        return done


def _state_words(state: State) -> str:
    return state.value.replace("_", " ")


def _encode_page_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii")


def _decode_page_token(token: str) -> str:
    try:
        return check_name(base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8"))
    except (binascii.Error, UnicodeError, ValueError, InvalidArgument):
        raise InvalidArgument(
            "page_token is malformed: pass back next_page_token as given"
        ) from None
