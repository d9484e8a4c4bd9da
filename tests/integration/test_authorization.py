"""Authorisation, end to end: callers with client certificates through the real mTLS front, a
local caller by uid through the relay, a policy file, and every operation on keys of three kinds.

The matrix is explicit: for each caller and kind of key, the operations it may perform. Every
other combination must be PERMISSION_DENIED naming the caller, operation and key, and must leave
the key as it was.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signer._internal.front import Front, front_config
from signer._internal.pki import DevCA
from signer._wire import status_name
from signer.client import ClientTLS, SignerClient, build_import_request
from signer.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SignerError,
    TokenRejected,
    Unauthenticated,
)
from signer.jose import verify_jwt
from signer.v1 import signer_pb2 as pb
from tests.conftest import (
    FakeClock,
    RunningService,
    ServiceProcessFactory,
    TokenHostHandle,
    free_port,
    make_config,
    run_as,
    start_service,
    wait_until,
)

pytestmark = pytest.mark.integration

CALLERS = ("consumer-app", "enterprise-app", "key-admin", "auditor", "release-bot")
POLICY = f"""
[[grant]]
callers = ["uid:{os.getuid()}"]           # the test itself sets keys up locally
operations = ["*"]
scopes = ["*"]

[[grant]]
callers = ["x509:CN=consumer-app"]
operations = ["sign", "verify", "read"]
scopes = ["consumer"]

[[grant]]
callers = ["x509:CN=enterprise-app"]
operations = ["sign", "verify", "read"]
scopes = ["enterprise"]

[[grant]]
callers = ["x509:CN=key-admin"]
operations = ["create", "rotate", "disable", "destroy", "import", "read"]
scopes = ["consumer", "enterprise"]

[[grant]]
callers = ["x509:CN=auditor"]
operations = ["read"]
scopes = ["*"]

[[grant]]
callers = ["x509:CN=release-bot"]
operations = ["sign"]
keys = ["release-*"]

[[grant]]
callers = ["x509:CN=consumer-importer"]        # not in the matrix: the replay tests' attacker
operations = ["import", "sign", "read"]
scopes = ["consumer"]
"""

# Which operations each caller may perform on a key of each kind; everything else is denied.
KINDS = {"consumer": "consumer", "enterprise": "enterprise", "release": "build"}
ALLOWED: dict[tuple[str, str], set[str]] = {
    ("consumer-app", "consumer"): {"sign", "verify", "read"},
    ("enterprise-app", "enterprise"): {"sign", "verify", "read"},
    ("key-admin", "consumer"): {"create", "rotate", "disable", "destroy", "read"},
    ("key-admin", "enterprise"): {"create", "rotate", "disable", "destroy", "read"},
    ("auditor", "consumer"): {"read"},
    ("auditor", "enterprise"): {"read"},
    ("auditor", "release"): {"read"},
    ("release-bot", "release"): {"sign"},
}
OPERATIONS = ("sign", "verify", "read", "create", "rotate", "disable", "destroy")


@dataclass
class Deployment:
    service: RunningService
    front: Front
    ca: DevCA
    policy: Path

    def remote(self, caller: str) -> SignerClient:
        cert, key = self.ca.client_files(caller)
        return SignerClient(
            self.front.cfg.front.listen, tls=ClientTLS(self.ca.cert, cert, key), timeout=15
        )

    def local(self) -> SignerClient:
        return self.service.client()


@pytest.fixture(scope="module")
def deployment(
    token_host: TokenHostHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("authz")
    ca = DevCA.ensure(tmp / "tls")
    ca.issue_server(token_host.paths.tls_public_key.read_bytes(), ["localhost", "127.0.0.1"])
    for name in CALLERS:
        ca.issue_client(name)
    policy = tmp / "policy.toml"
    policy.write_text(POLICY)
    with behind_a_front(token_host, tmp, ca, policy) as (svc, front):
        yield Deployment(svc, front, ca, policy)


@contextlib.contextmanager
def behind_a_front(
    token_host: TokenHostHandle, tmp: Path, ca: DevCA, policy: Path, client_ca: Path | None = None
) -> Iterator[tuple[RunningService, Front]]:
    """A real service under ``policy`` and a real mTLS front before it, whose certificate is
    ``ca``'s and which takes client certificates from ``client_ca`` (default: ``ca``)."""
    front_socket = tmp / "front.sock"
    cfg = make_config(
        tmp,
        token_host.token_config(),
        server={"front_socket": str(front_socket), "policy_file": str(policy)},
    )
    svc = start_service(cfg, FakeClock())
    front_cfg = front_config(
        token_host.paths,
        ca,
        listen=f"127.0.0.1:{free_port()}",
        upstream=front_socket,
        workdir=tmp / "front",
    )
    if client_ca is not None:
        front_cfg = replace(front_cfg, client_ca=str(client_ca))
    front = Front(replace(cfg, front=front_cfg))
    try:
        front.start()
        yield svc, front
    finally:
        front.stop()
        svc.stop()


_n = iter(range(10**6))


def fresh_key(d: Deployment, kind: str) -> str:
    """A new key of ``kind``, made by the local administrator, with two versions (so version 1
    can be scheduled for destruction)."""
    name = f"{'release-' if kind == 'release' else ''}{kind}-{next(_n)}"
    with d.local() as c:
        c.create_key(name, "ec-p256", scope=KINDS[kind])
        c.rotate(name)
    return name


def perform(c: SignerClient, d: Deployment, op: str, name: str, kind: str) -> None:
    if op == "sign":
        c.sign(name, message=b"matrix")
    elif op == "verify":
        with d.local() as admin:
            sig = admin.sign(name, message=b"matrix").signature
        assert c.verify(name, sig, message=b"matrix")
    elif op == "read":
        c.get_key(name)
        c.public_key(name)
    elif op == "create":
        c.create_key(f"{name}-new", "ec-p256", scope=KINDS[kind])
    elif op == "rotate":
        c.rotate(name)
    elif op == "disable":
        c.disable(name, 1)
        c.enable(name, 1)
    elif op == "destroy":
        c.schedule_destruction(name, 1)
        c.cancel_destruction(name, 1)
    else:
        raise AssertionError(op)


MATRIX = [(caller, op, kind) for caller in CALLERS for kind in KINDS for op in OPERATIONS]


@pytest.mark.parametrize(
    ("caller", "op", "kind"), MATRIX, ids=[f"{c}-{o}-{k}" for c, o, k in MATRIX]
)
def test_matrix(deployment: Deployment, caller: str, op: str, kind: str) -> None:
    name = fresh_key(deployment, kind)
    with deployment.local() as admin:
        before = admin.get_key(name)
    allowed = op in ALLOWED.get((caller, kind), set())
    with deployment.remote(caller) as c:
        if allowed:
            perform(c, deployment, op, name, kind)
            return
        with pytest.raises(PermissionDenied) as exc:
            perform(c, deployment, op, name, kind)
    target = f"{name}-new" if op == "create" else name
    assert exc.value.message.startswith(f"x509:CN={caller} may not {op} key {target!r}")
    with deployment.local() as admin:
        after = admin.get_key(name)
        assert after == before, "a refused call changed the key"
        if op == "create":
            with pytest.raises(NotFound):
                admin.get_key(target)


def test_refusals_do_not_tell_whether_a_key_exists(deployment: Deployment) -> None:
    existing = fresh_key(deployment, "enterprise")
    with deployment.remote("consumer-app") as c:
        with pytest.raises(PermissionDenied) as there:
            c.sign(existing, message=b"x")
        with pytest.raises(PermissionDenied) as absent:
            c.sign("enterprise-never-made", message=b"x")
    assert there.value.message == f"x509:CN=consumer-app may not sign key {existing!r}"
    assert absent.value.message == "x509:CN=consumer-app may not sign key 'enterprise-never-made'"


def test_a_caller_who_may_see_a_name_learns_it_is_missing(deployment: Deployment) -> None:
    with deployment.remote("release-bot") as c, pytest.raises(NotFound):
        c.sign("release-never-made", message=b"x")


def test_list_keys_shows_only_what_the_caller_may_read(deployment: Deployment) -> None:
    keys = {kind: fresh_key(deployment, kind) for kind in KINDS}
    with deployment.remote("release-bot") as c, pytest.raises(PermissionDenied) as exc:
        c.list_keys()  # it may read no key at all: refused, not an empty list
    assert exc.value.message == "x509:CN=release-bot may not read keys"
    for caller, visible in (
        ("consumer-app", {"consumer"}),
        ("enterprise-app", {"enterprise"}),
        ("auditor", set(KINDS)),
    ):
        with deployment.remote(caller) as c:
            listed = {k.name for k in c.iter_keys(page_size=2)}  # paging over hidden keys
        assert {kind for kind, name in keys.items() if name in listed} == visible, caller
        scopes = {KINDS[kind] for kind in visible}
        with deployment.local() as admin:
            every = {k.name: k.scope for k in admin.iter_keys()}
        assert all(every[name] in scopes for name in listed), caller


def test_import_needs_an_import_grant(deployment: Deployment) -> None:
    with deployment.remote("consumer-app") as c, pytest.raises(PermissionDenied) as exc:
        c.get_import_parameters()
    assert exc.value.message == "x509:CN=consumer-app may not import keys"


def test_a_local_caller_is_known_by_uid(deployment: Deployment) -> None:
    """The same socket, another user: `nobody` has no grant, so it is refused everything, a
    listing included (a caller with no read grant at all is refused rather than shown an empty
    list, so that its calls count against its refusal budget), and the refusal names the uid
    the kernel reported."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    address = deployment.service.address
    sock = Path(address.removeprefix("unix:"))
    os.chmod(sock, 0o666)  # let nobody reach the socket
    os.chmod(sock.parent, 0o711)
    script = (
        "import sys\n"
        "from signer.client import SignerClient\n"
        "from signer._wire import status_name\n"
        "from signer.errors import SignerError\n"
        "c = SignerClient(sys.argv[1], timeout=10)\n"
        "for call in (c.list_keys, lambda: c.get_key('anything')):\n"
        "    try:\n"
        "        call()\n"
        "    except SignerError as e:\n"
        "        print(status_name(e), e.message)\n"
    )
    done = run_as(nobody, script, address)
    assert done.returncode == 0, done.stderr
    listing, refusal = done.stdout.splitlines()
    who = f"uid:{nobody.pw_uid}(nobody)"
    assert listing == f"PERMISSION_DENIED {who} may not read keys"
    assert refusal == f"PERMISSION_DENIED {who} may not read key 'anything'"


# --- reloading the policy -------------------------------------------------------------------


def test_sighup_reloads_the_policy_without_dropping_calls(
    service_process_factory: ServiceProcessFactory, tmp_path: Path
) -> None:
    policy = tmp_path / "reload.toml"
    allow = f'[[grant]]\ncallers = ["uid:{os.getuid()}"]\noperations = ["*"]\nscopes = ["*"]\n'
    read_only = allow.replace('["*"]\nscopes', '["read"]\nscopes', 1)
    policy.write_text(allow)
    sp = service_process_factory(server={"policy_file": str(policy)})
    with sp.client() as c:
        c.create_key("reloaded", "ec-p256", scope="s")
    errors: list[str] = []
    signed = 0
    stop = threading.Event()

    def sign_forever() -> None:
        nonlocal signed
        with sp.client() as c:
            while not stop.is_set():
                try:
                    c.sign("reloaded", message=b"x")
                    signed += 1
                except PermissionDenied:
                    return  # the new policy has taken effect
                except SignerError as exc:
                    errors.append(f"{status_name(exc)}: {exc.message}")
                    return

    workers = [threading.Thread(target=sign_forever) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        assert wait_until(lambda: signed > 20, 30)
        policy.write_text(read_only)
        os.kill(sp.pid, signal.SIGHUP)
        for w in workers:
            w.join(30)
    finally:
        stop.set()
    assert not errors, errors  # every call either succeeded or was refused by the new policy
    with sp.client() as c:
        with pytest.raises(PermissionDenied):
            c.sign("reloaded", message=b"x")
        c.get_key("reloaded")

        # A broken file is refused and the policy in force stays.
        policy.write_text("[[grant]]\ncallers = ['everyone']\n")
        os.kill(sp.pid, signal.SIGHUP)
        assert wait_until(lambda: "policy not reloaded" in sp.log(), 10)
        c.get_key("reloaded")
        with pytest.raises(PermissionDenied):
            c.sign("reloaded", message=b"x")
    assert "must start with x509:, uid:, user:" in sp.log()


# --- what a caller with no grant can make the service write (issue 11, item 7) ---------------


def test_a_caller_with_no_grant_cannot_fill_the_disk_or_break_the_front(
    deployment: Deployment,
) -> None:
    """600,000 snowmen as a key name, ten times, through the front: each call is refused with a
    short message that names the problem (the front passed it on: no 502), and the audit log
    keeps a bounded record of each."""
    deployment.ca.issue_client("stranger")  # a valid certificate, no grant at all
    audit = Path(deployment.service.server.cfg.audit.path)
    before = audit.stat().st_size + Path(f"{audit}-wal").stat().st_size
    huge = "\N{SNOWMAN}" * 600_000
    with deployment.remote("stranger") as c:
        for _ in range(10):
            with pytest.raises(InvalidArgument) as exc:
                c.get_key(huge)
            assert exc.value.message.startswith("name '" + "\N{SNOWMAN}" * 64 + "'... (600000")
            assert len(exc.value.message) < 300
    grown = audit.stat().st_size + Path(f"{audit}-wal").stat().st_size - before
    assert grown < 64 * 1024, f"the audit log grew by {grown} bytes for ten refused calls"
    with sqlite3.connect(audit) as db:
        rows = db.execute(
            "SELECT key, status FROM records WHERE caller LIKE 'x509:CN=stranger (issuer %'"
        ).fetchall()
    assert len(rows) == 10
    assert all(len(key) < 200 and status == "INVALID_ARGUMENT" for key, status in rows)


# --- imports: bound to their caller, used once, decided on the key as it is (issue 11) -------


def _ec_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_an_import_cannot_be_replayed_into_another_scope(deployment: Deployment) -> None:
    """The red team's case: root imported a key into 'enterprise'; a caller allowed to import
    only into 'consumer' resent the same import token, blob and public key as a new key there,
    then signed JWTs naming the enterprise key with plain Sign. Now nothing of it works."""
    d = deployment
    d.ca.issue_client("consumer-importer")
    n = next(_n)
    ent, copy = f"ent-imported-{n}", f"consumer-copy-{n}"
    private = _ec_pem()
    with d.local() as root:
        params = root.get_import_parameters()
        sent = build_import_request(ent, "ec-p256", private, params, scope="enterprise")
        root.import_key_version(sent)
        enterprise_jwks = root.jwks("enterprise")
    replay = pb.ImportKeyVersionRequest()
    replay.CopyFrom(sent)
    replay.name, replay.scope = copy, "consumer"
    with d.remote("consumer-importer") as c:
        with pytest.raises(InvalidArgument, match="import_token is unknown"):
            c.import_key_version(replay)  # another caller's token is no token at all
        # Its own token, and the same key pair (had it got hold of the key): imported once.
        with pytest.raises(AlreadyExists, match="this key pair is already a key version"):
            c.import_key(copy, "ec-p256", private, scope="consumer")
        # Its own, other key in 'consumer', and a JWT whose header names the enterprise key,
        # signed with plain Sign: the enterprise verifier rejects it (wrong key material).
        mine = f"consumer-own-{n}"
        c.import_key(mine, "ec-p256", _ec_pem(), scope="consumer")
        header = {"alg": "ES256", "kid": f"{ent}/1", "typ": "JWT"}
        claims = {"iss": "https://id.example", "aud": "portal", "exp": 4102444800}
        signing_input = b".".join(_b64(json.dumps(x).encode()) for x in (header, claims))
        sig = c.sign(mine, message=signing_input, signature_format="raw").signature
        forged = (signing_input + b"." + _b64(sig)).decode()
    with pytest.raises(TokenRejected):
        verify_jwt(forged, enterprise_jwks, "enterprise", "https://id.example", "portal")
    with d.local() as root:
        with pytest.raises(FailedPrecondition, match="import_token was already used"):
            root.import_key_version(replay)  # not even its owner can use it twice
        with pytest.raises(NotFound):
            root.get_key(copy)
        assert root.get_key(ent).scope == "enterprise"


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def test_import_refusals_do_not_tell_whether_a_key_exists(deployment: Deployment) -> None:
    existing = fresh_key(deployment, "enterprise")
    with deployment.remote("consumer-importer") as c:
        params = c.get_import_parameters()
        messages = []
        for name in (existing, "enterprise-never-made"):
            req = build_import_request(name, "ec-p256", _ec_pem(), params, scope="enterprise")
            with pytest.raises(PermissionDenied) as exc:
                c.import_key_version(req)
            messages.append(exc.value.message.replace(name, "NAME"))
    assert messages == ["x509:CN=consumer-importer may not import key 'NAME'"] * 2


def test_a_new_version_by_import_needs_the_rotate_grant_too(deployment: Deployment) -> None:
    """Importing into an existing key makes the import its primary version, as a rotation
    does: 'consumer-importer' may import new keys into 'consumer', not rotate its keys."""
    existing = fresh_key(deployment, "consumer")
    with (
        deployment.remote("consumer-importer") as c,
        pytest.raises(PermissionDenied, match="may not import key"),
    ):
        c.import_key(existing, "ec-p256", _ec_pem())
    with deployment.remote("key-admin") as c:  # import and rotate in 'consumer'
        assert c.import_key(existing, "ec-p256", _ec_pem()).primary_version == 3


# --- a certificate is its issuer and serial too (issue 11, item 11) ---------------------------


def _serial(cert: Path) -> str:
    return format(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number, "X")


def test_issuer_pinning_and_revoking_one_certificate(
    token_host: TokenHostHandle, tmp_path: Path
) -> None:
    """Two CAs behind one front, each with a certificate for CN=payments: the grant pins its
    issuer, so the partner CA's is another caller. Then one certificate is revoked by serial
    (SIGHUP): it is UNAUTHENTICATED, while a renewed one of the same subject still works."""
    ops = DevCA.ensure(tmp_path / "ops")
    partner = DevCA.ensure(tmp_path / "partner", name="partner CA")
    ops.issue_server(token_host.paths.tls_public_key.read_bytes(), ["localhost", "127.0.0.1"])
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(ops.cert.read_bytes() + partner.cert.read_bytes())
    first, first_key = ops.issue_client("payments")
    ours = (tmp_path / "first.pem", tmp_path / "first.key")  # kept: the next replaces the files
    ours[0].write_bytes(first.read_bytes())
    ours[1].write_bytes(first_key.read_bytes())
    renewed = ops.issue_client("payments")  # a second certificate: same subject, same CA
    theirs = partner.issue_client("payments")
    grant = (
        '[[grant]]\ncallers = ["x509:CN=payments"]\nissuers = ["CN=signer development CA"]\n'
        'operations = ["*"]\nscopes = ["*"]\n'
    )
    policy = tmp_path / "policy.toml"
    policy.write_text(grant)
    with behind_a_front(token_host, tmp_path, ops, policy, client_ca=bundle) as (svc, front):

        def as_(cert: Path, key: Path) -> SignerClient:
            return SignerClient(
                front.cfg.front.listen, tls=ClientTLS(ops.cert, cert, key), timeout=15
            )

        with as_(*ours) as c:
            c.create_key("pinned-key", "ec-p256", scope="consumer")
        with as_(*theirs) as c, pytest.raises(PermissionDenied):
            c.get_key("pinned-key")  # same subject, another issuer: another caller
        policy.write_text(
            grant + f'\n[[revoked]]\nissuer = "CN=signer development CA"\n'
            f'serials = ["{_serial(ours[0])}"]\n'
        )
        assert svc.server.reload_policy()
        with as_(*ours) as c, pytest.raises(Unauthenticated, match="is revoked by the policy"):
            c.get_key("pinned-key")
        with as_(*renewed) as c:
            assert c.get_key("pinned-key").scope == "consumer"
    with sqlite3.connect(svc.server.cfg.audit.path) as db:
        callers = [r[0] for r in db.execute("SELECT caller FROM records ORDER BY seq")]
    assert callers == [
        f"x509:CN=payments (issuer CN=signer development CA, serial {_serial(ours[0])})",
        f"x509:CN=payments (issuer CN=partner CA, serial {_serial(theirs[0])})",
        f"x509:CN=payments (issuer CN=signer development CA, serial {_serial(ours[0])})",
        f"x509:CN=payments (issuer CN=signer development CA, serial {_serial(renewed[0])})",
    ]
