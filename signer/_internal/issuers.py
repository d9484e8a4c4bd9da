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
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from signer._internal.config import JwtConfig
from signer.errors import FailedPrecondition, InvalidArgument, shown

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
    given = parsed.get("iss")
    if issuer is None:
        if set_issuer:
            raise FailedPrecondition(
                f"scope {shown(scope)} has no issuer ([jwt] issuers): there is no iss to set"
            )
        if isinstance(given, str) and given in issuers.values():
            raise InvalidArgument(
                f"claims name issuer {shown(given)}, which speaks for another scope "
                f"than this key's ({shown(scope)})"
            )
        return claims, given if isinstance(given, str) else ""
    if given is not None and given != issuer:
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
    if set_issuer and given is None:
        member = json.dumps({"iss": issuer}, separators=(",", ":"))[1:-1].encode()
        start = claims.index(b"{") + 1  # check_claims parsed an object: '{' comes first
        rest = claims[start:]
        sep = b"," if parsed else b""
        claims = claims[:start] + member + sep + rest
    return claims, issuer if given is not None or set_issuer else ""


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
    return True


def _public_dir(path: Path, *, parents: bool = False) -> None:
    """A directory the front (another user, when run as root) may enter and read: 0755 whatever
    the umask (the service's is owner-only)."""
    if path.is_dir() and not path.is_symlink():
        return
    path.mkdir(parents=parents)
    os.chmod(path, 0o755)  # noqa: S103 (public documents, read by the front)


class Publisher:
    """Writes every configured issuer's documents under ``jwt.issuers_dir``, from ``jwks``
    (scope -> the scope's JWKS as the keyring publishes it). Run by the service at start, every
    ``jwt.publish_interval_seconds`` and after each key change it makes; every replica runs
    one against the shared store, and they write the same bytes."""

    def __init__(self, jwt: JwtConfig, jwks: Callable[[str], Mapping[str, Any]]) -> None:
        self._jwt = jwt
        self._jwks = jwks
        self.root = Path(jwt.issuers_dir).absolute()

    @property
    def enabled(self) -> bool:
        return bool(self._jwt.issuer_of)

    def publish(self) -> int:
        """Writes what changed; returns how many files were written. A failure leaves the old
        files served and raises (the caller logs it and tries again at the next tick)."""
        written = 0
        if not self.root.is_dir():
            _public_dir(self.root, parents=True)
        for scope, issuer in self._jwt.issuer_of.items():
            directory = self.root / slug(issuer)
            for name, data in documents(issuer, self._jwks(scope)).items():
                path = directory / name
                for parent in reversed(path.relative_to(self.root).parents[:-1]):
                    _public_dir(self.root / parent)
                if write_if_changed(path, data):
                    written += 1
                    log.info(
                        "issuer document published",
                        extra={"issuer": issuer, "scope": scope, "document": name},
                    )
        return written
