"""The keyring: the service's behaviour, free of gRPC: keys, versions, lifecycle, signing,
verification.

Every method is synchronous and may block on the token or the store; the server
(:mod:`signer._internal.server`) runs them on its lanes (:mod:`signer._internal.lanes`), off the
event loop. Every method validates its input first and changes nothing when it fails.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from signer import jose
from signer._internal.config import Config
from signer._internal.issuers import claims_for
from signer._internal.keyring._common import KEY_ID_BYTES, Clock, utcnow
from signer._internal.keyring._imports import ImportParameters, ImportTokens
from signer._internal.logs import Every
from signer._internal.store import Store
from signer._internal.token import Token, TokenAPI
from signer.errors import (
    TOKEN_AWAY,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SignerError,
    StoreUncertain,
    Unavailable,
)
from signer.keys import (
    ALGORITHMS,
    DEFAULT_SCOPE,
    Algorithm,
    Key,
    Padding,
    SigFormat,
    SignMechanism,
    State,
    Version,
    algorithm,
    check_imported,
    check_labels,
    check_name,
    check_scope,
    check_usable,
    format_signature,
    public_jwk,
    to_be_signed,
    verify,
)

log = logging.getLogger("signer.keyring")  # named for the component: signer._internal.logs
T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Far beyond any sane schedule, and well inside datetime's range (a uint64 on the wire is not).
MAX_WAITING_PERIOD_SECONDS = 100 * 365 * 24 * 3600


@dataclass(frozen=True)
class SignResult:
    signature: bytes
    version: int
    algorithm: str
    signature_algorithm: str


MAX_BATCH = 1000


# Items of a SignBatch per token call: a batch takes turns with other calls on the lanes, so a
# Sign arriving behind a 1,000-item batch waits for one chunk (about 15 ms), not for the batch.
BATCH_CHUNK = 50


@dataclass(frozen=True)
class BatchResult:
    version: int
    algorithm: str
    signature_algorithm: str
    # Per item, in order: a signature, or the error that item alone failed with.
    results: list[bytes | SignerError]


@dataclass
class BatchPlan:
    """A checked SignBatch (:meth:`Keyring.plan_batch`); signatures fill ``results`` in as
    chunks are signed."""

    version: Version
    alg: Algorithm
    fmt: SigFormat
    pad: Padding
    jobs: list[tuple[SignMechanism, bytes]]  # what goes to the token
    slots: list[int]  # the item each job is for
    results: list[bytes | SignerError]

    def abandon(self, start: int) -> None:
        """The items from job ``start`` on are not signed (the caller went away)."""
        for i in self.slots[start:]:
            self.results[i] = Unavailable(f"item {i}: not signed: the caller went away")

    def result(self) -> BatchResult:
        return BatchResult(
            self.version.version,
            self.alg.name,
            self.alg.signature_algorithm(self.pad),
            self.results,
        )


@dataclass(frozen=True)
class JwtResult:
    token: str
    kid: str
    alg: str
    version: int
    issuer: str = ""


def token_label(name: str, version: int) -> str:
    return f"{name}/v{version}"


# Decides, under a key's lock, whether the caller may do what it asked to that key as it is
# now (None: it does not exist); raises PERMISSION_DENIED if not.
Authorise = Callable[[Key | None], None]


class Keyring:
    """Key lifecycle and signing over a token (:class:`TokenAPI`) and a :class:`Store`.

    ``admin``: the token connection for slow work (key and wrapping-key generation, unwrapping),
    so that it does not hold up signatures on ``token``'s. Through p11-kit each connection is
    served in order by its own p11-kit-remote: an RSA-4096 generation on the signing connection
    stalled every signature for its second or more (measured: 1,042 ms; on a connection of its
    own, the slowest signature meanwhile took 10.8 ms). Defaults to ``token`` itself.

    Wrapped import's tokens and their wrapping keys are :class:`ImportTokens`' (``_imports``);
    an import asks it for the token's record and the unwrap, and makes the version here.
    """

    def __init__(
        self,
        cfg: Config,
        token: TokenAPI,
        store: Store,
        clock: Clock = utcnow,
        admin: TokenAPI | None = None,
    ) -> None:
        self._cfg = cfg
        self._token = token
        self._admin = admin or token
        self._store = store
        self._clock = clock
        # Per key name: one change to a key at a time.
        self._imports = ImportTokens(cfg, token, store, clock, self.slow_token)
        # Scopes are fixed at creation, so a key's scope, once read, is read for good.
        self._scopes: dict[str, str] = {}
        self._issuers = cfg.jwt.issuer_of
        self._said = Every(60.0)
        self._changes: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Calls ``listener`` (from the thread that made it) after each change of a key's
        versions or states: the issuers' publisher then writes the JWKS at once."""
        self._changes.append(listener)

    def _changed(self) -> None:
        for listener in self._changes:
            listener()

    def slow_token(self) -> TokenAPI:
        """Where slow work goes: the administrative connection, or the signing one while that
        is down (a generation stalls signatures then, rather than failing)."""
        admin = self._admin
        return admin if admin is self._token or admin.available else self._token

    def _on_a_token_that_sees_it(self, use: Callable[[TokenAPI], T]) -> T:
        """``use(token)`` on the signing connection; if that finds no object for the key, once
        more on the administrative one before NOT_FOUND. SoftHSM2 behind p11-kit serves each
        connection from a process of its own, and the signing one at times did not see a key
        the other had just made (the soak: 20 NOT_FOUND in 858,000 signatures, each for a key
        made a second or two before; the next call found it). The connection that made a key
        sees it."""
        try:
            return use(self._token)
        except NotFound:
            admin = self._admin
            if admin is self._token or not admin.available:
                raise
            if self._said.due("not found on the signing connection") is not None:
                log.warning("key object not found on the signing connection; tried on the other")
            return use(admin)

    def now(self) -> datetime:
        return self._clock()

    # --- keys ---------------------------------------------------------------------------------

    def offered_algorithms(self) -> list[str]:
        """Algorithms whose mechanisms the module offers (empty while the token is unreachable)."""
        try:
            return [a.name for a in ALGORITHMS.values() if not self._token.missing_mechanisms(a)]
        except TOKEN_AWAY:
            return []

    def create_key(
        self, name: str, alg_name: str, scope: str = "", labels: dict[str, str] | None = None
    ) -> Key:
        check_name(name)
        alg = algorithm(alg_name)
        check_scope(scope)
        labels = check_labels(dict(labels or {}))
        with self._store.locked(f"key:{name}"):
            self._require_absent(name)
            self._token.require(alg)
            now = self.now()
            version = self._new_version(name, 1, alg, now)
            key = Key(name, alg.name, 1, scope or DEFAULT_SCOPE, labels, now, (version,))
            try:
                self._store.create_key(key)
            except Exception as exc:
                self._discard(version, exc)
                raise
        self._changed()
        log.info("key created", extra={"key": name, "algorithm": alg.name, "scope": scope})
        return key

    def _find(self, name: str) -> Key | None:
        try:
            return self._store.get_key(name)
        except NotFound:
            return None

    def _require_absent(self, name: str) -> None:
        if self._find(name) is not None:
            raise AlreadyExists(f"key {name!r} already exists")

    def _new_version(self, name: str, number: int, alg: Algorithm, now: datetime) -> Version:
        key_id = secrets.token_bytes(KEY_ID_BYTES)
        public = self.slow_token().generate(alg, key_id, token_label(name, number))
        return Version(name, number, alg.name, State.ENABLED, key_id, public, now, None)

    def _discard(self, version: Version, why: BaseException) -> None:
        """Undoes a token generation whose metadata could not be stored; unless the store's
        write may still come back after a crash (StoreUncertain: a COMMIT whose fsync failed),
        in which case the object stays: then either the row comes back and they agree, or it
        does not and ``signer keys reconcile --repair`` removes an orphan. Destroying it would
        risk a version without its key, which nothing repairs (tests/integration/
        test_io_errors.py)."""
        if isinstance(why, StoreUncertain):
            log.warning(
                "token object kept: its store write failed with an I/O error and may come back",
                extra={"key": version.name, "version": version.version},
            )
            return
        try:
            self._token.destroy(version.key_id)
        except SignerError:
            log.error("could not remove orphaned token objects", extra={"key": version.name})

    # --- wrapped import and adoption ---------------------------------------------------------

    def get_import_parameters(self, caller: str) -> ImportParameters:
        """An import token for ``caller`` (:meth:`ImportTokens.issue`)."""
        return self._imports.issue(caller)

    def import_key_version(
        self,
        name: str,
        alg_name: str,
        import_token: str,
        wrapped_key: bytes,
        scope: str = "",
        labels: dict[str, str] | None = None,
        public_key_der: bytes = b"",
        *,
        caller: str,
        authorise: Authorise | None = None,
    ) -> Key:
        """Unwraps ``wrapped_key`` in the token: version 1 of a new key, or a new primary version.

        ``caller`` must be the one the import token was issued to, and the token is used up by
        a successful import. ``authorise`` is asked under the key's lock, about the key as it is
        then (issue 12: a decision made before the lock could be about a key that another call
        created meanwhile, in another scope).

        Statuses: INVALID_ARGUMENT for bad input, an unknown import token (or another caller's),
        a blob the token will not unwrap, a key of another type or curve, or a public key that
        does not match; FAILED_PRECONDITION for an expired or used import token, a module
        that cannot import the algorithm or a key whose rotation's next version is still waiting
        to become primary (:meth:`rotate`); ALREADY_EXISTS for a key pair already imported.
        Whatever fails, nothing is left in the token or the store.
        """
        check_name(name)
        alg = algorithm(alg_name) if alg_name else None
        check_scope(scope)
        labels = check_labels(dict(labels or {}))
        self._imports.check_request(import_token, wrapped_key, public_key_der)
        with self._store.locked(f"key:{name}"):
            existing = self._find(name)
            if authorise is not None:
                authorise(existing)
            if existing is not None:
                alg = self._check_import_into(existing, alg, scope, labels)
                self._refuse_while_pending(existing, self.now())
            elif alg is None:
                raise InvalidArgument(f"algorithm is required: key {name!r} does not exist yet")
            self.slow_token().require_import(alg)
            number = 1 if existing is None else max(v.version for v in existing.versions) + 1
            key_id = secrets.token_bytes(KEY_ID_BYTES)
            # The import token's wrapping key is destroyed as this block completes.
            with self._imports.redeem(import_token, caller) as record:
                public = self._imports.unwrap(
                    record,
                    wrapped_key,
                    alg,
                    key_id,
                    token_label(name, number),
                    public_key_der or None,
                )
                now = self.now()
                version = Version(name, number, alg.name, State.ENABLED, key_id, public, now, None)
                try:
                    check_imported(public)
                    if existing is None:
                        key = Key(
                            name, alg.name, 1, scope or DEFAULT_SCOPE, labels, now, (version,)
                        )
                        self._store.create_key(key, import_token=import_token)
                    else:
                        # Primary at once, as RotateKey with now: an import has no lead time.
                        self._store.add_version(
                            version,
                            make_primary=True,
                            import_token=import_token,
                            retire=((existing.effective_primary(now), now),),
                        )
                except Exception as exc:
                    self._discard(version, exc)
                    raise
        self._changed()
        log.info(
            "key version imported", extra={"key": name, "algorithm": alg.name, "version": number}
        )
        return self.get_key(name)

    @staticmethod
    def _check_import_into(
        key: Key, alg: Algorithm | None, scope: str, labels: dict[str, str]
    ) -> Algorithm:
        if alg is not None and alg.name != key.algorithm:
            raise InvalidArgument(
                f"key {key.name!r} is {key.algorithm}; a version imported into it must be "
                f"{key.algorithm}, not {alg.name}"
            )
        if scope and scope != key.scope:
            raise InvalidArgument(
                f"scope is fixed at creation: key {key.name!r} has scope {key.scope!r}, "
                f"not {scope!r}"
            )
        if labels and labels != key.labels:
            raise InvalidArgument(
                f"labels are fixed at creation: key {key.name!r} has other labels "
                "(leave labels empty to import a new version)"
            )
        return algorithm(key.algorithm)

    def adopt_key(
        self,
        name: str,
        alg_name: str,
        key_id: bytes,
        scope: str = "",
        labels: dict[str, str] | None = None,
    ) -> Key:
        """Records a key pair provisioned at the token host (``signer hsm import-key``) as
        version 1 of a new key. No RPC: for administrators and the crash harness.

        The token checks the private object (type, curve, sensitive, non-extractable), turns
        off capabilities other than signing and proves its public key; once recorded, the pair
        is relabelled ``NAME/v1``. A failure never destroys the administrator's object.
        """
        check_name(name)
        alg = algorithm(alg_name)
        check_scope(scope)
        labels = check_labels(dict(labels or {}))
        if not 1 <= len(key_id) <= 64:
            raise InvalidArgument(f"key_id must be 1 to 64 bytes, got {len(key_id)}")
        with self._store.locked(f"key:{name}"):
            self._require_absent(name)
            public = self._token.adopt(alg, key_id)
            now = self.now()
            version = Version(name, 1, alg.name, State.ENABLED, key_id, public, now, None)
            # The store first: its unique CKA_IDs refuse an object another version already has.
            self._store.create_key(
                Key(name, alg.name, 1, scope or DEFAULT_SCOPE, labels, now, (version,))
            )
            try:
                self._token.relabel(key_id, token_label(name, 1))
            except SignerError as exc:
                log.warning("adopted key not relabelled", extra={"key": name, "error": exc.message})
        self._changed()
        log.info("key adopted", extra={"key": name, "algorithm": alg.name})
        return self.get_key(name)

    # --- reading ------------------------------------------------------------------------------

    def get_key(self, name: str) -> Key:
        check_name(name)
        return self._with_effective_states(self._store.get_key(name))

    def _with_effective_states(self, key: Key) -> Key:
        """``key`` as it is now: its versions' effective states, and a scheduled next version
        whose time has come folded into ``primary`` (the store still has it as next until the
        key's next change)."""
        now = self.now()
        versions = tuple(
            replace(v, state=v.effective_state(now)) if v.effective_state(now) != v.state else v
            for v in key.versions
        )
        if key.pending_primary(now) is None and key.next_primary is not None:
            key = replace(
                key, primary=key.effective_primary(now), next_primary=None, next_primary_at=None
            )
        return replace(key, versions=versions)

    def _issuer_bound(self, key: Key) -> bool:
        """Whether ``key``'s scope has an issuer ([jwt] issuers): its rotations have a lead
        time and its JWKS drops retired versions after a grace period."""
        return key.scope in self._issuers

    @staticmethod
    def _refuse_while_pending(key: Key, now: datetime) -> None:
        """FAILED_PRECONDITION while a rotation's new version waits to become primary: a key has
        one next version at a time, and which way out (SetPrimaryVersion now, or a rotation
        once it is primary) is the caller's to choose, not a second rotation's to guess."""
        pending = key.pending_primary(now)
        if pending is not None:
            assert key.next_primary_at is not None
            raise FailedPrecondition(
                f"key {key.name!r} version {pending} becomes primary at "
                f"{key.next_primary_at.isoformat()}: rotate again after it, or set the primary "
                "version now"
            )

    def scope_of(self, name: str) -> str | None:
        """The key's scope, or None if there is no such key (or the name is not a name)."""
        scope = self._scopes.get(name)
        if scope is None:
            try:
                scope = self._store.get_key(check_name(name)).scope
            except (NotFound, InvalidArgument):
                return None
            self._scopes[name] = scope
        return scope

    def cached_scope(self, name: str) -> str | None:
        """:meth:`scope_of` if it is known without a store read (for the event loop)."""
        return self._scopes.get(name)

    def list_keys(
        self, page_size: int, page_token: str, visible: Callable[[Key], bool] | None = None
    ) -> tuple[list[Key], str]:
        """A page of keys in name order; with ``visible``, only the keys it accepts (pages are
        filled from further down the list, so a caller never learns what was left out)."""
        if page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, got {page_size}")
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be at most {MAX_PAGE_SIZE}, got {page_size}")
        size = page_size or DEFAULT_PAGE_SIZE
        after = ""
        if page_token:
            after = _decode_page_token(page_token)
        keys: list[Key] = []
        while len(keys) <= size:
            batch = self._store.list_keys(after, size + 1)
            keys += [k for k in batch if visible is None or visible(k)]
            if len(batch) <= size:
                break
            after = batch[-1].name
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
        now = self.now()
        v = self._store.get_version(name, version, now)
        check_usable(v, now)
        self._refuse_if_jwt_only(name)
        alg = algorithm(v.algorithm)
        mech, data = to_be_signed(alg, message, digest, pad)
        raw = self._on_a_token_that_sees_it(lambda t: t.sign(v.key_id, mech, data))
        return SignResult(
            format_signature(alg, raw, fmt), v.version, alg.name, alg.signature_algorithm(pad)
        )

    def plan_batch(
        self,
        name: str,
        version: int,
        items: list[tuple[bytes | None, bytes | None]],
        fmt: SigFormat = SigFormat.DER,
        pad: Padding = Padding.PSS,
    ) -> BatchPlan:
        """A SignBatch checked and ready for the token: the key version resolved and checked
        once, each (message, digest) item validated (a wrong item fails alone) and hashed.
        :meth:`sign_chunk` then signs it a chunk at a time."""
        check_name(name)
        if not items:
            raise InvalidArgument("items is empty: send 1 to 1000 messages or digests")
        if len(items) > MAX_BATCH:
            raise InvalidArgument(f"{len(items)} items; at most {MAX_BATCH} per call")
        now = self.now()
        v = self._store.get_version(name, version, now)
        check_usable(v, now)
        self._refuse_if_jwt_only(name)
        alg = algorithm(v.algorithm)
        plan = BatchPlan(v, alg, fmt, pad, [], [], [])
        for i, (message, digest) in enumerate(items):
            try:
                self._check_input(message, digest)
                plan.jobs.append(to_be_signed(alg, message, digest, pad))
                plan.slots.append(i)
                plan.results.append(b"")
            except InvalidArgument as exc:
                plan.results.append(InvalidArgument(f"item {i}: {exc.message}"))
        return plan

    def sign_chunk(self, plan: BatchPlan, start: int) -> None:
        """Signs the plan's items ``start`` to ``start + BATCH_CHUNK`` on one token session; the
        token failing fails the call. The version's state is read again first: a version
        disabled (or destroyed) while a batch runs signs nothing more, and the rest of its items
        fail FAILED_PRECONDITION (issue 11: a 300-item batch disabled half a second in used to
        return all 300). The first chunk too: the plan was made in another lane job, and a
        Disable may have committed while this one waited its turn (review of issue 12)."""
        end = start + BATCH_CHUNK
        try:
            v = self._store.get_version(plan.version.name, plan.version.version)
            check_usable(v, self.now())
        except (FailedPrecondition, NotFound) as exc:
            for i in plan.slots[start:end]:
                plan.results[i] = FailedPrecondition(
                    f"item {i}: {exc.message} (since the batch began)"
                )
            return
        jobs = plan.jobs[start:end]
        raws = self._on_a_token_that_sees_it(lambda t: t.sign_many(plan.version.key_id, jobs))
        for i, raw in zip(plan.slots[start:end], raws, strict=True):
            plan.results[i] = format_signature(plan.alg, raw, plan.fmt)

    def _refuse_if_jwt_only(self, name: str) -> None:
        """A key of an issuer's scope signs JWTs only (SignJWT): raw Sign would let a caller
        mint tokens its issuer's verifiers accept with any iss and no bounded exp, and the
        grace after a rotation holds only for tokens that expire within
        jwt.max_token_lifetime_seconds. The scope is cached after the first read."""
        scope = self.scope_of(name)
        if scope is not None and scope in self._issuers:
            raise FailedPrecondition(
                f"key {name!r} is in scope {scope!r}, published by issuer "
                f"{self._issuers[scope]}: it signs JWTs only (SignJWT), whose iss and exp rules "
                "keep its rotations safe for verifiers"
            )

    def sign_jwt(self, name: str, claims: bytes, *, set_issuer: bool = False) -> JwtResult:
        """A JWT over ``claims`` (used as given, once checked to be a JSON object, and held to
        the key's scope's issuer: :func:`signer._internal.issuers.claims_for`), signed with the
        primary version (a scheduled next one once its time has come); RSA keys sign PS256, as
        their JWK says."""
        check_name(name)
        parsed = jose.check_claims(claims)
        now = self.now()
        v = self._store.get_version(name, 0, now)
        check_usable(v, now)
        scope = self.scope_of(name) or ""
        claims, issuer = claims_for(
            claims, parsed, scope, self._cfg.jwt, now.timestamp(), set_issuer=set_issuer
        )
        alg = algorithm(v.algorithm)
        kid, jws_alg = f"{name}/{v.version}", alg.jws_alg(Padding.PSS)
        data = jose.signing_input(jws_alg, kid, claims)
        mech, tbs = to_be_signed(alg, data, None, Padding.PSS)
        raw = self._on_a_token_that_sees_it(lambda t: t.sign(v.key_id, mech, tbs))
        token = jose.compact(data, format_signature(alg, raw, SigFormat.RAW))
        return JwtResult(token, kid, jws_alg, v.version, issuer)

    def jwks(self, scope: str, visible: Callable[[Key], bool] | None = None) -> dict[str, Any]:
        """The JWKS of ``scope``: every enabled version of its keys (that ``visible`` lets
        through), each JWK with the key's scope. An issuer's scope leaves out the versions
        retired [jwt] retired_grace_seconds or more ago; a rotation's next version is in it
        from the rotation on."""
        if not scope:
            raise InvalidArgument("scope is required: a JWKS is per scope")
        check_scope(scope)
        now = self.now()
        grace = timedelta(seconds=self._cfg.jwt.retired_grace_seconds)
        bound = scope in self._issuers
        keys: list[dict[str, Any]] = []
        after = ""
        while True:
            page = self._store.list_keys(after, MAX_PAGE_SIZE, scope=scope)
            for key in (self._with_effective_states(k) for k in page):
                if visible is not None and not visible(key):
                    continue
                for v in key.versions:
                    if bound and v.retired_at is not None and now >= v.retired_at + grace:
                        continue
                    if v.state is State.ENABLED:
                        jwk = public_jwk(
                            v.public_key_der, algorithm(key.algorithm), f"{key.name}/{v.version}"
                        )
                        jwk["scope"] = key.scope
                        keys.append(jwk)
            if len(page) < MAX_PAGE_SIZE:
                return {"keys": keys}
            after = page[-1].name

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
        now = self.now()
        v = self._store.get_version(name, version, now)
        check_usable(v, now)
        alg = algorithm(v.algorithm)
        return verify(v.public_key_der, alg, signature, message, digest, pad, fmt), v.version

    # --- lifecycle ----------------------------------------------------------------------------

    def rotate(self, name: str, *, now: bool = False) -> Key:
        """A new version. For a key in an issuer's scope it is published at once and becomes
        primary [jwt] rotation_lead_seconds later, when the version it replaces is retired
        (verifiers that cached the JWKS before the rotation have refetched it by then);
        FAILED_PRECONDITION while a version so scheduled is still waiting. Other keys, or
        ``now``: the new version is primary at once."""
        check_name(name)
        with self._store.locked(f"key:{name}"):
            key = self._store.get_key(name)
            at = self.now()
            self._refuse_while_pending(key, at)
            alg = algorithm(key.algorithm)
            self._token.require(alg)
            number = max(v.version for v in key.versions) + 1
            version = self._new_version(name, number, alg, at)
            # The version the new one replaces: a next one that has become primary (the write
            # folds it into primary_version), else the primary.
            replaced = key.effective_primary(at)
            primary_at = None
            if self._issuer_bound(key) and not now:
                primary_at = at + timedelta(seconds=self._cfg.jwt.rotation_lead_seconds)
            try:
                self._store.add_version(
                    version,
                    make_primary=True,
                    primary_at=primary_at,
                    retire=((replaced, primary_at or at),),
                )
            except Exception as exc:
                self._discard(version, exc)
                raise
        self._changed()
        log.info(
            "key rotated",
            extra={
                "key": name,
                "version": number,
                **({} if primary_at is None else {"primary_at": primary_at.isoformat()}),
            },
        )
        return self.get_key(name)

    def set_primary(self, name: str, version: int) -> Key:
        """Makes ``version`` primary at once (the emergency path: it does not wait for
        verifiers' caches), cancelling a rotation's pending next version, which is retired
        with the version that was primary."""
        check_name(name)
        self._require_version_number(version)
        with self._store.locked(f"key:{name}"):
            key = self._store.get_key(name)
            v = key.version(version)
            at = self.now()
            state = v.effective_state(at)
            if state is not State.ENABLED:
                raise FailedPrecondition(
                    f"key {name!r} version {version} is {_state_words(state)}; "
                    "only an enabled version can be primary"
                )
            retire: list[tuple[int, datetime | None]] = [
                (n, at)
                for n in (key.effective_primary(at), key.pending_primary(at))
                if n is not None and n != version
            ]
            retire.append((version, None))
            self._store.set_primary(name, version, retire=tuple(retire))
        self._changed()
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
        with self._store.locked(f"key:{name}"):
            key = self._store.get_key(name)
            v = key.version(version)
            now = self.now()
            if v.version == key.effective_primary(now):
                raise FailedPrecondition(
                    f"key {name!r} version {version} is the primary version; "
                    "make another version primary first"
                )
            if v.version == key.pending_primary(now):
                raise FailedPrecondition(
                    f"key {name!r} version {version} is to become the primary version; "
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
        with self._store.locked(f"key:{name}"):
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
            self._changed()
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
        """Destroys the token objects of versions whose waiting period has passed, and the
        wrapping keys of used and expired import tokens (:meth:`ImportTokens.reap`); returns how
        many versions it destroyed."""
        if not self._imports.reap():
            return 0
        done = 0
        for due in self._store.due_for_destruction(self.now()):
            with self._store.locked(f"key:{due.name}"):
                # Decided again under the lock, on the version as it is now: a cancel (or a
                # new schedule) may have committed since the list was read, and destruction
                # cannot be undone.
                v = self._store.get_version(due.name, due.version)
                if v.state is not State.DESTRUCTION_SCHEDULED or v.destroy_at != due.destroy_at:
                    continue
                try:
                    self._token.destroy(v.key_id)
                except TOKEN_AWAY:
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
            self._changed()
            log.info("key version destroyed", extra={"key": v.name, "version": v.version})
            done += 1
        return done


def adopt_with_config(
    cfg: Config,
    name: str,
    alg_name: str,
    key_id: bytes,
    scope: str = "",
    labels: dict[str, str] | None = None,
) -> Key:
    """:meth:`Keyring.adopt_key` against the token and store ``cfg`` names, without a server
    (``signer keys adopt``; SQLite and the token host both take a second client)."""
    from signer._internal.store import open_store
    from signer._internal.token import Pin

    token = Token(cfg.token, Pin(cfg.token.pin_file))
    store = open_store(cfg.store.path)
    try:
        token.start(wait=True)
        return Keyring(cfg, token, store).adopt_key(name, alg_name, key_id, scope, labels)
    finally:
        token.close()
        store.close()


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
