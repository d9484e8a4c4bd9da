"""Wrapped import's tokens: each a single-use token for one caller, with an RSA-4096 wrapping key
pair of its own generated in the token; issued by GetImportParameters, used up by
ImportKeyVersion, its wrapping key destroyed once it is used or expired.

The import tokens' bounds, their locks and their wrapping keys are this module's alone. The
keyring asks it for what an import needs (:meth:`ImportTokens.check_request`,
:meth:`ImportTokens.redeem`, :meth:`ImportTokens.unwrap`) and makes the key version itself,
under the key's lock (always taken before a token's).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from signer._internal.config import Config
from signer._internal.keyring._common import KEY_ID_BYTES, Clock
from signer._internal.store import Store
from signer._internal.token import TokenAPI
from signer.errors import (
    TOKEN_AWAY,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SignerError,
)
from signer.keys import ALGORITHMS, Algorithm, ImportToken, load_public_key
from signer.wrapping import ONE_STEP, TWO_STEP

log = logging.getLogger("signer.keyring")  # named for the component: signer._internal.logs

IMPORT_TOKEN_BYTES = 32
WRAPPING_KEY_LABEL = "signer/import-wrapping"
# An RSA-4096 key's PKCS#8 wrapped in two steps is under 3 KiB; anything far larger is not a key.
MAX_WRAPPED_KEY_BYTES = 16 * 1024
_IMPORT_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")


@dataclass(frozen=True)
class ImportParameters:
    token: ImportToken
    wrapping_algorithm: str
    two_step_wrapping_algorithm: str  # empty when the module does not offer it
    supported_algorithms: list[str]


class ImportTokens:
    """Issues, redeems and reaps import tokens over a token (:class:`TokenAPI`) and a
    :class:`Store`.

    ``slow_token``: the keyring's choice of connection for slow work (wrapping-key generation,
    unwrapping; :meth:`signer._internal.keyring.Keyring.slow_token`).
    """

    def __init__(
        self,
        cfg: Config,
        token: TokenAPI,
        store: Store,
        clock: Clock,
        slow_token: Callable[[], TokenAPI],
    ) -> None:
        self._cfg = cfg
        self._token = token
        self._store = store
        self._clock = clock
        self._slow_token = slow_token
        # One import-parameter decision at a time: the count of live import tokens it reads is
        # the count it adds to (and wrapping keys are generated one at a time anyway).
        self._guard = threading.Lock()
        # Per import token: an import using it and the reaper destroying its wrapping key.

    def importable_algorithms(self) -> list[str]:
        try:
            return [
                a.name for a in ALGORITHMS.values() if not self._token.missing_import_mechanisms(a)
            ]
        except TOKEN_AWAY:
            return []

    def issue(self, caller: str) -> ImportParameters:
        """An import token for ``caller`` alone, with its own RSA-4096 wrapping key pair
        generated in the token; single-use.

        Generating the pair is the token's slowest job, so it is bounded (issue 11): a caller
        that still holds an unused token with half its lifetime left gets that one again (so a
        caller holds at most two), and no more than ``keys.max_live_import_tokens`` are live in
        all (RESOURCE_EXHAUSTED beyond)."""
        self._slow_token().require_wrapping()
        lifetime = timedelta(seconds=self._cfg.keys.import_token_lifetime_seconds)
        with self._guard:
            now = self._clock()
            live = self._store.live_import_tokens(now)
            mine = [t for t in live if t.caller == caller and t.expires - now >= lifetime / 2]
            record = mine[-1] if mine else self._new_import_token(caller, now, lifetime, live)
        return ImportParameters(
            record,
            ONE_STEP,
            TWO_STEP if self._slow_token().two_step_mechanism else "",
            self.importable_algorithms(),
        )

    def _new_import_token(
        self, caller: str, now: datetime, lifetime: timedelta, live: list[ImportToken]
    ) -> ImportToken:
        limit = self._cfg.keys.max_live_import_tokens
        if len(live) >= limit:
            raise ResourceExhausted(
                f"{len(live)} import tokens are live, the most this service allows "
                f"(keys.max_live_import_tokens); the next expires at "
                f"{min(t.expires for t in live).isoformat()}, or when one is used"
            )
        token = secrets.token_urlsafe(IMPORT_TOKEN_BYTES)
        key_id = secrets.token_bytes(KEY_ID_BYTES)
        public = self._slow_token().generate_wrapping_key(key_id, WRAPPING_KEY_LABEL)
        record = ImportToken(token, key_id, public, now, now + lifetime, caller=caller)
        try:
            self._store.add_import_token(record)
        except Exception:
            try:
                self._token.destroy(key_id)
            except SignerError:
                log.error("could not remove an orphaned wrapping key")
            raise
        log.info("import token issued", extra={"expires": record.expires.isoformat()})
        return record

    @staticmethod
    def check_request(import_token: str, wrapped_key: bytes, public_key_der: bytes) -> None:
        """INVALID_ARGUMENT for an import request's token, wrapped key or public key that
        cannot be right whatever the token and the store hold."""
        if not _IMPORT_TOKEN.fullmatch(import_token):
            raise InvalidArgument(
                "import_token is missing or malformed: pass the import_token of "
                "GetImportParameters as given"
            )
        if not wrapped_key:
            raise InvalidArgument("wrapped_key is empty")
        if len(wrapped_key) > MAX_WRAPPED_KEY_BYTES:
            raise InvalidArgument(
                f"wrapped_key is {len(wrapped_key)} bytes; the limit is {MAX_WRAPPED_KEY_BYTES}"
            )
        if public_key_der:
            try:
                load_public_key(public_key_der)
            except (ValueError, TypeError):
                raise InvalidArgument("public_key_der is not a DER SubjectPublicKeyInfo") from None

    @contextlib.contextmanager
    def redeem(self, import_token: str, caller: str) -> Iterator[ImportToken]:
        """Under the import token's lock: its record, if it is ``caller``'s, unused and
        unexpired (INVALID_ARGUMENT, FAILED_PRECONDITION if not). When the block completes, the
        token is used (the block's store write says so) and its wrapping key is destroyed; when
        the block raises, the token stays as it was."""
        with self._store.locked(f"import:{import_token}"):
            record = self._live_import_token(import_token, caller)
            yield record
            self._destroy_wrapping_key(record)

    def unwrap(
        self,
        record: ImportToken,
        wrapped_key: bytes,
        alg: Algorithm,
        key_id: bytes,
        label: str,
        public_key_der: bytes | None,
    ) -> bytes:
        """Unwraps ``wrapped_key`` with the wrapping key of ``record`` (from :meth:`redeem`) into
        a key pair with ``key_id`` and ``label``; its public key's DER."""
        return self._slow_token().unwrap_private(
            record.key_id, wrapped_key, alg, key_id, label, public_key_der
        )

    def _destroy_wrapping_key(self, record: ImportToken) -> bool:
        """Destroys a used or expired import token's wrapping key (under the token's lock); False
        if the token host is away (the reaper tries again)."""
        try:
            self._token.destroy(record.key_id)
        except TOKEN_AWAY:
            log.warning("wrapping key destruction postponed: token unavailable")
            return False
        except SignerError as exc:
            log.error("wrapping key destruction failed; will retry", extra={"error": exc.message})
            return True
        self._store.set_import_token_destroyed(record.token)
        log.info("import token's wrapping key destroyed", extra={"used": record.used})
        return True

    def _live_import_token(self, token: str, caller: str) -> ImportToken:
        try:
            record = self._store.get_import_token(token)
        except NotFound:
            record = None
        if record is None or record.caller != caller:
            # Another caller's token is answered as if it did not exist.
            raise InvalidArgument(
                "import_token is unknown: call GetImportParameters for an import token"
            ) from None
        if record.used:
            raise FailedPrecondition(
                "import_token was already used: each import needs its own "
                "(call GetImportParameters)"
            )
        if record.expired(self._clock()):
            raise FailedPrecondition(
                f"import_token expired at {record.expires.isoformat()}; call "
                "GetImportParameters for a new one and wrap the key again with its public key"
            )
        return record

    def reap(self) -> bool:
        """Destroys the wrapping keys of used and expired import tokens; False when the token is
        unavailable (the caller stops too)."""
        for spent in self._store.spent_import_tokens(self._clock()):
            with self._store.locked(f"import:{spent.token}"):
                # Read again under the lock: another replica's reaper may have destroyed it
                # since the list was read (a token is spent for good, so only that changes).
                t = self._store.get_import_token(spent.token)
                if t.destroyed:
                    continue
                if not self._destroy_wrapping_key(t):
                    return False
        return True
