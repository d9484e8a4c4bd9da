"""Issuers (README "Issuers over HTTPS"): each issuer URL speaks for exactly one key scope.

Two jobs. :func:`claims_for` holds SignJWT to the binding: a key can put only its own scope's
issuer in ``iss``, and a token of an issuer's key carries an ``exp`` no further ahead than
``jwt.max_token_lifetime_seconds`` (what makes the grace period after a rotation long enough).
:class:`Publisher` writes each issuer's JWKS and OpenID configuration as files, which the
front serves to relying parties without a client certificate: an unauthenticated request from
the internet ends in nginx's static-file path and never reaches the process that holds the
token's session.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from signer._internal.config import JwtConfig
from signer._internal.logs import Every
from signer.errors import FailedPrecondition, InvalidArgument, SignerError, shown

log = logging.getLogger("signer.issuers")

JWKS_FILE = "jwks.json"
DISCOVERY_FILE = ".well-known/openid-configuration"


def claims_for(
    claims: bytes,
    parsed: Mapping[str, Any],
    scope: str,
    jwt: JwtConfig,
    now: float,
    *,
    set_issuer: bool,
) -> tuple[bytes, str]:
    """The claims to sign for a key of ``scope`` (``parsed``: ``claims`` as checked by
    :func:`signer.jose.check_claims`), and the token's issuer ("" for none).

    With ``set_issuer``, ``"iss"`` is spliced in as the first member and every other byte is
    kept as given."""
    issuers = jwt.issuer_of
    issuer = issuers.get(scope)
    named = "iss" in parsed  # "iss": null is named too: a second "iss" must never be added
    given = parsed.get("iss")
    if issuer is None:
        if set_issuer:
            raise FailedPrecondition(
                f"scope {shown(scope)} has no issuer ([jwt] issuers): there is no iss to set"
            )
        if isinstance(given, str) and _same_url(given) in {_same_url(u) for u in issuers.values()}:
            raise InvalidArgument(
                f"claims name issuer {shown(given)}, which speaks for another scope "
                f"than this key's ({shown(scope)})"
            )
        return claims, given if isinstance(given, str) else ""
    if named and given != issuer:
        raise InvalidArgument(
            f"claims name issuer {shown(given)}; a key of scope {shown(scope)} signs only "
            f"for {issuer}"
        )
    exp = parsed.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise InvalidArgument(
            f'claims need a numeric "exp": tokens of scope {shown(scope)} are published by '
            "an issuer, whose retired keys stay published only for a bounded time"
        )
    limit = jwt.max_token_lifetime_seconds
    if exp > now + limit:
        raise InvalidArgument(
            f'"exp" is {exp - now:.0f} s ahead; tokens of scope {shown(scope)} may live at '
            f"most {limit:g} s (jwt.max_token_lifetime_seconds)"
        )
    if set_issuer and not named:
        member = json.dumps({"iss": issuer}, separators=(",", ":"))[1:-1].encode()
        start = claims.index(b"{") + 1  # check_claims parsed an object: '{' comes first
        rest = claims[start:]
        sep = b"," if parsed else b""
        claims = claims[:start] + member + sep + rest
    return claims, issuer if named or set_issuer else ""


def _same_url(url: str) -> str:
    """An issuer URL as verifiers are likely to compare it: case-insensitive scheme and host,
    no final slash (the configured ones have no uppercase and no final slash)."""
    return url.strip().rstrip("/").lower()


def slug(issuer: str) -> str:
    """The issuer's directory under ``jwt.issuers_dir`` (the URL's one path segment)."""
    return urlsplit(issuer).path.strip("/")


def documents(issuer: str, jwks: Mapping[str, Any]) -> dict[str, bytes]:
    """An issuer's files: its JWKS and its OpenID configuration (discovery), as bytes that
    depend only on their content (so replicas and ticks write identical files)."""
    algs = sorted({str(k["alg"]) for k in jwks.get("keys", ())})
    discovery = {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/{JWKS_FILE}",
        "id_token_signing_alg_values_supported": algs,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
    }
    return {
        JWKS_FILE: json.dumps(jwks, sort_keys=True).encode(),
        DISCOVERY_FILE: json.dumps(discovery, sort_keys=True).encode(),
    }


# What the publisher may find in an issuer's directory: its two documents and its temporary
# files. A directory holding anything else is not the publisher's to remove.
_DOCUMENTS = {JWKS_FILE, DISCOVERY_FILE}
_TMP = ".tmp-"
# A temporary file older than this is a write that died (a crash between mkstemp and rename);
# younger ones may be another replica's write in flight, in a directory replicas share.
STALE_TMP_SECONDS = 300.0
SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def write_if_changed(path: Path, data: bytes) -> bool:
    """Replaces ``path`` with ``data`` atomically (nginx never serves half a file), unless it
    already holds exactly that (its ETag then stays)."""
    try:
        old = path.stat()
        if old.st_size == len(data) and path.read_bytes() == data:
            return False
        old_mtime = int(old.st_mtime)
    except FileNotFoundError:
        old_mtime = 0
    # A ".tmp-" name: the front's location pattern never serves one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        # nginx's ETag is "<mtime in seconds>-<size>": two sets of one size written within a
        # second would share it, and a verifier revalidating with If-None-Match would keep the
        # old one (measured). The new file is made at least a second younger than the old.
        t = max(int(time.time()), old_mtime + 1)
        os.utime(tmp, (t, t))
        os.rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)
    return True


def _sync_dir(path: Path) -> None:
    """The rename made durable: after a power cut the new file is served, not the old."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _public_dir(path: Path) -> None:
    """``path`` and its missing parents, directories the front (another user, when run as root)
    may enter and read: 0755 whatever the umask (the service's is owner-only)."""
    if path.is_dir() and not path.is_symlink():
        return
    if not path.parent.is_dir():
        _public_dir(path.parent)
    path.mkdir()
    os.chmod(path, 0o755)  # noqa: S103 (public documents, read by the front)


def _files(directory: Path) -> set[str]:
    """Every non-directory under ``directory``, relative, without following links."""
    found: set[str] = set()
    for parent, dirs, files in os.walk(directory):
        rel = Path(parent).relative_to(directory)
        found.update(str(rel / name) for name in files)
        found.update(str(rel / name) for name in dirs if (Path(parent) / name).is_symlink())
    return found


def _is_tmp(rel: str) -> bool:
    return Path(rel).name.startswith(_TMP)


class Publisher:
    """Writes every configured issuer's documents under ``jwt.issuers_dir``, from ``jwks``
    (scope -> the scope's JWKS as the keyring publishes it). Run by the service at start, every
    ``jwt.publish_interval_seconds`` and after each key change it makes; every replica runs
    one against the shared store, and they write the same bytes."""

    def __init__(self, jwt: JwtConfig, jwks: Callable[[str], Mapping[str, Any]]) -> None:
        self._jwt = jwt
        self._jwks = jwks
        self.root = Path(jwt.issuers_dir).absolute()
        self._said = Every(3600.0)  # a directory left alone is said once an hour, not each tick

    @property
    def enabled(self) -> bool:
        return bool(self._jwt.issuer_of)

    def publish(self) -> Publication:
        """Writes what changed, issuer by issuer (one that fails holds up no other: a disabled
        key must leave the other issuers' sets all the same), then removes what no configured
        issuer owns. A failure is logged and counted; the old files stay served and the next
        tick tries again."""
        done = Publication()
        issuers = self._jwt.issuer_of
        for scope, issuer in issuers.items():
            try:
                done.written += self._publish_one(scope, issuer)
            except (OSError, SignerError) as exc:
                done.failed += 1
                log.error(
                    "issuer documents not published",
                    extra={"issuer": issuer, "scope": scope, "error": _reason(exc)},
                )
        try:
            self._prune({slug(i) for i in issuers.values()})
        except OSError as exc:
            done.failed += 1
            log.error("old issuer documents not removed", extra={"error": _reason(exc)})
        return done

    def _publish_one(self, scope: str, issuer: str) -> int:
        written = 0
        directory = self.root / slug(issuer)
        for name, data in documents(issuer, self._jwks(scope)).items():
            path = directory / name
            _public_dir(path.parent)
            if write_if_changed(path, data):
                written += 1
                log.info(
                    "issuer document published",
                    extra={"issuer": issuer, "scope": scope, "document": name},
                )
        return written

    def _prune(self, configured: set[str]) -> None:
        """Directories of issuers no longer configured (one removed because its scope was
        compromised must not stay online), and temporary files of writes that died. Only what
        the publisher writes is removed: a directory holding anything else is left, and said."""
        if not self.root.is_dir():
            return
        now = time.time()
        for entry in self.root.iterdir():
            if entry.is_symlink() or not entry.is_dir() or not SLUG.fullmatch(entry.name):
                continue
            files = _files(entry)
            stale = {
                rel
                for rel in files
                if _is_tmp(rel) and now - (entry / rel).lstat().st_mtime > STALE_TMP_SECONDS
            }
            if entry.name in configured:
                for rel in stale:
                    (entry / rel).unlink(missing_ok=True)
                continue
            if not files <= _DOCUMENTS | stale:
                if self._said.due(entry.name) is not None:
                    log.warning(
                        "not removing an unconfigured issuer directory: it holds other files",
                        extra={"path": str(entry)},
                    )
                continue
            for rel in files:
                (entry / rel).unlink(missing_ok=True)
            for sub in (entry / ".well-known", entry):
                if sub.is_dir() and not sub.is_symlink():
                    sub.rmdir()
            log.info("issuer documents removed", extra={"path": str(entry)})


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SignerError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror)
    return type(exc).__name__


@dataclass
class Publication:
    """What one publication did."""

    written: int = 0
    failed: int = 0
