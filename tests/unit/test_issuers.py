"""signer._internal.issuers: what SignJWT lets an issuer's key sign, and the files the
publisher writes for the front."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from signer import jose
from signer._internal import config as config_mod
from signer._internal.issuers import (
    STALE_TMP_SECONDS,
    Publication,
    Publisher,
    claims_for,
    write_if_changed,
)
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

    assert Publisher(cfg, source).publish() == Publication(written=2)
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
    assert Publisher(cfg, source).publish() == Publication()
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
        ("enterprise=https://-/e", "must be https://HOST"),
        ("enterprise=https://../e", "must be https://HOST"),
        ("enterprise=https://[:]/e", "must be https://HOST"),
        ("enterprise=https://[zz::1]/e", "must be https://HOST"),
        ("enterprise=https://id.example:0/e", "must be https://HOST"),
        ("enterprise=https://id.example:99999/e", "must be https://HOST"),
        ("Enterprise=https://id.example/e", "is not a scope name"),
        ("a=https://id.example/e, a=https://id.example/f", "binds scope 'a' to two issuers"),
        ("a=https://id.example/e, b=https://other.example/e", "two issuers end in /e"),
    ],
)
def test_bad_issuers_are_refused(issuers: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        config_mod.load(None, {"SIGNER_JWT_ISSUERS": issuers})


@pytest.mark.parametrize(
    "url", ["https://id.example/e", "https://localhost:8443/e", "https://[::1]:8443/e"]
)
def test_good_issuers_are_taken(url: str) -> None:
    cfg = config_mod.load(None, {"SIGNER_JWT_ISSUERS": f"enterprise={url}"})
    assert cfg.jwt.issuer_of == {"enterprise": url}


def test_grace_shorter_than_a_tokens_life_is_refused() -> None:
    env = {"SIGNER_JWT_RETIRED_GRACE_SECONDS": "60", "SIGNER_JWT_MAX_TOKEN_LIFETIME_SECONDS": "61"}
    with pytest.raises(ConfigError, match=r"retired_grace_seconds .* is shorter"):
        config_mod.load(None, env)


def test_a_null_or_other_iss_is_never_doubled_nor_let_through() -> None:
    """Review of issue 17: "iss": null was taken for no iss, and set_issuer added a second one
    (last-wins parsers then saw null)."""
    for given in (b"null", b"1", b'"https://id.example:8443/consumer"', b"[]"):
        claims = b'{"iss":' + given + b',"exp":1800000060}'
        with pytest.raises(InvalidArgument, match="signs only for"):
            signed(claims, "enterprise", set_issuer=True)


def test_another_scopes_issuer_is_refused_however_it_is_spelt() -> None:
    for spelt in (ENTERPRISE + "/", ENTERPRISE.upper(), " " + ENTERPRISE):
        with pytest.raises(InvalidArgument, match="speaks for another scope"):
            signed(json.dumps({"iss": spelt}).encode(), "payments")


def two_issuers(tmp_path: Path) -> config_mod.JwtConfig:
    return config_mod.JwtConfig(
        issuers=f"enterprise={ENTERPRISE}, consumer={CONSUMER}", issuers_dir=str(tmp_path / "i")
    )


def test_one_issuer_that_fails_holds_up_no_other(tmp_path: Path) -> None:
    """A file where the first issuer's directory should be: the second issuer's set (say, one
    a disabled key just left) is still published, and the failure counted."""
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "enterprise").write_text("in the way")
    done = Publisher(two_issuers(tmp_path), lambda scope: jwks(f"{scope}/1")).publish()
    assert done == Publication(written=2, failed=1)
    assert json.loads((tmp_path / "i" / "consumer" / "jwks.json").read_bytes()) == jwks(
        "consumer/1"
    )


def test_an_issuer_no_longer_configured_is_removed(tmp_path: Path) -> None:
    Publisher(two_issuers(tmp_path), lambda scope: jwks(f"{scope}/1")).publish()
    only = config_mod.JwtConfig(issuers=f"enterprise={ENTERPRISE}", issuers_dir=str(tmp_path / "i"))
    done = Publisher(only, lambda scope: jwks(f"{scope}/1")).publish()
    assert done == Publication()
    assert sorted(p.name for p in (tmp_path / "i").iterdir()) == ["enterprise"]


def test_a_directory_with_other_files_is_left_alone(tmp_path: Path) -> None:
    """issuers_dir set to a directory that holds other things: nothing there is removed."""
    root = tmp_path / "i"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("x")
    (root / "docs" / ".well-known").mkdir(parents=True)
    (root / "docs" / "jwks.json").write_text("{}")
    (root / "docs" / "README").write_text("mine")
    only = config_mod.JwtConfig(issuers=f"enterprise={ENTERPRISE}", issuers_dir=str(root))
    Publisher(only, lambda scope: jwks(f"{scope}/1")).publish()
    assert (root / "etc" / "passwd").exists()
    assert (root / "docs" / "README").exists()


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path: Path) -> None:
    """A write that died between mkstemp and rename leaves a .tmp- file; one younger than
    STALE_TMP_SECONDS may be another replica's write in flight."""
    cfg = two_issuers(tmp_path)
    Publisher(cfg, lambda scope: jwks(f"{scope}/1")).publish()
    stale = tmp_path / "i" / "enterprise" / ".tmp-dead"
    fresh = tmp_path / "i" / "enterprise" / ".well-known" / ".tmp-live"
    stale.write_text("x")
    fresh.write_text("x")
    old = time.time() - STALE_TMP_SECONDS - 1
    os.utime(stale, (old, old))
    Publisher(cfg, lambda scope: jwks(f"{scope}/1")).publish()
    assert not stale.exists()
    assert fresh.exists()


def test_missing_parents_are_made_readable_by_the_front_under_an_owner_only_umask(
    tmp_path: Path,
) -> None:
    cfg = config_mod.JwtConfig(
        issuers=f"enterprise={ENTERPRISE}", issuers_dir=str(tmp_path / "a" / "b" / "i")
    )
    previous = os.umask(0o077)
    try:
        Publisher(cfg, lambda scope: jwks(f"{scope}/1")).publish()
    finally:
        os.umask(previous)
    for path in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "i"):
        assert path.stat().st_mode & 0o777 == 0o755, path
