"""Who may do what to which keys: callers, operations, grants. Default deny.

A policy file is TOML, a list of grants::

    [[grant]]
    callers = ["x509:O=acme,CN=payments", "uid:1000", "user:deploy"]
    operations = ["sign", "verify", "read"]
    scopes = ["consumer"]          # keys whose scope is one of these ("*": any scope)
    keys = ["payments-*"]          # and/or keys whose name matches one of these globs

A grant applies to a key when the key's scope is listed and its name matches one of the
patterns; a grant that leaves out ``scopes`` or ``keys`` does not restrict by it (but must give
one of them). Creating or importing a new key needs a grant that lists its scope.

Callers are named by how they authenticated: ``x509:`` and the
verified client certificate's subject as the mTLS front gives it (RFC 4514, e.g.
``O=acme,CN=payments``), ``uid:`` and ``user:`` for the peer of the Unix socket (SO_PEERCRED).
Anything else is refused when the file is loaded, so a typo cannot grant or deny by accident.

A certificate is known by its issuer and serial as well as its subject (issue 11). A grant may
name the issuers its ``x509:`` callers must come from; without ``issuers`` it takes the subject
from any CA the front trusts (``front.client_ca``, one CA in ``signer run``). One certificate is
revoked, without revoking its subject, by its issuer and serial::

    [[grant]]
    callers = ["x509:CN=payments"]
    issuers = ["CN=signer development CA"]   # as the front gives it (RFC 4514)
    operations = ["sign"]
    scopes = ["consumer"]

    [[revoked]]
    issuer = "CN=signer development CA"
    serials = ["4F1AB3..."]                  # hex, as openssl x509 -serial prints it

A revoked certificate's calls are UNAUTHENTICATED; SIGHUP applies a new list at once.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from signer._internal.config import line_of, parse_toml, read_text
from signer.errors import ConfigError, shown


class Operation(StrEnum):
    """What a grant can allow, by the name a policy file gives it. Which one each RPC needs is
    written down once, in :data:`signer._internal.server.OPERATION_OF`."""

    SIGN = "sign"
    VERIFY = "verify"
    READ = "read"
    CREATE = "create"
    ROTATE = "rotate"
    IMPORT = "import"
    DISABLE = "disable"
    DESTROY = "destroy"


OPERATIONS = frozenset(Operation)
ANY = "*"
_CALLER_KINDS = ("x509:", "uid:", "user:")


def serial_number(text: str) -> str:
    """A certificate serial as one form: hex, upper case, no separators or leading zeros."""
    digits = text.replace(":", "").replace(" ", "").upper().lstrip("0")
    return digits or "0"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: every name it may be granted by (``x509:...``, or ``uid:N``
    and ``user:NAME``). ``display`` is what errors show; a certificate's issuer and serial
    complete its :attr:`identity`."""

    names: frozenset[str]
    display: str
    issuer: str = ""  # a certificate's issuer DN, as the front gives it
    serial: str = ""  # a certificate's serial (serial_number form)

    @property
    def identity(self) -> str:
        """Who it is, fully: what the audit log records, what an import token is bound to, what
        the refusal throttle counts."""
        if not self.issuer:
            return self.display
        return f"{self.display} (issuer {self.issuer}, serial {self.serial})"

    @classmethod
    def x509(cls, subject: str, issuer: str = "", serial: str = "") -> Caller:
        return cls(
            frozenset({f"x509:{subject}"}),
            f"x509:{subject}",
            issuer,
            serial_number(serial) if serial else "",
        )

    @classmethod
    def unix(cls, uid: int, user: str | None) -> Caller:
        names = {f"uid:{uid}"} | ({f"user:{user}"} if user else set())
        return cls(frozenset(names), f"uid:{uid}" + (f"({user})" if user else ""))


@dataclass(frozen=True)
class Grant:
    callers: frozenset[str]
    operations: frozenset[Operation]
    scopes: frozenset[str]
    keys: tuple[str, ...]
    issuers: frozenset[str] = frozenset()  # empty: any issuer the front trusts

    def covers(self, caller: Caller, operation: Operation) -> bool:
        if operation not in self.operations or self.callers.isdisjoint(caller.names):
            return False
        # Pinned issuers bind certificates; a certificate whose issuer is unknown (a front that
        # did not say) is not covered: fail closed.
        certificate = any(name.startswith("x509:") for name in caller.names)
        return not (self.issuers and certificate and caller.issuer not in self.issuers)

    def applies_to(self, name: str, scope: str | None) -> bool:
        """``scope`` None: a key that does not exist. Only a grant by name, or one for any scope,
        matches it; then the caller may learn that it does not exist."""
        if self.scopes and ANY not in self.scopes and (scope is None or scope not in self.scopes):
            return False
        return not self.keys or self.names_key(name)

    def names_scope(self, scope: str) -> bool:
        return ANY in self.scopes or scope in self.scopes

    def names_key(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keys)


@dataclass(frozen=True)
class Policy:
    grants: tuple[Grant, ...]
    source: str = ""
    revoked: frozenset[tuple[str, str]] = frozenset()  # (issuer, serial) of revoked certificates

    def revocation(self, caller: Caller) -> str | None:
        """Why ``caller``'s certificate may not call at all, or None."""
        if caller.issuer and (caller.issuer, caller.serial) in self.revoked:
            return (
                f"certificate {caller.serial} of {caller.issuer} ({caller.display}) is revoked "
                "by the policy"
            )
        return None

    def allows(self, caller: Caller, operation: Operation, name: str, scope: str | None) -> bool:
        """Whether ``caller`` may perform ``operation`` on key ``name`` of ``scope``."""
        return any(g.covers(caller, operation) and g.applies_to(name, scope) for g in self.grants)

    def allows_new(self, caller: Caller, operation: Operation, name: str, scope: str) -> bool:
        """For a key that does not exist yet (create, import): may ``caller`` make key ``name``
        in ``scope``? The grant must name the scope, and if it lists key patterns, one must
        match the name as well."""
        return any(
            g.covers(caller, operation)
            and g.names_scope(scope)
            and (not g.keys or g.names_key(name))
            for g in self.grants
        )

    def allows_any(self, caller: Caller, operation: Operation) -> bool:
        """Whether any grant gives ``caller`` ``operation`` at all (GetImportParameters)."""
        return any(g.covers(caller, operation) for g in self.grants)


DENY_ALL = Policy((), "no policy: every call is refused")


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a non-empty list of non-empty strings")
    return value


def _line(text: str, table: str, index: int = 1) -> str:
    line = line_of(text, table, index=index) if text else None
    return f" (line {line})" if line is not None else ""


def parse(data: dict[str, Any], source: str = "", text: str = "") -> Policy:
    """A policy from a parsed file; ``text``, the file's text, lets a message name the line of
    the entry it is about."""
    unknown = set(data) - {"grant", "revoked"}
    if unknown:
        first = sorted(unknown)[0]
        raise ConfigError(
            f"policy {source}: unknown table(s) {', '.join(shown(u) for u in sorted(unknown))}"
            + _line(text, first)
        )
    raw = data.get("grant", [])
    if not isinstance(raw, list):
        raise ConfigError(f"policy {source}: 'grant' must be an array of tables ([[grant]])")
    grants = []
    for i, g in enumerate(raw, 1):
        where = f"policy {source}: grant #{i}{_line(text, 'grant', i)}"
        if not isinstance(g, dict):
            raise ConfigError(f"{where} must be a table")
        extra = set(g) - {"callers", "operations", "scopes", "keys", "issuers"}
        if extra:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(shown(x) for x in sorted(extra))}"
            )
        callers = _strings(g.get("callers"), f"{where}: callers")
        bad = [c for c in callers if not c.startswith(_CALLER_KINDS) or c.endswith(":")]
        if bad:
            raise ConfigError(
                f"{where}: caller(s) {', '.join(map(shown, bad))} must start with "
                f"{', '.join(_CALLER_KINDS)} and name someone"
            )
        for c in callers:
            # isascii: str.isdigit() takes other scripts' digits, which no peer's uid has.
            if c.startswith("uid:") and not (c[4:].isascii() and c[4:].isdigit()):
                raise ConfigError(f"{where}: {shown(c)} is not a numeric uid")
        names = _strings(g.get("operations"), f"{where}: operations")
        # '*' stands for every operation and makes the rest of the list moot: it was so before
        # the names were checked against Operation, and a file that loaded must keep loading.
        if ANY in names:
            names = [ANY]
        wrong = sorted(set(names) - OPERATIONS - {ANY})
        if wrong:
            raise ConfigError(
                f"{where}: unknown operation(s) {', '.join(map(shown, wrong))} "
                f"(known: {', '.join(sorted(OPERATIONS))}, or '*')"
            )
        ops = OPERATIONS if ANY in names else frozenset(map(Operation, names))
        scopes = _strings(g.get("scopes", []), f"{where}: scopes") if "scopes" in g else []
        keys = _strings(g.get("keys", []), f"{where}: keys") if "keys" in g else []
        if not scopes and not keys:
            raise ConfigError(f"{where}: give scopes, keys or both ('*' for all)")
        issuers = _strings(g["issuers"], f"{where}: issuers") if "issuers" in g else []
        grants.append(
            Grant(frozenset(callers), ops, frozenset(scopes), tuple(keys), frozenset(issuers))
        )
    return Policy(tuple(grants), source, _revoked(data.get("revoked", []), source, text))


def _revoked(raw: Any, source: str, text: str) -> frozenset[tuple[str, str]]:
    if not isinstance(raw, list):
        raise ConfigError(f"policy {source}: 'revoked' must be an array of tables ([[revoked]])")
    out: set[tuple[str, str]] = set()
    for i, r in enumerate(raw, 1):
        where = f"policy {source}: revoked #{i}{_line(text, 'revoked', i)}"
        if not isinstance(r, dict) or set(r) != {"issuer", "serials"}:
            raise ConfigError(f"{where} must be a table with issuer and serials, and nothing else")
        if not isinstance(r["issuer"], str) or not r["issuer"]:
            raise ConfigError(f"{where}: issuer must be a non-empty string (the issuer's DN)")
        for serial in _strings(r["serials"], f"{where}: serials"):
            digits = serial_number(serial)
            if not all(c in "0123456789ABCDEF" for c in digits):
                raise ConfigError(f"{where}: serial {shown(serial)} is not hexadecimal")
            out.add((r["issuer"], digits))
    return frozenset(out)


def grant_everything(callers: Iterable[str]) -> str:
    """A policy file's text granting ``callers`` every operation on every key: what
    ``signer run``, the crash lab and the benchmarks start from."""
    names = ", ".join(json.dumps(c) for c in callers)
    return f'[[grant]]\ncallers = [{names}]\noperations = ["*"]\nscopes = ["*"]\n'


def load(path: str | Path) -> Policy:
    """Reads and checks a policy file; any problem is a ConfigError naming it and, where it can,
    the line (the service keeps its old policy when a reload raises one)."""
    text = read_text(path, "policy file")
    return parse(parse_toml(text, f"policy file {path}"), str(path), text)
