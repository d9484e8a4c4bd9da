"""signer._internal.issuers: what SignJWT lets an issuer's key sign, and the files the
publisher writes for the front."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from signer import jose
from signer._internal import config as config_mod
from signer._internal.issuers import Publisher, claims_for, write_if_changed
from signer.errors import ConfigError, FailedPrecondition, InvalidArgument

ENTERPRISE = "https://id.example:8443/enterprise"
CONSUMER = "https://id.example:8443/consumer"
JWT = config_mod.JwtConfig(
    issuers=f"enterprise={ENTERPRISE}, consumer={CONSUMER}", max_token_lifetime_seconds=3600
)
NOW = 1_800_000_000.0


def signed(claims: bytes, scope: str, *, set_issuer: bool = False) -> tuple[bytes, str]:
    return claims_for(claims, jose.check_claims(claims), scope, JWT, NOW, set_issuer=set_issuer)


def test_set_issuer_puts_the_scopes_issuer_first_and_keeps_every_other_byte() -> None:
    claims = b'{ "sub":"alice",  "exp": 1800000600, "n": 1.50 }'
    out, issuer = signed(claims, "enterprise", set_issuer=True)
    assert issuer == ENTERPRISE
    assert out == b'{"iss":"https://id.example:8443/enterprise", "sub":"alice",  "exp": ' + (
        b'1800000600, "n": 1.50 }'
    )
    assert json.loads(out)["iss"] == ENTERPRISE


def test_set_issuer_on_claims_that_name_it_already_changes_nothing() -> None:
    claims = json.dumps({"iss": ENTERPRISE, "exp": NOW + 60}).encode()
    assert signed(claims, "enterprise", set_issuer=True) == (claims, ENTERPRISE)


def test_an_issuers_key_cannot_name_another_issuer() -> None:
    claims = json.dumps({"iss": CONSUMER, "exp": NOW + 60}).encode()
    with pytest.raises(InvalidArgument, match=re.escape(f"signs only for {ENTERPRISE}")):
        signed(claims, "enterprise")


def test_a_key_of_a_scope_without_issuer_cannot_name_an_issuer() -> None:
    claims = json.dumps({"iss": ENTERPRISE}).encode()
    with pytest.raises(InvalidArgument, match="speaks for another scope"):
        signed(claims, "payments")
    # Any other iss is the caller's business, as before issuers.
    other = json.dumps({"iss": "https://elsewhere"}).encode()
    assert signed(other, "payments") == (other, "https://elsewhere")


def test_set_issuer_without_an_issuer_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="has no issuer"):
        signed(b'{"sub":"a"}', "payments", set_issuer=True)


@pytest.mark.parametrize(
    ("exp", "message"),
    [
        (None, 'need a numeric "exp"'),
        ("soon", 'need a numeric "exp"'),
        (True, 'need a numeric "exp"'),
        (NOW + 3601, "may live at most 3600 s"),
        (1e308, "may live at most"),
    ],
)
def test_an_issuers_tokens_have_a_bounded_lifetime(exp: Any, message: str) -> None:
    claims = json.dumps({"sub": "a"} if exp is None else {"exp": exp}).encode()
    with pytest.raises(InvalidArgument, match=message):
        signed(claims, "enterprise", set_issuer=True)
    assert signed(json.dumps({"exp": NOW + 3600}).encode(), "enterprise")[1] == ""


def test_the_issuer_joins_a_one_member_object_with_a_comma() -> None:
    out, _ = signed(b'{"exp":1800000001}', "enterprise", set_issuer=True)
    assert out == b'{"iss":"https://id.example:8443/enterprise","exp":1800000001}'


def jwks(*kids: str) -> dict[str, Any]:
    return {"keys": [{"kid": k, "alg": "ES256", "kty": "EC", "scope": "enterprise"} for k in kids]}


def test_the_publisher_writes_each_issuers_documents(tmp_path: Path) -> None:
    cfg = config_mod.JwtConfig(issuers=f"enterprise={ENTERPRISE}", issuers_dir=str(tmp_path / "i"))
    seen: list[str] = []

    def source(scope: str) -> dict[str, Any]:
        seen.append(scope)
        return jwks("e/1")

    assert Publisher(cfg, source).publish() == 2
    assert seen == ["enterprise"]
    root = tmp_path / "i" / "enterprise"
    assert json.loads((root / "jwks.json").read_bytes()) == jwks("e/1")
    discovery = json.loads((root / ".well-known" / "openid-configuration").read_bytes())
    assert discovery["issuer"] == ENTERPRISE
    assert discovery["jwks_uri"] == f"{ENTERPRISE}/jwks.json"
    assert discovery["id_token_signing_alg_values_supported"] == ["ES256"]
    for path in (tmp_path / "i", root, root / ".well-known"):
        assert path.stat().st_mode & 0o777 == 0o755, path
    assert (root / "jwks.json").stat().st_mode & 0o777 == 0o644
    # Unchanged: nothing written, so the ETag (mtime, size) stays.
    assert Publisher(cfg, source).publish() == 0
    assert not [p for p in root.rglob(".tmp-*")]


def test_a_rewrite_is_a_second_younger_so_the_etag_changes(tmp_path: Path) -> None:
    """nginx's ETag is mtime (seconds) and size: two JWKS of one size within a second would
    share it, and a verifier's If-None-Match would keep the old set."""
    path = tmp_path / "jwks.json"
    assert write_if_changed(path, json.dumps(jwks("e/1")).encode())
    first = path.stat()
    assert write_if_changed(path, json.dumps(jwks("e/2")).encode())
    second = path.stat()
    assert first.st_size == second.st_size
    assert int(second.st_mtime) > int(first.st_mtime)
    assert not write_if_changed(path, json.dumps(jwks("e/2")).encode())
    assert path.stat().st_mtime == second.st_mtime


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jwks.json"
    write_if_changed(path, b"old")

    def full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        write_if_changed(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["jwks.json"]


@pytest.mark.parametrize(
    ("issuers", "message"),
    [
        ("enterprise", "each entry is SCOPE="),
        ("enterprise=http://id.example/e", "must be https://HOST"),
        ("enterprise=https://id.example/e/", "must be https://HOST"),
        ("enterprise=https://id.example/e?x=1", "must be https://HOST"),
        ("enterprise=https://id.example/", "must be https://HOST"),
        ("Enterprise=https://id.example/e", "is not a scope name"),
        ("a=https://id.example/e, a=https://id.example/f", "binds scope 'a' to two issuers"),
        ("a=https://id.example/e, b=https://other.example/e", "two issuers end in /e"),
    ],
)
def test_bad_issuers_are_refused(issuers: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        config_mod.load(None, {"SIGNER_JWT_ISSUERS": issuers})


def test_grace_shorter_than_a_tokens_life_is_refused() -> None:
    env = {"SIGNER_JWT_RETIRED_GRACE_SECONDS": "60", "SIGNER_JWT_MAX_TOKEN_LIFETIME_SECONDS": "61"}
    with pytest.raises(ConfigError, match=r"retired_grace_seconds .* is shorter"):
        config_mod.load(None, env)
