"""``signer keys reconcile``: the key store and the token compared, and what a crash left behind
reported and repaired (issue 12).

A key's metadata lives in the store, its private key in the token, and no transaction spans the
two. So a crash at the wrong instant leaves them disagreeing, in one of a few known ways:

* **An object no row names** (*orphan*): made by the token, then the process died before the
  store committed it: ``CreateKey``, ``RotateKey``, ``ImportKeyVersion`` (the unwrapped key),
  ``GetImportParameters`` (the wrapping key pair), the audit key's generation. Nothing ever
  uses or removes it; ``--repair`` destroys it.
* **An object the store says is gone** (*leftover*): a DESTROYED version's, a used or expired
  import token's wrapping key. ``--repair`` destroys it, completing what the store records.
* **A row whose removal was half done** (*unfinished*): the reaper destroyed a version due for
  destruction, or an import's wrapping key, and died before the store said so. ``--repair``
  records it (the version DESTROYED, the import token's key destroyed); the service's reaper
  does the same at its next run, which is at every start.
* **A version whose private key object is missing** (*missing*), a version whose object is not
  its public key's private half (*mismatch*), more than one private key object for a version
  (*duplicate*). No crash of this service makes these: they mean the token was restored from an
  older backup, is the wrong token, or was changed by hand. They are reported and never
  repaired. Marking such a version DESTROYED would record a destruction nobody asked for, hide
  the incident, and stay wrong if the right token comes back; its verifiers still trust its
  public key. A missing version cannot sign (NOT_FOUND); a mismatched one signs what its
  public key does not verify, and is to be disabled first. The operator decides: attach the
  right token or restore it, or retire the version through the lifecycle
  (``schedule-destruction``; the reaper then records it DESTROYED, its object being gone).

What ``--repair`` destroys is never an object a row names, and only an object the service made:
its CKA_LABEL is one the service gives (``NAME/vN``, the import wrapping key's, the audit key's)
and its CKA_ID 16 bytes, as the service draws them.
Anything else in the token (a key provisioned at the token host for ``signer keys adopt``, an
administrator's object) is listed as *unmanaged* and left alone. The token is taken to be this
store's alone, as ``signer hsm init`` makes it: objects of another service's store in the same
token would look like orphans.

Beside a running service: a key generation shows in the token a moment before its row commits,
and a destruction leaves the token a moment before the store says so. So by default the
comparison is made twice, ``grace`` seconds apart, and only what both passes find is reported
(the service commits a generation within the store's 5 s busy timeout, or discards it itself);
each orphan is looked up in the store once more just before it is destroyed. A single pass
(``grace`` 0) is for a stopped service, and refused while one answers on the configured socket.
A service stalled (SIGSTOP) for longer than the grace in the middle of a key generation is not
covered: stop it for that. And the token host finishes a generation a dead service had asked
for (after a SIGKILL, seen in test_sigkill): one pass right after a crash may miss an orphan
still in the making, which the next run finds.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from signer._internal.config import Config
from signer.errors import FailedPrecondition, NotFound
from signer.keys import ImportToken, State, Version, algorithm, algorithm_kind, valid_name

if TYPE_CHECKING:  # the CLI imports this module for its defaults: no PKCS#11 until needed
    from signer._internal.store import Store
    from signer._internal.token import TokenAPI, TokenObject

# CKA_LABELs the service gives the objects it makes (signer/_internal/keyring/,
# signer/_internal/server/_assembly.py).
WRAPPING_KEY_LABEL = "signer/import-wrapping"
AUDIT_KEY_LABEL = "signer-audit-key"
# The CKA_ID the service draws for what it generates (signer/_internal/keyring/_common.py
# KEY_ID_BYTES, the audit key's in signer/_internal/server/_assembly.py).
SERVICE_KEY_ID_BYTES = 16
_VERSION_LABEL = re.compile(r"(?P<name>.+)/v(?P<version>[1-9][0-9]*)")
DEFAULT_GRACE_SECONDS = 15.0

ORPHAN, LEFTOVER, UNFINISHED = "orphan", "leftover", "unfinished"
MISSING, MISMATCH, DUPLICATE, UNMANAGED = "missing", "mismatch", "duplicate", "unmanaged"
# What --repair does about each kind (the others are reported only).
REPAIRABLE = {ORPHAN, LEFTOVER, UNFINISHED}


@dataclass(frozen=True)
class Finding:
    kind: str
    key_id: bytes
    what: str  # the version or import token concerned, or the object's label
    detail: str
    repaired: bool = False

    @property
    def repairable(self) -> bool:
        return self.kind in REPAIRABLE

    @property
    def ident(self) -> tuple[str, bytes]:
        return self.kind, self.key_id

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["key_id"] = self.key_id.hex()
        out["repairable"] = self.repairable
        return out


@dataclass(frozen=True)
class AuditKey:
    """What the audit log says of its key in the token: the CKA_ID it records (None: none yet),
    the public key pinned beside it (DER; a key pinned and not recorded yet is the log's too:
    its first checkpoint was cut short, and the next start adopts it), and whether the log and
    its pin could be read at all (if not, audit-key objects are nobody's to destroy)."""

    key_id: bytes | None = None
    pinned: bytes | None = None
    known: bool = True

    def names(self, key_id: bytes, objs: list[TokenObject]) -> bool:
        """Whether this is the log's key: the one it records, or the one pinned."""
        if key_id == self.key_id:
            return True
        return self.pinned is not None and any(
            o.label == AUDIT_KEY_LABEL and o.public_der == self.pinned for o in objs
        )


@dataclass
class Report:
    versions: int = 0  # key versions in the store
    import_tokens: int = 0  # import tokens whose wrapping key the store still counts on
    objects: int = 0  # token objects
    passes: int = 1
    findings: list[Finding] = field(default_factory=list)

    @property
    def disagreements(self) -> list[Finding]:
        """Findings that are not merely unmanaged objects."""
        return [f for f in self.findings if f.kind != UNMANAGED]

    @property
    def consistent(self) -> bool:
        """Nothing left disagreeing (repaired findings count as resolved)."""
        return not [f for f in self.disagreements if not f.repaired]

    def as_dict(self) -> dict[str, object]:
        return {
            "consistent": self.consistent,
            "versions": self.versions,
            "import_tokens": self.import_tokens,
            "objects": self.objects,
            "passes": self.passes,
            "findings": [f.as_dict() for f in self.findings],
        }

    def table(self) -> str:
        lines = [
            f"store: {self.versions} key versions, {self.import_tokens} import tokens; "
            f"token: {self.objects} objects; {self.passes} pass(es)"
        ]
        if self.findings:
            lines.append(f"{'KIND':<10} {'KEY_ID':<32} {'OF':<40} {'ACTION':<18} DETAIL")
            for f in self.findings:
                action = (
                    "repaired"
                    if f.repaired
                    else "--repair"
                    if f.repairable
                    else "left alone"
                    if f.kind == UNMANAGED
                    else "operator"
                )
                lines.append(
                    f"{f.kind:<10} {f.key_id.hex()[:32]:<32} {f.what[:40]:<40} {action:<18} "
                    f"{f.detail}"
                )
        lines.append(
            "consistent: store and token agree"
            if self.consistent
            else f"NOT consistent: {len([f for f in self.disagreements if not f.repaired])} "
            "disagreement(s) left"
        )
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2) + "\n"


@dataclass(frozen=True)
class _Rows:
    """What the store says, by CKA_ID."""

    versions: dict[bytes, Version]
    live: dict[bytes, ImportToken]  # import tokens still usable
    spent: dict[bytes, ImportToken]  # used or expired, their wrapping key not yet destroyed

    def names(self, key_id: bytes) -> bool:
        return key_id in self.versions or key_id in self.live or key_id in self.spent


def _rows(store: Store, now: datetime) -> _Rows:
    versions: dict[bytes, Version] = {}
    after = ""
    while True:
        page = store.list_keys(after, 500)
        for key in page:
            for v in key.versions:
                versions[v.key_id] = v
        if len(page) < 500:
            break
        after = page[-1].name
    live = {t.key_id: t for t in store.live_import_tokens(now)}
    spent = {t.key_id: t for t in store.spent_import_tokens(now)}
    return _Rows(versions, live, spent)


def _service_made(label: str, key_id: bytes) -> bool:
    """Whether the service made an object: a label it gives and an id as it draws them (16
    random bytes), so that a key an administrator provisioned for ``keys adopt`` is not taken
    for an orphan unless both happen to look so."""
    if len(key_id) != SERVICE_KEY_ID_BYTES:
        return False
    if label in (WRAPPING_KEY_LABEL, AUDIT_KEY_LABEL):
        return True
    m = _VERSION_LABEL.fullmatch(label)
    return m is not None and valid_name(m["name"])


def _of(v: Version) -> str:
    return f"{v.name}/{v.version}"


def survey(store: Store, token: TokenAPI, audit: AuditKey, now: datetime) -> Report:
    """One comparison of the store (read first) with the token; ``audit``: what the audit log
    says of its key."""
    rows = _rows(store, now)
    objects = token.objects()
    groups: dict[bytes, list[TokenObject]] = {}
    for obj in objects:
        groups.setdefault(obj.key_id, []).append(obj)
    report = Report(len(rows.versions), len(rows.live) + len(rows.spent), len(objects))

    def note(kind: str, key_id: bytes, what: str, detail: str) -> None:
        report.findings.append(Finding(kind, key_id, what, detail))

    def has_private(key_id: bytes) -> bool:
        return any(o.kind == "private" for o in groups.get(key_id, []))

    for key_id, v in rows.versions.items():
        privates = [o for o in groups.get(key_id, []) if o.kind == "private"]
        if v.state is State.DESTROYED:
            if key_id in groups:
                note(LEFTOVER, key_id, _of(v), "destroyed version, its objects still in the token")
        elif not privates:
            if _due(v, now):
                note(
                    UNFINISHED,
                    key_id,
                    _of(v),
                    "due for destruction, its object gone, not yet recorded DESTROYED",
                )
            else:
                note(
                    MISSING,
                    key_id,
                    _of(v),
                    f"{v.state.value} version without its private key object",
                )
        elif len(privates) > 1:
            note(DUPLICATE, key_id, _of(v), f"{len(privates)} private key objects share its id")
        elif not _holds(token, privates[0], groups[key_id], v):
            note(
                MISMATCH,
                key_id,
                _of(v),
                "its token object is not the private half of the public key the store holds",
            )

    for key_id, t in rows.spent.items():
        if key_id in groups:
            note(
                LEFTOVER,
                key_id,
                "import token",
                f"{'used' if t.used else 'expired'} import "
                "token, its wrapping key still in the token",
            )
        else:
            note(UNFINISHED, key_id, "import token", "its wrapping key gone, not yet recorded")
    for key_id in rows.live:
        if not has_private(key_id):
            note(MISSING, key_id, "import token", "live import token without its wrapping key")
    if audit.key_id is not None and not has_private(audit.key_id):
        note(MISSING, audit.key_id, "audit key", "the audit log's key is not in the token")
    elif audit.pinned is not None and not any(audit.names(k, o) for k, o in groups.items()):
        note(MISSING, b"", "audit key", "the pinned audit key is not in the token")

    for key_id, objs in groups.items():
        if rows.names(key_id) or audit.names(key_id, objs):
            continue
        labels = sorted({o.label for o in objs})
        what = ", ".join(labels) or "(no label)"
        kinds = "+".join(sorted(o.kind for o in objs))
        made = [label for label in labels if _service_made(label, key_id)]
        if made and (audit.known or AUDIT_KEY_LABEL not in made):
            note(
                ORPHAN,
                key_id,
                what,
                f"{kinds}: made by the service, named by no version, import token or audit log",
            )
        else:
            why = "no readable audit log or its key to ask" if made else "not made by the service"
            note(UNMANAGED, key_id, what, f"{kinds}: {why}")
    return report


def reconcile(
    store: Store,
    token: TokenAPI,
    audit_key: Callable[[], AuditKey],
    *,
    repair: bool = False,
    grace: float = DEFAULT_GRACE_SECONDS,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
) -> Report:
    """Compares ``store`` with ``token`` (twice, ``grace`` seconds apart, when ``grace`` > 0)
    and, with ``repair``, repairs what may be repaired. ``audit_key()``: what the audit log says
    of its key (:func:`audit_key_reader`), read at each pass."""
    report = survey(store, token, audit_key(), clock())
    if grace > 0 and report.disagreements:
        sleep(grace)
        earlier = {f.ident for f in report.findings}
        report = survey(store, token, audit_key(), clock())
        report.findings = [f for f in report.findings if f.ident in earlier]
        report.passes = 2
    if repair:
        report.findings = [
            _repaired(f, store, token, audit_key, clock) if f.repairable else f
            for f in report.findings
        ]
    return report


def _repaired(
    f: Finding,
    store: Store,
    token: TokenAPI,
    audit_key: Callable[[], AuditKey],
    clock: Callable[[], datetime],
) -> Finding:
    now = clock()
    rows = _rows(store, now)  # read again: nothing a row names is ever destroyed
    if f.kind == ORPHAN:
        objs = [o for o in token.objects() if o.key_id == f.key_id]
        if rows.names(f.key_id) or audit_key().names(f.key_id, objs):
            return replace(f, detail=f.detail + "; named in the store meanwhile: left alone")
        token.destroy(f.key_id)
    elif f.kind == LEFTOVER:
        v = rows.versions.get(f.key_id)
        t = rows.spent.get(f.key_id)
        if not ((v is not None and v.state is State.DESTROYED) or t is not None):
            return replace(f, detail=f.detail + "; changed meanwhile: left alone")
        token.destroy(f.key_id)
        if t is not None:
            store.set_import_token_destroyed(t.token)
    elif f.kind == UNFINISHED:
        if any(o.key_id == f.key_id and o.kind == "private" for o in token.objects()):
            return replace(f, detail=f.detail + "; its private key is back: left alone")
        v = rows.versions.get(f.key_id)
        t = rows.spent.get(f.key_id)
        if not ((v is not None and v.state is not State.DESTROYED and _due(v, now)) or t):
            return replace(f, detail=f.detail + "; changed meanwhile: left alone")
        # What the destruction left (a public key object: objects go one at a time), then the
        # store's record of it, as the reaper does.
        token.destroy(f.key_id)
        if v is not None:
            store.set_state(v.name, v.version, State.DESTROYED, v.destroy_at)
        elif t is not None:
            store.set_import_token_destroyed(t.token)
    return replace(f, repaired=True)


def _holds(token: TokenAPI, private: TokenObject, objs: list[TokenObject], v: Version) -> bool:
    """Whether the version's object holds its public key: of the algorithm's kind, and showing
    (through its public key object, else itself) the store's public key; where the token shows
    none (an unwrapped EC key on SoftHSM2), signing a challenge the store's public key
    verifies. True for an object destroyed since the listing (a running service's reaper):
    the next pass sees what it became."""
    alg = algorithm(v.algorithm)
    if private.key_kind != algorithm_kind(alg):
        return False
    publics = [o for o in objs if o.kind == "public"]
    shown = publics[0].public_der if len(publics) == 1 else private.public_der
    if shown is not None:
        return shown == v.public_key_der
    try:
        return token.holds_private_half(v.key_id, alg, v.public_key_der)
    except NotFound:
        return True


def _due(v: Version, now: datetime) -> bool:
    return v.effective_state(now) is State.DESTROYED


def service_answers(cfg: Config) -> bool:
    """Whether a process accepts connections on the service's configured socket."""
    path = cfg.server.listen.removeprefix("unix://").removeprefix("unix:")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def audit_key_reader(path: str | Path, pin: str | Path, chain: str = "") -> Callable[[], AuditKey]:
    """For :func:`reconcile`: what the audit log at ``path`` (its ``chain``: this replica's)
    and its pinned key's file (the second argument) say of the audit key, read anew at each
    call."""
    from cryptography.hazmat.primitives import serialization

    from signer._internal.audit import open_audit_store

    def read() -> AuditKey:
        try:
            log = open_audit_store(path, read_only=True, chain=chain)
        except FileNotFoundError:
            return AuditKey(known=False)
        try:
            recorded = log.audit_key()
        finally:
            log.close()
        pinned = None
        if Path(pin).exists():
            try:
                pinned = serialization.load_pem_public_key(Path(pin).read_bytes()).public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            except ValueError:  # emptied or damaged: the service refuses it too
                return AuditKey(recorded[0] if recorded else None, known=False)
        return AuditKey(recorded[0] if recorded else None, pinned)

    return read


def reconcile_with_config(
    cfg: Config, repair: bool = False, grace: float = DEFAULT_GRACE_SECONDS
) -> Report:
    """:func:`reconcile` against the store, token and audit log ``cfg`` names, on a token
    connection and store connection of its own (SQLite and the token host take a second
    client)."""
    from signer._internal.store import is_postgres, open_store
    from signer._internal.token import Pin, Token

    if not is_postgres(cfg.store.path) and not Path(cfg.store.path).exists():
        raise FailedPrecondition(
            f"no key store at {cfg.store.path}: is this the service's configuration?"
        )
    if grace <= 0 and service_answers(cfg):
        raise FailedPrecondition(
            f"a service answers on {cfg.server.listen}: beside a running service, reconcile "
            "compares twice, --grace seconds apart (default "
            f"{DEFAULT_GRACE_SECONDS:g}); a single pass needs the service stopped"
        )
    # One session, and no health checks: a short command has no use for them, and on a large
    # token that another process keeps changing each one rereads every object (SoftHSM2), slow
    # enough on a busy machine to be taken for a token that stopped answering.
    quiet = replace(
        cfg.token, sessions=1, lanes=1, health_interval_seconds=3600.0, stall_seconds=3600.0
    )
    token = Token(quiet, Pin(cfg.token.pin_file))
    store = open_store(cfg.store.path)
    try:
        token.start(wait=True)
        audit = audit_key_reader(cfg.audit.path, cfg.audit.pinned_key, cfg.audit.chain)
        return reconcile(store, token, audit, repair=repair, grace=grace)
    finally:
        token.close()
        store.close()


__all__ = [
    "AuditKey",
    "Finding",
    "Report",
    "audit_key_reader",
    "reconcile",
    "reconcile_with_config",
    "service_answers",
    "survey",
]
