"""JWTs signed in the token, JWKS documents that carry each key's scope, and a verifier that
checks the scope.

The incident this project answers: a key of one scope (consumer) signed tokens that verifiers
of another scope (enterprise) accepted, because they only checked that *some* trusted key had
signed. Here every JWK names its key's scope, and :func:`verify_jwt` refuses a token whose key
is of another scope than the verifier expects, even when the signature is valid.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

import jwt

from signer.errors import InvalidArgument, TokenRejected, shown

MAX_CLAIMS_BYTES = 64 * 1024
# Deeper than any claims set needs, and far from where parsers give up (Python's json raises
# RecursionError somewhere past 1,000 levels, sooner on a thread already deep in its stack).
MAX_CLAIMS_DEPTH = 128


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class _Refused(Exception):
    """Claims that Python's json would take, but that JSON or JWT does not allow."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A member named twice is refused (RFC 7519, section 4: claim names are unique). Verifiers
    that keep the first and verifiers that keep the last would read two different tokens from
    one signature: ``{"sub": "me", "sub": "admin"}`` (issue 12)."""
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:
            raise _Refused("claims name one member twice: member names must be unique")
        members[name] = value
    return members


def _no_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity are Python's json's, not JSON (RFC 8259): other parsers
    refuse the token, or read something else."""
    raise _Refused(f"claims hold {name}, which is not JSON")


# A string, or an unterminated one to the end: each character is looked at once (a pattern
# that needed the closing quote tried again from every later quote: 6.8 s for 64 KiB of \").
_STRING = re.compile(r'"(?:[^"\\]|\\.)*+"?')
_BRACKET = re.compile(r"[\[\]{}]")


def _too_deep(text: str) -> bool:
    """Whether arrays and objects nest more than MAX_CLAIMS_DEPTH deep in JSON text (brackets
    inside strings not counted), found without recursing."""
    depth = 0
    for bracket in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > MAX_CLAIMS_DEPTH:
            return True
    return False


def check_claims(claims: bytes) -> dict[str, Any]:
    """The claims set must be a UTF-8 JSON object of at most 64 KiB, nested at most
    MAX_CLAIMS_DEPTH deep, its member names unique, its numbers of at most 4,300 digits
    (Python's int conversion limit), with no NaN or Infinity.

    A refusal is INVALID_ARGUMENT naming what is wrong, never echoing the claims (the UTF-8
    codec's own message shows the offending byte). The depth is bounded before parsing: left to
    the parser's RecursionError, whether 1,900 levels were signed or refused depended on how
    deep the calling thread's stack already was (issue 12), and a token nested so deep is one
    its verifiers' parsers may refuse."""
    if not claims:
        raise InvalidArgument("claims are empty: send a JSON object")
    if len(claims) > MAX_CLAIMS_BYTES:
        raise InvalidArgument(
            f"claims are {len(claims)} bytes; at most {MAX_CLAIMS_BYTES} are accepted"
        )
    try:
        text = claims.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"claims are not UTF-8: byte {exc.start} is not valid") from None
    if text.count("[") + text.count("{") > MAX_CLAIMS_DEPTH and _too_deep(text):
        raise InvalidArgument(
            f"claims nest arrays or objects too deeply: more than {MAX_CLAIMS_DEPTH} levels"
        )
    try:
        parsed = json.loads(text, object_pairs_hook=_unique_members, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"claims are not UTF-8 JSON: {exc}") from None
    except _Refused as exc:
        raise InvalidArgument(str(exc)) from None
    except ValueError:
        # A number of more digits than int() converts (sys.get_int_max_str_digits()).
        raise InvalidArgument(
            "claims hold a number of more than 4300 digits, which this service does not parse"
        ) from None
    except RecursionError:
        # json has no depth limit of its own: 64 KiB of '[' ends in Python's recursion limit.
        raise InvalidArgument("claims nest arrays or objects too deeply") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"claims must be a JSON object, not {type(parsed).__name__}")
    return parsed


def signing_input(alg: str, kid: str, claims: bytes) -> bytes:
    header = json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}, separators=(",", ":"))
    return b64url(header.encode()) + b"." + b64url(claims)


def compact(signing_input: bytes, signature: bytes) -> str:
    return (signing_input + b"." + b64url(signature)).decode("ascii")


def verify_jwt(
    token: str,
    jwks: Mapping[str, Any],
    expected_scope: str,
    issuer: str,
    audience: str,
    leeway: float = 0,
) -> dict[str, Any]:
    """The claims of ``token`` if, and only if: its ``kid`` names exactly one key of ``jwks``;
    that key's ``scope`` is ``expected_scope``; the header's ``alg`` is the key's; the signature
    verifies; and ``exp`` (required), ``nbf``, ``iss`` and ``aud`` hold. Otherwise
    :class:`TokenRejected` saying which."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenRejected(f"not a compact JWS: {exc}") from None
    kid, alg = header.get("kid"), header.get("alg")
    # The JWKS may come from elsewhere than our service (a verifier's cache, a proxy): one that
    # is not a JWK Set is a reason to refuse the token, not another exception (issue 12).
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list):
        raise TokenRejected("the JWKS has no list of keys")
    found = [k for k in keys if isinstance(k, Mapping) and k.get("kid") == kid]
    if len(found) != 1:
        raise TokenRejected(
            f"the JWKS has {'no' if not found else len(found)} key(s) with kid {shown(kid)}"
        )
    jwk = found[0]
    scope = jwk.get("scope")
    if scope != expected_scope:
        raise TokenRejected(
            f"key {shown(kid)} belongs to scope {shown(scope)}, not {expected_scope!r}: "
            "its tokens are not for this verifier, whatever their signature"
        )
    if (
        not isinstance(alg, str)
        or alg != jwk.get("alg")
        or alg not in jwt.algorithms.get_default_algorithms()
    ):
        raise TokenRejected(f"header alg {shown(alg)} is not the key's ({shown(jwk.get('alg'))})")
    try:
        key = jwt.PyJWK(dict(jwk)).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # PyJWT lets a malformed member through as the error of whatever touched it first.
        raise TokenRejected(f"key {shown(kid)} of the JWKS is not usable: {exc}") from None
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": ["exp", "iss", "aud"]},
        )
    except jwt.PyJWTError as exc:
        raise TokenRejected(f"{type(exc).__name__}: {exc}") from None
    return claims
