"""``signer keys reconcile`` against a real token: every kind of disagreement between the store
and the token is named; ``--repair`` destroys only objects the service made that nothing names
(or that the store says are gone), completes destructions the store was recording, and leaves
a version whose object is missing or different to the operator; beside a running service it
compares twice and keeps what both passes find (issue 12)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, ObjectClass

from signer._internal import hsm
from signer._internal.config import P11KIT_CLIENT_MODULE, Config
from signer._internal.keyring import Keyring
from signer._internal.reconcile import (
    AUDIT_KEY_LABEL,
    LEFTOVER,
    MISMATCH,
    MISSING,
    ORPHAN,
    UNFINISHED,
    UNMANAGED,
    WRAPPING_KEY_LABEL,
    AuditKey,
    audit_key_reader,
    reconcile,
)
from signer._internal.store import SQLiteStore
from signer._internal.token import Pin, Token, TokenObject
from signer.keys import ALGORITHMS, ImportToken, Key, State, Version
from tests.conftest import SIGNER_BIN, TokenHostHandle, make_config, write_toml
from tests.integration.own_host import own_host  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration
EC = ALGORITHMS["ec-p256"]


@dataclass
class World:
    cfg: Config
    token: Token
    store: SQLiteStore
    keyring: Keyring

    def stray(self, label: str) -> bytes:
        """A key pair generated in the token under ``label`` that no row names: its id."""
        key_id = os.urandom(16)
        self.token.generate(EC, key_id, label)
        return key_id


@pytest.fixture
def world(own_host: TokenHostHandle, tmp_path: Path) -> Iterator[World]:  # noqa: F811
    cfg = make_config(tmp_path, own_host.token_config())
    # No health checks: on a loaded machine one slower than token.stall_seconds makes every
    # call of this test's connection fail UNAVAILABLE.
    quiet = replace(
        cfg.token, sessions=1, lanes=1, health_interval_seconds=3600.0, stall_seconds=3600.0
    )
    token = Token(quiet, Pin(cfg.token.pin_file))
    token.start(wait=True)
    store = SQLiteStore(cfg.store.path)
    try:
        yield World(cfg, token, store, Keyring(cfg, token, store))
    finally:
        token.close()
        store.close()


def no_audit_key() -> AuditKey:
    return AuditKey()


def software_public_key() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def destroy_half(w: World, key_id: bytes, half: ObjectClass) -> None:
    """Destroys one object of a pair (PRIVATE_KEY or PUBLIC_KEY) and leaves the other: the
    private one is where a crash in the middle of a destruction leaves it (objects go one at a
    time); without its public one, a key is as an unwrapped (imported) one is on SoftHSM2."""
    lib = pkcs11._pkcs11.lib(P11KIT_CLIENT_MODULE)  # a connection of the test's own
    try:
        token = lib.get_token(token_label=hsm.DEFAULT_LABEL)
        pin = Path(w.cfg.token.pin_file).read_text().strip()
        with token.open(user_pin=pin, rw=True) as session:
            found = list(session.get_objects({Attribute.ID: key_id}))
            classes = Counter(o.object_class for o in found)
            assert classes == Counter([ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY])
            for obj in found:
                if obj.object_class is half:
                    obj.destroy()
    finally:
        lib.finalize()
    assert w.token.exists(key_id)


def import_token(w: World, label: str, *, used: bool = False, expired: bool = False) -> bytes:
    """An import token row; with ``label``, a (stand-in) wrapping key in the token too."""
    key_id = os.urandom(16)
    if label:
        w.token.generate(EC, key_id, label)
    now = w.keyring.now()
    expires = now - timedelta(seconds=1) if expired else now + timedelta(hours=1)
    w.store.add_import_token(
        ImportToken(
            os.urandom(12).hex(),
            key_id,
            software_public_key(),
            now,
            expires,
            caller="uid:0",
            used=used,
        )
    )
    return key_id


def test_each_disagreement_is_named_and_repair_touches_only_what_it_may(world: World) -> None:
    w = world
    fine = w.keyring.create_key("fine", "ec-p256").versions[0].key_id
    lost = w.keyring.create_key("lost", "ec-p256").versions[0].key_id
    w.token.destroy(lost)  # behind the store's back: a restored token, the wrong token
    gone = w.keyring.create_key("gone", "ec-p256").versions[0].key_id
    w.keyring.rotate("gone")
    w.store.set_state("gone", 1, State.DESTROYED, None)  # recorded destroyed, object still there
    due = w.keyring.create_key("due", "ec-p256").versions[0].key_id
    w.keyring.rotate("due")
    w.store.set_state("due", 1, State.DESTRUCTION_SCHEDULED, w.keyring.now() - timedelta(hours=1))
    destroy_half(w, due, ObjectClass.PRIVATE_KEY)  # a destruction half done, then a crash
    ghost = w.stray("ghost/v1")  # CreateKey: generated, then a crash before the commit
    wrapping = w.stray(WRAPPING_KEY_LABEL)  # GetImportParameters: likewise
    audit_key = w.stray(AUDIT_KEY_LABEL)  # the audit log's own, recorded
    stray_audit_key = w.stray(AUDIT_KEY_LABEL)  # generated, then a crash before recording
    adoptable = w.stray("provisioned-for-adoption")  # an administrator's, for 'keys adopt'
    provisioned = bytes.fromhex("0a0b0c0d")  # another, labelled as the service would label it
    w.token.generate(EC, provisioned, "ops/v1")
    swapped = w.stray("swapped/v1")
    now = w.keyring.now()
    w.store.create_key(
        Key(
            "swapped",
            "ec-p256",
            1,
            "default",
            {},
            now,
            (
                Version(
                    "swapped",
                    1,
                    "ec-p256",
                    State.ENABLED,
                    swapped,
                    software_public_key(),
                    now,
                    None,
                ),
            ),
        )
    )
    # A private key the token shows no public key for (an unwrapped EC key on SoftHSM2): it is
    # asked to sign a challenge, which the store's public key does not verify.
    unwrapped = w.stray("unwrapped/v1")
    destroy_half(w, unwrapped, ObjectClass.PUBLIC_KEY)
    w.store.create_key(
        Key(
            "unwrapped",
            "ec-p256",
            1,
            "default",
            {},
            now,
            (
                Version(
                    "unwrapped",
                    1,
                    "ec-p256",
                    State.ENABLED,
                    unwrapped,
                    software_public_key(),
                    now,
                    None,
                ),
            ),
        )
    )
    proved = os.urandom(16)  # ... and one whose challenge does verify: no finding
    proved_public = w.token.generate(EC, proved, "proved/v1")
    destroy_half(w, proved, ObjectClass.PUBLIC_KEY)
    w.store.create_key(
        Key(
            "proved",
            "ec-p256",
            1,
            "default",
            {},
            now,
            (Version("proved", 1, "ec-p256", State.ENABLED, proved, proved_public, now, None),),
        )
    )
    used = import_token(w, WRAPPING_KEY_LABEL, used=True)  # imported, then a crash
    expired = import_token(w, "", expired=True)  # wrapping key destroyed, then a crash
    live = import_token(w, "")  # its wrapping key gone behind the store's back

    def audit() -> AuditKey:
        return AuditKey(audit_key)

    report = reconcile(w.store, w.token, audit, grace=0)
    assert {f.key_id: f.kind for f in report.findings} == {
        lost: MISSING,
        gone: LEFTOVER,
        due: UNFINISHED,
        ghost: ORPHAN,
        wrapping: ORPHAN,
        stray_audit_key: ORPHAN,
        adoptable: UNMANAGED,
        provisioned: UNMANAGED,
        swapped: MISMATCH,
        unwrapped: MISMATCH,
        used: LEFTOVER,
        expired: UNFINISHED,
        live: MISSING,
    }, report.table()
    assert not report.consistent
    assert "NOT consistent: 11 disagreement(s) left" in report.table()

    repaired = reconcile(w.store, w.token, audit, repair=True, grace=0)
    assert {f.key_id for f in repaired.findings if f.repaired} == {
        gone,
        due,
        ghost,
        wrapping,
        stray_audit_key,
        used,
        expired,
    }
    for key_id in (gone, due, ghost, wrapping, stray_audit_key, used):
        assert not w.token.exists(key_id)
    # Never a versioned key's object, the audit key, or an object the service did not make.
    for key_id in (fine, swapped, unwrapped, audit_key, adoptable, provisioned):
        assert w.token.exists(key_id)
    assert w.store.get_version("due", 1).state is State.DESTROYED
    assert w.store.get_version("lost", 1).state is State.ENABLED  # the operator's to decide
    assert w.store.spent_import_tokens(w.keyring.now()) == []

    after = reconcile(w.store, w.token, audit, grace=0)
    assert {(f.kind, f.what) for f in after.findings} == {
        (MISSING, "lost/1"),
        (MISSING, "import token"),
        (MISMATCH, "swapped/1"),
        (MISMATCH, "unwrapped/1"),
        (UNMANAGED, "provisioned-for-adoption"),
        (UNMANAGED, "ops/v1"),
    }
    assert w.keyring.sign("fine", 0, b"still signs", None).version == 1

    # Without an audit log to ask, an audit key is nobody's to destroy.
    unasked = reconcile(w.store, w.token, lambda: AuditKey(known=False), grace=0)
    assert {f.kind for f in unasked.findings if f.key_id == audit_key} == {UNMANAGED}


def test_beside_a_running_service_only_what_both_passes_find_counts(world: World) -> None:
    w = world
    key_id = os.urandom(16)
    public = w.token.generate(EC, key_id, "late/v1")  # CreateKey, between generation and commit
    now = w.keyring.now()
    version = Version("late", 1, "ec-p256", State.ENABLED, key_id, public, now, None)
    late = Key("late", "ec-p256", 1, "default", {}, now, (version,))
    waited: list[float] = []

    def meanwhile(seconds: float) -> None:  # the service commits while reconcile waits
        waited.append(seconds)
        w.store.create_key(late)

    report = reconcile(w.store, w.token, no_audit_key, grace=7, sleep=meanwhile)
    assert waited == [7]
    assert (report.passes, report.findings, report.consistent) == (2, [], True)

    stuck = w.stray("stuck/v1")  # never committed: still there after the grace
    report = reconcile(w.store, w.token, no_audit_key, grace=7, sleep=lambda s: None)
    assert report.passes == 2
    assert [(f.kind, f.key_id) for f in report.findings] == [(ORPHAN, stuck)]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SIGNER_BIN), "keys", "reconcile", *args], capture_output=True, text=True, timeout=120
    )


def test_the_command_reports_repairs_and_refuses_what_it_cannot_do_safely(
    world: World, tmp_path: Path
) -> None:
    w = world
    w.keyring.create_key("kept", "ec-p256")
    ghost = w.stray("ghost/v1")
    config = str(write_toml(tmp_path / "signer.toml", w.cfg))

    done = run("--config", config, "--grace", "0")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"orphan     {ghost.hex()}" in done.stdout
    assert "NOT consistent: 1 disagreement(s) left" in done.stdout
    done = run("--config", config, "--grace", "0", "--json")
    report = json.loads(done.stdout)
    assert (report["consistent"], report["versions"]) == (False, 1)
    assert [(f["kind"], f["key_id"], f["repairable"]) for f in report["findings"]] == [
        ("orphan", ghost.hex(), True)
    ]
    done = run("--config", config, "--grace", "0", "--repair")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "repaired" in done.stdout
    assert "consistent: store and token agree" in done.stdout
    assert not w.token.exists(ghost)
    assert run("--config", config, "--grace", "0").returncode == 0

    # Something answers on the service's socket: one pass could take a generation in flight
    # for an orphan, so it is refused.
    path = w.cfg.server.listen.removeprefix("unix:")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(path)
        listening.listen()
        done = run("--config", config, "--grace", "0", "--repair")
    os.unlink(path)
    assert done.returncode == 2
    assert "a service answers on" in done.stderr
    assert "a single pass needs the service stopped" in done.stderr

    # A configuration that names no store: nothing to compare with (and never an empty store
    # created, against which every key would look like an orphan).
    other = replace(w.cfg, store=replace(w.cfg.store, path=str(tmp_path / "nowhere.db")))
    done = run("--config", str(write_toml(tmp_path / "other.toml", other)), "--grace", "0")
    assert done.returncode == 2
    assert "no key store at" in done.stderr
    assert not Path(other.store.path).exists()


def test_an_object_destroyed_while_the_token_is_listed_is_left_out(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside a running service, a reaper or an import may destroy an object between the search
    and the reading of its attributes: the listing goes on without it (it was an error that
    ended the command, seen in test_sigkill)."""
    from signer._internal.token import _objects, _token

    w = world
    kept, vanishing = w.stray("kept/v1"), w.stray("vanishing/v1")
    described = _objects.described  # Token.objects calls it by _token's name

    def racing(obj: Any) -> TokenObject:
        if bytes(obj[Attribute.ID]) == vanishing:  # destroyed meanwhile, by someone else
            obj.destroy()
        return described(obj)

    monkeypatch.setattr(_token, "described", racing)
    assert {o.key_id for o in w.token.objects()} == {kept}


def test_an_audit_key_pinned_and_not_yet_recorded_is_the_logs(world: World, tmp_path: Path) -> None:
    """A first checkpoint cut short after the pin was written: the log records no key yet, the
    pin names it, and the next start adopts it; reconcile must not destroy it. A pin that
    cannot be read leaves every audit key alone."""
    from signer._internal.audit import SQLiteAuditStore

    w = world
    key_id = os.urandom(16)
    public = w.token.generate(EC, key_id, AUDIT_KEY_LABEL)
    stray = w.stray(AUDIT_KEY_LABEL)  # generated before a crash, never pinned
    log, pin = tmp_path / "audit.db", tmp_path / "audit.db.key.pem"
    SQLiteAuditStore(log).close()  # a log with no key recorded
    pin.write_bytes(
        serialization.load_der_public_key(public).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    read = audit_key_reader(log, pin)
    assert read() == AuditKey(None, public)

    report = reconcile(w.store, w.token, read, repair=True, grace=0)
    assert [(f.kind, f.key_id, f.repaired) for f in report.findings] == [(ORPHAN, stray, True)]
    assert w.token.exists(key_id)
    assert not w.token.exists(stray)

    pin.write_bytes(b"")  # emptied or damaged
    assert not read().known
    report = reconcile(w.store, w.token, read, repair=True, grace=0)
    assert [(f.kind, f.key_id, f.repaired) for f in report.findings] == [(UNMANAGED, key_id, False)]

    pin.write_bytes(
        serialization.load_der_public_key(public).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    w.token.destroy(key_id)  # the pinned key gone from the token: the service would refuse
    report = reconcile(w.store, w.token, read, grace=0)
    assert [(f.kind, f.what) for f in report.findings] == [(MISSING, "audit key")]
