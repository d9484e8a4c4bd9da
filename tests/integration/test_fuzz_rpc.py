"""Every RPC fuzzed through the real gRPC server and the real token (issue 12).

Hypothesis draws the requests: names, algorithms, scopes, labels (Unicode, NUL, empty, at and
past their bounds), versions and waiting periods up to uint32/uint64 max, messages and digests
of every length around the limits, signatures, page sizes and page tokens, JWT claims that are
not UTF-8, not JSON, not objects, nested or numbered past what a parser takes, or too large,
batches at and past their bounds, import tokens (forged, expired, used, another caller's) with
garbage or misdirected wrapped blobs, enum values no client would send; and, on the raw channel,
byte strings that are no protobuf at all, to every method path. Four callers: the user running
the tests (a local caller with every grant), a certificate with every grant and one with only
read and verify on scope ``fuzz`` (both as the mTLS front names them, on the front socket), and
nobody (the front socket without a certificate).

For most requests the test knows, from the store as it is before the call, the answer the
service must give (the status, and words of its message); where it cannot (what the token makes
of a wrapped blob) it knows the statuses allowed. Invariants, and when they are checked:

* after every example (cheap: a few milliseconds in all): the status is the one expected, never
  INTERNAL, UNKNOWN or a hang; a refusal's message is non-empty, bounded and names the problem
  (the field, the key, the version, the limit); no secret is in it (the token's PIN, an import
  token, a wrapped blob) nor the request's own payload; the call has exactly one audit record,
  with its status (gRPC's own refusal of an oversized request none: the service never sees it);
  a failed call, and every read and signature, changed no key, version or import token in the
  store, and no object in the token (counted after every call that makes objects: CreateKey,
  RotateKey, GetImportParameters, ImportKeyVersion); a success did what it says (a signature
  verifies with the stored public key, a JWT carries the claims as given, a listing is ordered
  and holds only what the caller may read); health is SERVING.
* every ``CHECK_EVERY`` examples and at the end of every test (expensive, growing with the log):
  the token holds the objects it held after the last call that makes them; the live audit log
  verifies (chain, signed checkpoints, pinned audit key); no secret is in the service's log
  lines.
* at the end of the module: the stopped service's log verifies, signed to its last record, and
  no secret is in its file.

``FUZZ_EXAMPLES=N`` runs N examples per test, unseeded (``make fuzz``; 2,000 took 41 minutes on
two busy cores); without it each test runs the 80 to 300 examples below (10 for
GetImportParameters, whose only input is its caller), derandomized (the same every run): 39 s
for the module on two busy cores. Messages are limited to ``MESSAGE_LIMIT`` bytes here
(``server.max_message_bytes``), so that requests at and past every bound, gRPC's included, stay
small.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import pwd
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa, utils, x25519
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from signer import wrapping
from signer._internal.audit import verify_log
from signer._internal.front import ISSUER_HEADER, SERIAL_HEADER, SUBJECT_HEADER
from signer._internal.policy import Caller as PolicyCaller
from signer.errors import InvalidArgument, NotFound
from signer.jose import check_claims
from signer.keys import ImportToken, Key, State, Version
from signer.v1 import signer_pb2 as pb
from tests.conftest import (
    FakeClock,
    RunningService,
    TokenHostHandle,
    log_lines,
    make_config,
    socket_address,
    start_service,
)
from tests.integration.token_probe import count_objects

pytestmark = [
    pytest.mark.integration,
    # A failing example with a 70,000-character name is printed anyway.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

# --- settings ---------------------------------------------------------------------------------

_FUZZ = os.environ.get("FUZZ_EXAMPLES", "")
# Examples between two expensive checks (the audit log verified whole, the service's log read).
CHECK_EVERY = 200


def fuzz(examples: int) -> settings:
    """One test's settings: ``examples`` derandomized examples, or FUZZ_EXAMPLES random ones."""
    return settings(
        max_examples=int(_FUZZ) if _FUZZ else examples,
        derandomize=not _FUZZ,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            # ``w`` is set up once per test, not per example: that is what it is for.
            HealthCheck.function_scoped_fixture,
        ],
    )


MESSAGE_LIMIT = 4096  # server.max_message_bytes here
GRPC_LIMIT = 2 * MESSAGE_LIMIT + 64 * 1024  # what gRPC itself takes (signer._internal.server)
MAX_CLAIMS = 64 * 1024
MAX_CLAIMS_DEPTH = 128
MAX_BATCH = 1000
MAX_PAGE = 1000
DEFAULT_PAGE = 50
MIN_WAIT = 24 * 3600
DEFAULT_WAIT = 7 * 24 * 3600
MAX_WAIT = 100 * 365 * 24 * 3600
MAX_WRAPPED = 16 * 1024
WRAPPING_BLOCK = 512  # bytes of one RSA-OAEP block under an RSA-4096 wrapping key
MAX_DETAILS = 1024  # the longest refusal message allowed: values in messages are bounded
SERVICE = "/signer.v1.SignerService/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
METHODS = pb.DESCRIPTOR.services_by_name["SignerService"].methods_by_name
KNOWN_PATHS = {SERVICE + m for m in METHODS} | {HEALTH_CHECK}
MAKES_OBJECTS = {"CreateKey", "RotateKey", "GetImportParameters", "ImportKeyVersion"}

OK = grpc.StatusCode.OK
IA = grpc.StatusCode.INVALID_ARGUMENT
NF = grpc.StatusCode.NOT_FOUND
AE = grpc.StatusCode.ALREADY_EXISTS
FP = grpc.StatusCode.FAILED_PRECONDITION
PD = grpc.StatusCode.PERMISSION_DENIED
UA = grpc.StatusCode.UNAUTHENTICATED
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
NEVER = (
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
)

NAME_RE = r"[a-z0-9][a-z0-9._-]{0,62}"
SCOPE_RE = r"[a-z0-9][a-z0-9:._-]{0,62}"
LABEL_KEY_RE = r"[a-z][a-z0-9_-]{0,62}"
TOKEN_RE = r"[A-Za-z0-9_-]{16,128}"
ALGORITHMS = ("ec-p256", "ec-p384", "ec-p521", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")

DIGEST_SIZES = {"ec-p256": 32, "ec-p384": 48, "ec-p521": 64, "rsa-2048": 32}
HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "ec-p256": hashes.SHA256,
    "ec-p384": hashes.SHA384,
    "ec-p521": hashes.SHA512,
    "rsa-2048": hashes.SHA256,
}
JWS_ALGS = {"ec-p256": "ES256", "ec-p384": "ES384", "ec-p521": "ES512", "rsa-2048": "PS256"}

# The module's keys. P256 has a version in every state; LIFE is for the lifecycle RPCs.
P256, P384, P521, RSA, LIFE, IMPORTED = (
    "fz-p256",
    "fz-p384",
    "fz-p521",
    "fz-rsa",
    "fz-life",
    "fz-imported",
)
GOOD_MESSAGE = b"a message the module signed once"


# --- the world: one service, its callers, its keys and secrets --------------------------------


@dataclass(repr=False)
class Caller:
    kind: str  # me, other, reader, anonymous
    display: str
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...] = ()

    def allows(self, operation: str, key: Key | None) -> bool:
        """What the module's policy grants on ``key`` (None: a key that does not exist)."""
        if self.kind in ("me", "other"):
            return True
        if self.kind == "reader":
            return key is not None and key.scope == "fuzz" and operation in ("read", "verify")
        return False

    @property
    def may_create(self) -> bool:
        return self.kind in ("me", "other")


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    response: Any = None


Snapshot = tuple[tuple[Any, ...], ...]


@dataclass(repr=False)  # (a failure would print all of it)
class World:
    svc: RunningService
    callers: dict[str, Caller]
    audit_db: sqlite3.Connection
    store_db: sqlite3.Connection
    pin: str
    secrets: list[tuple[str, str]]  # (what, text that must never be in a message or log line)
    blobs: dict[str, bytes]  # wrapped keys, by what they are
    public_ders: dict[str, bytes]
    tokens: dict[str, str]  # import tokens, by whose or what they are
    good: dict[int, bytes]  # signature format -> P256 v1's signature of GOOD_MESSAGE
    log: list[str]
    objects: int = 0  # objects in the token after the last call
    examples: int = 0
    log_checked: int = 0
    times: dict[str, list[float]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return "World()"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # how Hypothesis prints it
        p.text(repr(self))

    def now(self) -> datetime:
        return self.svc.clock()

    def snapshot(self) -> Snapshot:
        """Every row of the store (keys, versions, import tokens): read straight from its file,
        which is quick however many keys the fuzzing made."""
        return tuple(
            tuple(self.store_db.execute(f"SELECT * FROM {table} ORDER BY 1, 2"))
            for table in ("keys", "versions", "import_tokens")
        )

    def key(self, name: str) -> Key | None:
        try:
            return self.svc.server.store.get_key(name)
        except NotFound:
            return None

    def keys(self) -> list[Key]:
        return self.svc.server.store.list_keys("", 1_000_000)

    def count_objects(self) -> int:
        return int(self.svc.blocking(lambda: count_objects(self.svc.server.token)))

    def records(self) -> int:
        (seq,) = self.audit_db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()
        return int(seq)

    def last_record(self) -> tuple[str, str, str]:
        row = self.audit_db.execute(
            "SELECT operation, key, status FROM records ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return str(row[0]), str(row[1]), str(row[2])


def _serving(channel: grpc.Channel) -> bool:
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def _policy(path: Path) -> Path:
    path.write_text(
        "[[grant]]\n"
        f'callers = ["uid:{os.getuid()}", "x509:CN=fuzz-other"]\n'
        'operations = ["*"]\nscopes = ["*"]\n\n'
        "[[grant]]\n"
        'callers = ["x509:CN=fuzz-reader"]\n'
        'operations = ["read", "verify"]\nscopes = ["fuzz"]\n'
    )
    return path


def _certificate(subject: str, serial: str) -> tuple[tuple[str, str], ...]:
    """The headers the mTLS front sets for a client certificate it verified."""
    return ((SUBJECT_HEADER, subject), (ISSUER_HEADER, "CN=fuzz CA"), (SERIAL_HEADER, serial))


def call(caller: Caller, method: str, request: Any, raw: bool = False) -> Outcome:
    """One unary call: ``method`` a SignerService method's name or a full path; ``raw``: the
    request is bytes, sent as they are."""
    path = method if method.startswith("/") else SERVICE + method
    if raw:
        rpc = caller.channel.unary_unary(path)
    else:
        out_cls = getattr(pb, METHODS[method].output_type.name)
        rpc = caller.channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=out_cls.FromString,
        )
    try:
        response = rpc(request, metadata=caller.metadata, timeout=60)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "")
    return Outcome(OK, "", response)


def _wrap(key: Any, params: pb.ImportParameters) -> bytes:
    return wrapping.wrap(wrapping.pkcs8_der(key), params.wrapping_public_key_pem)


DER, SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def _spki(private_key: Any) -> bytes:
    return bytes(private_key.public_key().public_bytes(DER, SPKI))


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


def _random_token() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def secret_forms(what: str, value: bytes | str) -> list[tuple[str, str]]:
    """The ways a secret could show in a message: as given; bytes also as hex, base64 and
    Python's repr (each from its start, 16 bytes' worth: a message that shows a prefix of a
    blob shows this)."""
    if isinstance(value, str):
        return [(what, value)]
    forms = [
        (f"{what} (hex)", value.hex()[:32]),
        (f"{what} (HEX)", value.hex().upper()[:32]),
        (f"{what} (base64)", base64.b64encode(value).decode()[:22]),
        (f"{what} (base64url)", base64.urlsafe_b64encode(value).decode()[:22]),
        (f"{what} (repr)", str(value)[2:34]),
    ]
    if len(set(value[:16])) >= 8:  # a run of few byte values may be in a message by chance
        forms.append((f"{what} (as text)", value[:16].decode("latin-1")))
    return forms


@pytest.fixture(scope="module")
def world(token_host: TokenHostHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("fuzz-rpc")
    front = Path(socket_address().removeprefix("unix:"))
    cfg = make_config(
        tmp,
        token_host.token_config(),
        server={
            "policy_file": str(_policy(tmp / "policy.toml")),
            "front_socket": str(front),
            "max_message_bytes": MESSAGE_LIMIT,
            # The fuzzer is refused thousands of times a minute on purpose: the refusal
            # throttle (tested in test_audit) would answer RESOURCE_EXHAUSTED after 50.
            "refused_calls_budget": 0,
        },
        audit={"checkpoint_interval_seconds": 1.0},
    )
    svc = start_service(cfg, FakeClock(datetime.now(UTC)))
    with contextlib.ExitStack() as stack:
        stack.callback(svc.stop)
        lines = stack.enter_context(log_lines("signer"))
        local = stack.enter_context(grpc.insecure_channel(svc.address))
        front_channel = stack.enter_context(grpc.insecure_channel(f"unix:{front}"))
        try:
            user: str | None = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = None
        callers = {
            "me": Caller("me", PolicyCaller.unix(os.getuid(), user).identity, local),
            "other": Caller(
                "other", "x509:CN=fuzz-other", front_channel, _certificate("CN=fuzz-other", "0A")
            ),
            "reader": Caller(
                "reader", "x509:CN=fuzz-reader", front_channel, _certificate("CN=fuzz-reader", "0B")
            ),
            "anonymous": Caller("anonymous", "unauthenticated", front_channel),
        }
        world = _set_up(svc, callers, token_host, lines)
        stack.callback(world.audit_db.close)
        stack.callback(world.store_db.close)
        yield world
        _check_expensive(world)
        svc.stop()  # a last checkpoint: the whole log is signed
        verdict = verify_log(cfg.audit.path, cfg.audit.pinned_key.read_bytes())
        assert verdict.whole, verdict.first_bad
        assert verdict.last_checkpoint == verdict.records_end, verdict
        # The log keeps digests of payloads, never a secret.
        files = [Path(cfg.audit.path), Path(f"{cfg.audit.path}-wal")]
        kept = b"".join(f.read_bytes() for f in files if f.exists())
        for what, secret in world.secrets:
            assert secret.encode("utf-8", "surrogatepass") not in kept, f"{what} in the audit log"
        for what, blob in world.blobs.items():
            assert blob[:32] not in kept, f"wrapped blob ({what}) in the audit log"
        _report(world)


def _set_up(
    svc: RunningService, callers: dict[str, Caller], token_host: TokenHostHandle, log: list[str]
) -> World:
    c = svc.client()
    c.create_key(P256, "ec-p256", scope="fuzz", labels={"team": "fuzz"})
    for _ in range(3):
        c.rotate(P256)  # versions 2, 3 and 4
    c.set_primary(P256, 1)
    c.disable(P256, 2)
    c.schedule_destruction(P256, 3, MIN_WAIT)
    svc.clock.advance(days=2)
    assert svc.blocking(svc.server.keyring.reap) == 1  # version 3 is destroyed
    c.schedule_destruction(P256, 4)  # version 4 waits for its destruction
    c.create_key(P384, "ec-p384", scope="fuzz")
    c.create_key(P521, "ec-p521")
    c.create_key(RSA, "rsa-2048")
    c.create_key(LIFE, "ec-p256", scope="fuzz")
    c.rotate(LIFE)
    c.rotate(LIFE)

    # Wrapped import: one key imported for real (its pair can never be imported again), then
    # live import tokens of this caller and of another.
    imported = ec.generate_private_key(ec.SECP256R1())
    first = c.get_import_parameters()
    c.import_key_version(
        pb.ImportKeyVersionRequest(
            name=IMPORTED,
            algorithm="ec-p256",
            import_token=first.import_token,
            wrapped_key=_wrap(imported, first),
            scope="fuzz",
            public_key_der=_spki(imported),
        )
    )
    mine = c.get_import_parameters()
    theirs = call(callers["other"], "GetImportParameters", pb.GetImportParametersRequest())
    assert theirs.code is OK, theirs
    theirs_params: pb.ImportParameters = theirs.response
    # An expired and a used import token of this caller, straight into the store (their
    # wrapping keys were never made: the service refuses them before it would look).
    now = svc.clock()
    dead = {"expired": _random_token(), "used": _random_token()}
    for what, token in dead.items():
        svc.server.store.add_import_token(
            ImportToken(
                token,
                os.urandom(16),
                _spki(ec.generate_private_key(ec.SECP256R1())),
                now - timedelta(days=2),
                now - timedelta(days=1) if what == "expired" else now + timedelta(days=1),
                caller=callers["me"].display,
                used=what == "used",
            )
        )

    fresh = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    blobs = {
        "fresh key, for my token": _wrap(fresh, mine),
        "fresh key, for their token": _wrap(fresh, theirs_params),
        "imported key again, for my token": _wrap(imported, mine),
        "P-384 key, for my token": _wrap(p384, mine),
        "P-521 key, for my token": _wrap(ec.generate_private_key(ec.SECP521R1()), mine),
    }
    blobs["fresh key, a bit flipped"] = _flip(blobs["fresh key, for my token"], 100)
    blobs["fresh key, truncated"] = blobs["fresh key, for my token"][:-1]
    blobs["fresh key, one byte more"] = blobs["fresh key, for my token"] + b"\x00"
    public_ders = {
        "another P-256 key": _spki(ec.generate_private_key(ec.SECP256R1())),
        "the imported key": _spki(imported),
        "a P-384 key": _spki(ec.generate_private_key(ec.SECP384R1())),
        "a secp256k1 key": _spki(ec.generate_private_key(ec.SECP256K1())),
        "an RSA key": _spki(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "a DSA key": _spki(dsa.generate_private_key(1024)),
        "an X25519 key": _spki(x25519.X25519PrivateKey.generate()),
    }
    tokens = {"mine": mine.import_token, "theirs": theirs_params.import_token, **dead}
    tokens["forged"] = _random_token()
    good: dict[int, bytes] = {}
    for fmt in (pb.DER, pb.RAW):
        req = pb.SignRequest(name=P256, version=1, message=GOOD_MESSAGE, signature_format=fmt)
        good[fmt] = call(callers["me"], "Sign", req).response.signature

    pin = token_host.paths.user_pin.read_text().strip()
    secrets = [("the token's PIN", pin)]
    secrets += [(f"import token ({k})", v) for k, v in tokens.items()]
    for what, blob in blobs.items():
        secrets += secret_forms(f"wrapped blob ({what})", blob)
    secrets += secret_forms("the imported private key", wrapping.pkcs8_der(imported))
    audit_db = sqlite3.connect(f"file:{svc.server.cfg.audit.path}?mode=ro", uri=True)
    store_db = sqlite3.connect(f"file:{svc.server.cfg.store.path}?mode=ro", uri=True)
    world = World(
        svc, callers, audit_db, store_db, pin, secrets, blobs, public_ders, tokens, good, log
    )
    world.objects = world.count_objects()
    return world


def _report(world: World) -> None:
    """Examples and time per RPC, for docs/reliability.md (printed with -s)."""
    for method, times in sorted(world.times.items()):
        print(f"fuzz {method}: {len(times)} calls, {sum(times):.1f} s in calls")


# --- the invariants ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What the service must answer: one of ``codes``; a refusal's message must contain every
    one of ``says`` and, when ``any_of`` is given, one of those."""

    codes: tuple[grpc.StatusCode, ...]
    says: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()


def expect(code: grpc.StatusCode, *says: str) -> Expect:
    return Expect((code,), says)


SUCCESS = Expect((OK,))


def _payloads(request: Any) -> list[bytes]:
    """The request's byte fields long enough to be recognised in a message."""
    if isinstance(request, bytes):
        out = [request]
    else:
        out = []
        for desc, value in request.ListFields():
            if isinstance(value, bytes):
                out.append(value)
            elif desc.name == "items":
                out += [item.message or item.digest for item in value]
    return [p for p in out if len(p) >= 16]


def check_message(world: World, request: Any, details: str) -> None:
    """A refusal's message: present, bounded, and free of secrets and of the payload."""
    assert details.strip(), "a refusal without a message"
    assert len(details) <= MAX_DETAILS, f"a message of {len(details)} characters"
    assert "Traceback" not in details, details
    for what, secret in world.secrets:
        assert secret not in details, f"{what} in a message: {details!r}"
    for payload in _payloads(request):
        for what, form in secret_forms("the request's payload", payload):
            assert form not in details, f"{what} in a message: {details!r}"


def run(
    world: World,
    caller: Caller,
    method: str,
    request: Any,
    want: Expect | None,
    *,
    changes: bool = False,
    raw: bool = False,
    audited: bool = True,
) -> Outcome:
    """Calls ``method`` and checks every cheap invariant. ``want`` None: any status but those
    that are never right; ``changes``: a success may change the store and the token."""
    before = world.snapshot()
    objects = world.objects  # (what the token held after the last call)
    records = world.records()
    path = method if method.startswith("/") else SERVICE + method
    started = time.perf_counter()
    out = call(caller, method, request, raw=raw)
    world.times.setdefault(method.rsplit("/", 1)[-1], []).append(time.perf_counter() - started)

    where = f"{method} as {caller.kind}: {out.code.name} {out.details[:300]!r}"
    assert out.code not in NEVER, where
    size = len(request) if isinstance(request, bytes) else request.ByteSize()
    oversized = size > GRPC_LIMIT and path in KNOWN_PATHS  # (an unknown one is UNIMPLEMENTED)
    if oversized:  # refused by gRPC before the service sees it, so not recorded
        assert out.code is RE, where
        audited = False
    elif caller.kind == "anonymous" and audited:
        assert out.code is UA, where
        assert "no authenticated caller" in out.details, where
    elif want is not None:
        assert out.code in want.codes, f"{where}; wanted {[c.name for c in want.codes]}"
        if out.code is not OK:
            for fragment in want.says:
                assert fragment in out.details, f"{where}; wanted {fragment!r} in it"
            if want.any_of:
                assert any(f in out.details for f in want.any_of), f"{where}; {want.any_of}"
    if out.code is PD:
        assert caller.display in out.details, where
    # (grpcio-health-checking answers a service it does not know NOT_FOUND with no message.)
    if out.code is not OK and not (method == HEALTH_CHECK and out.code is NF):
        check_message(world, request, out.details)

    # Exactly one audit record per call the service saw, with its outcome.
    assert world.records() == records + audited, f"{where}: {world.records() - records} records"
    if audited:
        operation, key, status = world.last_record()
        assert operation == method.rsplit("/", 1)[-1], (operation, where)
        assert status == out.code.name, (status, where)
        assert len(key) <= MAX_DETAILS, where

    # Nothing changed by a failed call, nor by a read or a signature. The token is counted
    # after each call that makes objects; after the others, every CHECK_EVERY calls (SoftHSM2
    # reads every object to count them: 40 ms at 400 objects, and fuzzing makes hundreds).
    if method.rsplit("/", 1)[-1] in MAKES_OBJECTS:
        world.objects = world.count_objects()
    if out.code is not OK or not changes:
        assert world.snapshot() == before, f"{where}: the store changed"
        more = world.objects - objects
        assert not more, f"{where}: {more} objects more in the token"
    assert _serving(world.callers["me"].channel), f"{where}: health is not SERVING"

    world.examples += 1
    if world.examples % CHECK_EVERY == 0:
        _check_expensive(world)
    return out


def _check_expensive(world: World) -> None:
    """The token holds the objects it held after the last call that makes them; the live
    audit log verifies and holds every call; no secret in the service's log."""
    objects = world.count_objects()
    assert objects == world.objects, f"{objects - world.objects} objects more in the token"
    cfg = world.svc.server.cfg.audit
    verdict = verify_log(cfg.path, cfg.pinned_key.read_bytes())
    assert verdict.whole, verdict.first_bad
    assert verdict.records_end == world.records(), verdict
    new, world.log_checked = world.log[world.log_checked :], len(world.log)
    for line in new:
        for what, secret in world.secrets:
            assert secret not in line, f"{what} in a log line: {line[:300]!r}"


@pytest.fixture
def w(world: World) -> Iterator[World]:
    """The module's world; its expensive invariants are checked after each test as well."""
    yield world
    _check_expensive(world)


# --- strategies (plain values; ``@name`` refers to one of the world's tokens or blobs) -------

# Anything protobuf can carry in a string (it refuses lone surrogates before sending).
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
odd_strings = st.sampled_from(
    [
        "",
        " ",
        "A",
        "-a",
        ".a",
        "_a",
        "a" * 63,
        "a" * 64,
        "a" * 70_000,
        "a\x00b",
        "\x00",
        "a\n",
        "a\r\nb",
        "é",
        "\uff41",
        "a b",
        "a/b",
        "../x",
        "a\u202eb",
        "a\ufeff",
        "\U0001f600",
        "%s%n",
        "' OR 1=1 --",
        "{name}",
        "\\",
        "'",
        '"',
    ]
)
missing_names = st.from_regex(r"zz[a-z0-9._-]{0,61}", fullmatch=True)


def names(*existing: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(existing),
        st.sampled_from(existing),
        missing_names,
        st.from_regex(NAME_RE, fullmatch=True),
        text,
        odd_strings,
    )


caller_kinds = st.sampled_from(["me"] * 5 + ["other", "reader", "anonymous"])
versions = st.one_of(
    st.integers(0, 6), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)
)
enum_values = st.one_of(st.integers(0, 3), st.integers(-(2**31), 2**31 - 1))
algorithms = st.one_of(st.sampled_from(ALGORITHMS), text, odd_strings, st.just("EC-P256"))
scopes = st.one_of(
    st.sampled_from(["", "fuzz", "default", "other:scope", "a:b.c_d-e", "a" * 63, "a" * 64]),
    st.from_regex(SCOPE_RE, fullmatch=True),
    text,
    odd_strings,
)
label_keys = st.one_of(st.from_regex(LABEL_KEY_RE, fullmatch=True), text, odd_strings)
label_values = st.one_of(
    text, st.sampled_from(["", "\x00", "v" * 256, "v" * 257, "é" * 256, "é" * 257])
)
labels: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.just({}),
    st.dictionaries(label_keys, label_values, max_size=4),
    st.integers(63, 66).map(lambda n: {f"l{i}": "v" for i in range(n)}),
)


def sized(*sizes: int) -> st.SearchStrategy[bytes]:
    return st.sampled_from(sizes).map(lambda n: b"m" * n)


# Past gRPC's own limit (refused before the service sees it) rarely: each such call takes
# gRPC a quarter of a second to refuse.
messages = st.one_of(
    st.binary(max_size=64),
    sized(0, 1, MESSAGE_LIMIT - 1, MESSAGE_LIMIT, MESSAGE_LIMIT + 1, 2 * MESSAGE_LIMIT, 1, 2, 3),
    sized(GRPC_LIMIT + 1, *[1] * 15),
)
digests = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([0, 1, 20, 31, 32, 33, 47, 48, 49, 63, 64, 65, 128]).map(lambda n: b"d" * n),
)
Input = tuple[str, bytes] | None
inputs: st.SearchStrategy[Input] = st.one_of(
    st.none(), st.tuples(st.just("message"), messages), st.tuples(st.just("digest"), digests)
)


def _set_input(request: Any, value: Input) -> None:
    if value is not None:
        setattr(request, value[0], value[1])


# --- the oracle: what the answer must be, from the store as it is before the call -----------


def valid(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def key_gate(
    world: World, caller: Caller, operation: str, name: str
) -> tuple[Key | None, Expect | None]:
    """What every call on one key checks first: the name, then the caller's grant."""
    if not valid(NAME_RE, name):
        return None, expect(IA, "name", "is invalid")
    key = world.key(name)
    if not caller.allows(operation, key):
        return key, expect(PD, f"may not {operation} key {name!r}")
    return key, None


def version_gate(
    world: World, key: Key | None, name: str, number: int, *usable: State
) -> tuple[Version | None, Expect | None]:
    """NOT_FOUND for no key or no such version (0: the primary); FAILED_PRECONDITION unless
    its state now is one of ``usable`` (none given: any)."""
    if key is None:
        return None, expect(NF, f"key {name!r} not found")
    wanted = number or key.primary
    v = next((v for v in key.versions if v.version == wanted), None)
    if v is None:
        return None, expect(NF, f"key {name!r} has no version {wanted}")
    state = v.effective_state(world.now())
    if usable and state not in usable:
        return v, expect(FP, f"version {wanted} is {state.value.replace('_', ' ')}")
    return v, None


def input_gate(value: Input, prefix: str = "") -> Expect | None:
    if value is None:
        return expect(IA, f"{prefix}one of message or digest is required")
    kind, data = value
    if kind == "message" and not data:
        return expect(IA, f"{prefix}message is empty")
    if kind == "message" and len(data) > MESSAGE_LIMIT:
        return expect(IA, f"message is {len(data)} bytes", f"the limit is {MESSAGE_LIMIT}")
    return None


def digest_gate(key: Key, value: tuple[str, bytes]) -> Expect | None:
    kind, data = value
    size = DIGEST_SIZES[key.algorithm]
    if kind == "digest" and len(data) != size:
        return expect(IA, f"digest must be {size} bytes", f"got {len(data)}")
    return None


def verifies(
    key: Key, v: Version, signature: bytes, value: tuple[str, bytes], fmt: int, pad: int
) -> bool:
    """Checks a signature without the service: cryptography and the stored public key."""
    public = serialization.load_der_public_key(v.public_key_der)
    kind, data = value
    h = HASHES[key.algorithm]()
    algo: Any = utils.Prehashed(h) if kind == "digest" else h
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            if fmt == pb.RAW:
                width = (public.curve.key_size + 7) // 8
                if len(signature) != 2 * width:
                    return False
                r, s = signature[:width], signature[width:]
                signature = utils.encode_dss_signature(
                    int.from_bytes(r, "big"), int.from_bytes(s, "big")
                )
            public.verify(signature, data, ec.ECDSA(algo))
        else:
            assert isinstance(public, rsa.RSAPublicKey)
            pad_obj: Any = (
                padding.PKCS1v15()
                if pad == pb.PKCS1V15
                else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            )
            public.verify(signature, data, pad_obj, algo)
    except InvalidSignature:
        return False
    return True


def labels_problem(values: dict[str, str]) -> Expect | None:
    if len(values) > 64:
        return expect(IA, "at most 64 labels")
    problems: list[str] = []
    for k, v in values.items():
        if not valid(LABEL_KEY_RE, k):
            problems.append("label key")
        if len(v) > 256:
            problems.append("value longer than 256 characters")
    return Expect((IA,), any_of=tuple(problems)) if problems else None


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def page_after(token: str) -> str | None:
    """The name a page token continues after, or None when it is malformed."""
    try:
        name = base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    return name if valid(NAME_RE, name) else None


class _Refused(Exception):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise _Refused
    return dict(pairs)


def _constant(name: str) -> Any:
    raise _Refused


def depth(text: str) -> int:
    """How deep arrays and objects nest in JSON text, character by character."""
    level = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            level += 1
            deepest = max(deepest, level)
        elif ch in "]}":
            level -= 1
    return deepest


def claims_problem(claims: bytes) -> str | None:
    """Why ``claims`` are not a claims set (RFC 7519: a JSON object, unique member names;
    RFC 8259: no NaN or Infinity; nested at most MAX_CLAIMS_DEPTH deep), or None."""
    if not claims:
        return "claims are empty"
    if len(claims) > MAX_CLAIMS:
        return f"claims are {len(claims)} bytes"
    try:
        if depth(claims.decode("utf-8")) > MAX_CLAIMS_DEPTH:
            return f"too deeply: more than {MAX_CLAIMS_DEPTH} levels"
    except UnicodeDecodeError:
        return "claims are not UTF-8"
    try:
        parsed = json.loads(
            claims.decode("utf-8"), object_pairs_hook=_unique, parse_constant=_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError, _Refused):
        return "claims"
    return None if isinstance(parsed, dict) else "claims must be a JSON object"


def _jwt_part(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# --- the tests, one per RPC -------------------------------------------------------------------


@fuzz(200)
@given(
    caller=caller_kinds,
    name=names(P256, P384, P521, RSA),
    version=st.one_of(st.integers(0, 5), versions),
    value=inputs,
    fmt=enum_values,
    pad=enum_values,
)
def test_sign(
    w: World, caller: str, name: str, version: int, value: Input, fmt: int, pad: int
) -> None:
    who = w.callers[caller]
    # fmt and pad: any int32 on purpose (unknown enum values too), which protobuf carries.
    req = pb.SignRequest(name=name, version=version, signature_format=fmt, rsa_padding=pad)  # type: ignore[arg-type]
    _set_input(req, value)
    key, want = key_gate(w, who, "sign", name)
    v = None
    want = want or input_gate(value)
    if want is None:
        v, want = version_gate(w, key, name, version, State.ENABLED)
    if want is None:
        assert key is not None
        assert value is not None
        want = digest_gate(key, value)
    out = run(w, who, "Sign", req, want or SUCCESS)
    if out.code is OK:
        assert key is not None
        assert v is not None
        assert value is not None
        assert (out.response.version, out.response.algorithm) == (v.version, key.algorithm)
        assert verifies(key, v, out.response.signature, value, fmt, pad)


signatures = st.one_of(
    st.binary(max_size=160),
    st.sampled_from(["@der", "@raw", "@der flipped", "@raw flipped", "@der extended"]),
    sized(0, 1, 512, *[1] * 10, GRPC_LIMIT + 1),
)


@fuzz(200)
@given(
    caller=caller_kinds,
    name=names(P256, P384, RSA),
    version=st.one_of(st.integers(0, 5), versions),
    value=st.one_of(
        inputs,
        st.just(("message", GOOD_MESSAGE)),
        st.just(("digest", hashlib.sha256(GOOD_MESSAGE).digest())),
    ),
    signature=signatures,
    fmt=enum_values,
    pad=enum_values,
)
@example(
    caller="me",
    name=P256,
    version=1,
    value=("message", GOOD_MESSAGE),
    signature="@der",
    fmt=pb.DER,
    pad=0,
)
def test_verify(
    w: World,
    caller: str,
    name: str,
    version: int,
    value: Input,
    signature: bytes | str,
    fmt: int,
    pad: int,
) -> None:
    who = w.callers[caller]
    if isinstance(signature, str):
        good = w.good[pb.RAW if signature.startswith("@raw") else pb.DER]
        signature = {"flipped": _flip(good, 10), "extended": good + b"\x00"}.get(
            signature.rsplit(" ", 1)[-1], good
        )
    req = pb.VerifyRequest(
        name=name,
        version=version,
        signature=signature,
        signature_format=fmt,  # type: ignore[arg-type]  # any int32 on purpose, as in Sign
        rsa_padding=pad,  # type: ignore[arg-type]
    )
    _set_input(req, value)
    key, want = key_gate(w, who, "verify", name)
    v = None
    want = want or input_gate(value)
    if want is None and not signature:
        want = expect(IA, "signature is empty")
    if want is None:
        v, want = version_gate(w, key, name, version, State.ENABLED)
    if want is None:
        assert key is not None
        assert value is not None
        want = digest_gate(key, value)
    out = run(w, who, "Verify", req, want or SUCCESS)
    if out.code is OK:
        assert key is not None
        assert v is not None
        assert value is not None
        assert out.response.version == v.version
        assert out.response.valid == verifies(key, v, signature, value, fmt, pad)
        good = w.good[pb.RAW if fmt == pb.RAW else pb.DER]
        if (name, v.version, value, signature) == (P256, 1, ("message", GOOD_MESSAGE), good):
            assert out.response.valid


BatchItem = tuple[str, bytes] | None
batch_items: st.SearchStrategy[BatchItem] = st.one_of(
    st.none(),
    st.tuples(
        st.just("message"),
        st.one_of(st.binary(max_size=32), sized(0, MESSAGE_LIMIT, MESSAGE_LIMIT + 1)),
    ),
    st.tuples(st.just("digest"), digests),
)
batches = st.one_of(
    st.lists(batch_items, max_size=8),
    st.tuples(st.sampled_from([0, 1, 50, 51, 999, 1000, 1001, 2000]), batch_items).map(
        lambda t: [t[1]] * t[0]
    ),
)


@fuzz(80)
@given(
    caller=caller_kinds,
    name=names(P256, P384, RSA),
    version=st.one_of(st.integers(0, 5), versions),
    items=batches,
    fmt=enum_values,
    pad=enum_values,
)
@example(
    caller="me", name=P256, version=0, items=[("digest", b"d" * 32)] * MAX_BATCH, fmt=pb.RAW, pad=0
)
@example(caller="me", name=P256, version=0, items=[None] * (MAX_BATCH + 1), fmt=0, pad=0)
# 1,000 RSA signatures: a 260 KB answer, which gRPC refused to send (RESOURCE_EXHAUSTED) once
# the batch had been signed and recorded OK, while its send limit followed max_message_bytes.
@example(
    caller="me",
    name=RSA,
    version=0,
    items=[("digest", b"d" * 32)] * MAX_BATCH,
    fmt=0,
    pad=pb.PKCS1V15,
)
def test_sign_batch(
    w: World, caller: str, name: str, version: int, items: list[BatchItem], fmt: int, pad: int
) -> None:
    who = w.callers[caller]
    # fmt and pad: any int32 on purpose, as in Sign.
    req = pb.SignBatchRequest(name=name, version=version, signature_format=fmt, rsa_padding=pad)  # type: ignore[arg-type]
    for item in items:
        entry = req.items.add()
        _set_input(entry, item)
    key, want = key_gate(w, who, "sign", name)
    v = None
    if want is None and not items:
        want = expect(IA, "items is empty")
    if want is None and len(items) > MAX_BATCH:
        want = expect(IA, f"{len(items)} items", f"at most {MAX_BATCH}")
    if want is None:
        v, want = version_gate(w, key, name, version, State.ENABLED)
    out = run(w, who, "SignBatch", req, want or SUCCESS)
    if out.code is not OK:
        return
    assert key is not None
    assert v is not None
    assert (out.response.version, out.response.algorithm) == (v.version, key.algorithm)
    assert len(out.response.results) == len(items)
    for i, (item, result) in enumerate(zip(items, out.response.results, strict=True)):
        wrong = input_gate(item, f"item {i}: ")
        if wrong is None and item is not None:
            wrong = digest_gate(key, item)
        if wrong is None:
            assert result.WhichOneof("outcome") == "signature", (i, result)
            assert item is not None
            assert verifies(key, v, result.signature, item, fmt, pad), i
        else:
            assert result.WhichOneof("outcome") == "error", (i, result)
            assert result.error.code == code_pb2.INVALID_ARGUMENT, (i, result)
            error = result.error.message
            assert error.startswith(f"item {i}: "), error
            for fragment in wrong.says:
                assert fragment in error, (i, fragment, error)
            check_message(w, req, error)


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        text,
        st.just([]),
        st.just({}),
    ),
    # (min_size=1: Hypothesis checks that the extension uses its argument.)
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3)
        | st.dictionaries(text, inner, min_size=1, max_size=3)
    ),
    max_leaves=8,
)


def _padded(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes."""
    return b'{"a":"' + b"x" * (size - 8) + b'"}'


claims_sets = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(text, json_values, max_size=5).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([MAX_CLAIMS - 1, MAX_CLAIMS, MAX_CLAIMS + 1]).map(_padded),
    st.one_of(st.integers(1, 50_000), st.sampled_from([127, 128, 129, 999, 1000, 1987])).map(
        lambda n: b"[" * n + b"]" * n
    ),
    st.one_of(st.integers(1, 20_000), st.sampled_from([127, 128, 129, 999, 1000, 1987])).map(
        lambda n: b'{"a":' * n + b"1" + b"}" * n
    ),
    st.integers(120, 140).map(lambda n: b'{"a":"' + b"[" * n + b'\\"{"}'),  # in a string
    st.integers(4_000, 5_000).map(lambda n: b'{"n": ' + b"7" * n + b"}"),
    st.sampled_from(
        [
            b"",
            b" ",
            b"null",
            b"{}",
            b"[]",
            b'"x"',
            b"1",
            b"{} x",
            b"{}\x00",
            b"\xef\xbb\xbf{}",
            b'{"a": NaN}',
            b'{"a": Infinity}',
            b'{"a": -Infinity}',
            b'{"a": 1e999}',
            b'{"sub": "me", "sub": "admin"}',
            b'{"a": {"b": 1, "b": 2}}',
            b'{"a": "\\ud800"}',
            b'{"a": "\xff"}',
            b"\xff\xfe{\x00}\x00",
            '{"ä": 1}'.encode("utf-16"),
            '{"é": 1}'.encode("latin-1"),
            b'{"a": "\x00"}',
            b'{"a"  :  1  }',
        ]
    ),
)


@fuzz(250)
@given(caller=caller_kinds, name=names(P256, P384, RSA, LIFE), claims=claims_sets)
@example(caller="me", name=P256, claims=b"[" * 30_000 + b"]" * 30_000)
# Signed by a lane thread, refused by a deeper one: RecursionError decided, at about 1,900 levels.
@example(caller="me", name=P256, claims=b'{"a":' * 1987 + b"1" + b"}" * 1987)
@example(caller="me", name=P256, claims=b'{"a":' * 129 + b"1" + b"}" * 129)
@example(caller="me", name=P256, claims=b'{"a":' * 128 + b"1" + b"}" * 128)
@example(caller="me", name=P256, claims=b'{"n": ' + b"7" * 5_000 + b"}")
@example(caller="me", name=P256, claims=b'{"exp": NaN}')
@example(caller="me", name=P256, claims=b'{"sub": "me", "sub": "admin"}')
@example(caller="me", name=P256, claims=b'{"a": "\xff"}')
@example(caller="me", name=P256, claims=_padded(MAX_CLAIMS))  # an 87 KB answer (as above)
def test_sign_jwt(w: World, caller: str, name: str, claims: bytes) -> None:
    who = w.callers[caller]
    req = pb.SignJWTRequest(name=name, claims=claims)
    key, want = key_gate(w, who, "sign", name)
    v = None
    problem = claims_problem(claims)
    if want is None and problem is not None:
        want = expect(IA, problem)
    if want is None:
        v, want = version_gate(w, key, name, 0, State.ENABLED)
    out = run(w, who, "SignJWT", req, want or SUCCESS)
    if out.code is not OK:
        assert "codec can't decode" not in out.details, out.details  # it showed a byte
        return
    assert key is not None
    assert v is not None
    r = out.response
    kid = f"{name}/{v.version}"
    assert (r.kid, r.alg, r.version) == (kid, JWS_ALGS[key.algorithm], v.version)
    header, payload, signature = r.token.split(".")
    assert json.loads(_jwt_part(header)) == {"alg": r.alg, "kid": kid, "typ": "JWT"}
    assert _jwt_part(payload) == claims  # used as given
    data = ("message", f"{header}.{payload}".encode())
    assert verifies(key, v, _jwt_part(signature), data, pb.RAW, pb.PSS)


@pytest.mark.parametrize(
    "claims",
    [
        b'"' + b'\\"' * 21_000 + b"[" * 200,  # a string never closed, and brackets
        b"[" * 200 + b'"' + b'\\"' * 21_000,
        b"[]" * 32_000,
    ],
)
def test_claims_depth_is_found_in_linear_time(claims: bytes) -> None:
    """The depth bound that replaced RecursionError reads each character once: a first
    version looked for a closing quote from every quote (6.8 s for these 64 KiB of one lane's
    time; now milliseconds)."""
    started = time.perf_counter()
    with pytest.raises(InvalidArgument, match="claims"):
        check_claims(claims)
    assert time.perf_counter() - started < 1.0


@fuzz(100)
@given(caller=caller_kinds, name=names(P256, P384, RSA, IMPORTED))
def test_get_key(w: World, caller: str, name: str) -> None:
    who = w.callers[caller]
    key, want = key_gate(w, who, "read", name)
    if want is None and key is None:
        want = expect(NF, f"key {name!r} not found")
    out = run(w, who, "GetKey", pb.GetKeyRequest(name=name), want or SUCCESS)
    if out.code is OK:
        assert key is not None
        r = out.response
        assert (r.name, r.algorithm, r.primary_version, r.scope, dict(r.labels)) == (
            key.name,
            key.algorithm,
            key.primary,
            key.scope,
            key.labels,
        )
        assert [x.version for x in r.versions] == [x.version for x in key.versions]


@fuzz(120)
@given(
    caller=caller_kinds,
    name=names(P256, P384, RSA, IMPORTED),
    version=st.one_of(st.integers(0, 5), versions),
    fmt=enum_values,
)
def test_get_public_key(w: World, caller: str, name: str, version: int, fmt: int) -> None:
    who = w.callers[caller]
    # fmt: any int32 on purpose, as in Sign.
    req = pb.GetPublicKeyRequest(name=name, version=version, format=fmt)  # type: ignore[arg-type]
    key, want = key_gate(w, who, "read", name)
    v = None
    if want is None:
        v, want = version_gate(
            w, key, name, version, State.ENABLED, State.DISABLED, State.DESTRUCTION_SCHEDULED
        )
    out = run(w, who, "GetPublicKey", req, want or SUCCESS)
    if out.code is not OK:
        return
    assert key is not None
    assert v is not None
    r = out.response
    assert (r.name, r.version, r.algorithm) == (name, v.version, key.algorithm)
    if fmt == pb.JWK:
        jwk = json.loads(r.jwk)
        assert (jwk["kid"], jwk["alg"], jwk["use"]) == (
            f"{name}/{v.version}",
            JWS_ALGS[key.algorithm],
            "sig",
        )
        assert r.pem == ""
    else:
        public = serialization.load_pem_public_key(r.pem.encode())
        assert public.public_bytes(DER, SPKI) == v.public_key_der


page_tokens = st.one_of(
    st.just(""),
    st.sampled_from([P256, P384, P521, RSA, LIFE, IMPORTED, "a", "zzz"]).map(
        lambda n: b64(n.encode())
    ),
    st.from_regex(NAME_RE, fullmatch=True).map(lambda n: b64(n.encode())),
    st.one_of(text, odd_strings).map(lambda s: b64(s.encode("utf-8"))),
    st.binary(max_size=40).map(b64),
    st.from_regex(NAME_RE, fullmatch=True).map(lambda n: b64(n.encode()).rstrip("=")),
    text,
    odd_strings,
)


@fuzz(120)
@given(
    caller=caller_kinds,
    page_size=st.one_of(
        st.integers(0, 3),
        st.sampled_from([MAX_PAGE, MAX_PAGE + 1, 2**31, 2**32 - 1]),
        st.integers(0, 2**32 - 1),
    ),
    page_token=page_tokens,
)
def test_list_keys(w: World, caller: str, page_size: int, page_token: str) -> None:
    who = w.callers[caller]
    req = pb.ListKeysRequest(page_size=page_size, page_token=page_token)
    keys = w.keys()
    after = page_after(page_token) if page_token else ""
    want = None
    if page_size > MAX_PAGE:
        want = expect(IA, f"page_size must be at most {MAX_PAGE}", f"got {page_size}")
    elif after is None:
        want = expect(IA, "page_token is malformed")
    out = run(w, who, "ListKeys", req, want or SUCCESS)
    if out.code is not OK:
        return
    assert after is not None
    size = page_size or DEFAULT_PAGE
    rest = sorted(k.name for k in keys if k.name > after and who.allows("read", k))
    assert [k.name for k in out.response.keys] == rest[:size]
    more = len(rest) > size
    assert out.response.next_page_token == (b64(rest[size - 1].encode()) if more else "")


@fuzz(100)
@given(caller=caller_kinds, scope=scopes)
def test_get_jwks(w: World, caller: str, scope: str) -> None:
    who = w.callers[caller]
    keys = w.keys()
    want = None
    if not scope:
        want = expect(IA, "scope is required")
    elif not valid(SCOPE_RE, scope):
        want = expect(IA, "scope", "is invalid")
    out = run(w, who, "GetJWKS", pb.GetJWKSRequest(scope=scope), want or SUCCESS)
    if out.code is not OK:
        return
    jwks = json.loads(out.response.jwks)
    kids = [
        f"{k.name}/{v.version}"
        for k in sorted(keys, key=lambda k: k.name)
        if k.scope == scope and who.allows("read", k)
        for v in k.versions
        if v.effective_state(w.now()) is State.ENABLED
    ]
    assert [j["kid"] for j in jwks["keys"]] == kids
    assert all(j["scope"] == scope for j in jwks["keys"])


@fuzz(150)
@given(
    caller=caller_kinds,
    name=names(P256, RSA, IMPORTED),
    algorithm=algorithms,
    scope=scopes,
    key_labels=labels,
)
@example(caller="me", name=P256, algorithm="ec-p256", scope="", key_labels={"a" * 64: "v"})
def test_create_key(
    w: World, caller: str, name: str, algorithm: str, scope: str, key_labels: dict[str, str]
) -> None:
    who = w.callers[caller]
    exists = w.key(name) is not None
    if not exists and algorithm.startswith("rsa-"):
        algorithm = "rsa-2048"  # a new key: at most the cheapest RSA generation
    req = pb.CreateKeyRequest(name=name, algorithm=algorithm, scope=scope, labels=key_labels)
    want: Expect | None = None
    if not valid(NAME_RE, name):
        want = expect(IA, "name", "is invalid")
    elif scope and not valid(SCOPE_RE, scope):
        want = expect(IA, "scope", "is invalid")
    elif not who.may_create:
        want = expect(PD, f"may not create key {name!r}")
    elif algorithm not in ALGORITHMS:
        want = expect(IA, "algorithm", "is not supported")
    else:
        want = labels_problem(key_labels)
    if want is None and exists:
        want = expect(AE, f"key {name!r} already exists")
    if want is None and algorithm == "ed25519":
        want = expect(FP, "ed25519", "CKM_EDDSA")
    objects = w.objects
    out = run(w, who, "CreateKey", req, want or SUCCESS, changes=True)
    if out.code is OK:
        r = out.response
        assert (r.name, r.algorithm, r.primary_version, r.scope, dict(r.labels)) == (
            name,
            algorithm,
            1,
            scope or "default",
            key_labels,
        )
        assert w.objects == objects + 2  # the key pair, nothing else


lifecycle_names = st.one_of(
    st.sampled_from([LIFE, P256]),
    missing_names,
    text,
    odd_strings,
    st.from_regex(NAME_RE, fullmatch=True),
)
small_versions = st.one_of(st.integers(0, 6), versions)


@fuzz(80)
@given(
    caller=caller_kinds,
    name=st.one_of(
        st.just(LIFE), missing_names, text, odd_strings, st.from_regex(NAME_RE, fullmatch=True)
    ),
)
def test_rotate_key(w: World, caller: str, name: str) -> None:
    who = w.callers[caller]
    key, want = key_gate(w, who, "rotate", name)
    if want is None and key is None:
        want = expect(NF, f"key {name!r} not found")
    objects = w.objects
    out = run(w, who, "RotateKey", pb.RotateKeyRequest(name=name), want or SUCCESS, changes=True)
    if out.code is OK:
        assert key is not None
        newest = max(v.version for v in key.versions) + 1
        assert out.response.primary_version == newest
        assert w.objects == objects + 2


@fuzz(100)
@given(caller=caller_kinds, name=lifecycle_names, version=small_versions)
def test_set_primary_version(w: World, caller: str, name: str, version: int) -> None:
    who = w.callers[caller]
    key, want = key_gate(w, who, "rotate", name)
    if want is None and version == 0:
        want = expect(IA, "version is required")
    if want is None:
        v, want = version_gate(w, key, name, version)
        if want is None and v is not None and v.effective_state(w.now()) is not State.ENABLED:
            want = expect(FP, "only an enabled version can be primary")
    req = pb.SetPrimaryVersionRequest(name=name, version=version)
    out = run(w, who, "SetPrimaryVersion", req, want or SUCCESS, changes=True)
    if out.code is OK:
        assert out.response.primary_version == version


TRANSITIONS = {
    # method: (operation, states it may start from, state it ends in)
    "DisableKeyVersion": ("disable", {State.ENABLED, State.DISABLED}, pb.DISABLED),
    "EnableKeyVersion": ("disable", {State.ENABLED, State.DISABLED}, pb.ENABLED),
    "CancelKeyVersionDestruction": ("destroy", {State.DESTRUCTION_SCHEDULED}, pb.DISABLED),
}


@fuzz(150)
@given(
    method=st.sampled_from(sorted(TRANSITIONS)),
    caller=caller_kinds,
    name=lifecycle_names,
    version=small_versions,
)
def test_version_state_changes(w: World, method: str, caller: str, name: str, version: int) -> None:
    operation, allowed, to = TRANSITIONS[method]
    who = w.callers[caller]
    key, want = key_gate(w, who, operation, name)
    if want is None and version == 0:
        want = expect(IA, "version is required")
    if want is None:
        v, want = version_gate(w, key, name, version)
        if want is None and v is not None and v.effective_state(w.now()) not in allowed:
            want = expect(FP, f"version {version} is", "cannot make it")
    req = pb.KeyVersionRequest(name=name, version=version)
    out = run(w, who, method, req, want or SUCCESS, changes=True)
    if out.code is OK:
        assert (out.response.name, out.response.version, out.response.state) == (name, version, to)


waiting_periods = st.one_of(
    st.sampled_from(
        [0, 1, MIN_WAIT - 1, MIN_WAIT, MAX_WAIT, MAX_WAIT + 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
    ),
    st.integers(0, 2**64 - 1),
    st.integers(MIN_WAIT, MAX_WAIT),
)


@fuzz(120)
@given(caller=caller_kinds, name=lifecycle_names, version=small_versions, wait=waiting_periods)
@example(caller="me", name=LIFE, version=1, wait=2**64 - 1)
def test_schedule_key_version_destruction(
    w: World, caller: str, name: str, version: int, wait: int
) -> None:
    who = w.callers[caller]
    key, want = key_gate(w, who, "destroy", name)
    seconds = wait or DEFAULT_WAIT
    if want is None and seconds < MIN_WAIT:
        want = expect(IA, f"waiting_period_seconds must be at least {MIN_WAIT}")
    if want is None and seconds > MAX_WAIT:
        want = expect(IA, f"waiting_period_seconds must be at most {MAX_WAIT}")
    if want is None and version == 0:
        want = expect(IA, "version is required")
    if want is None:
        v, want = version_gate(w, key, name, version)
        assert want is not None or (key is not None and v is not None)
        if want is None and key is not None and version == key.primary:
            want = expect(FP, "is the primary version")
        elif (
            want is None
            and v is not None
            and v.effective_state(w.now())
            not in (
                State.ENABLED,
                State.DISABLED,
            )
        ):
            want = expect(FP, "cannot make it destruction scheduled")
    req = pb.ScheduleKeyVersionDestructionRequest(
        name=name, version=version, waiting_period_seconds=wait
    )
    out = run(w, who, "ScheduleKeyVersionDestruction", req, want or SUCCESS, changes=True)
    if out.code is OK:
        r = out.response
        assert r.state == pb.DESTRUCTION_SCHEDULED
        assert r.destroy_time.ToDatetime(tzinfo=UTC) == w.now() + timedelta(seconds=seconds)


@fuzz(10)
@given(caller=caller_kinds)
def test_get_import_parameters(w: World, caller: str) -> None:
    """Asked again, a caller gets its live import token back: no new wrapping key."""
    who = w.callers[caller]
    want = expect(PD, "may not import keys") if who.kind == "reader" else SUCCESS
    out = run(w, who, "GetImportParameters", pb.GetImportParametersRequest(), want)
    if out.code is OK:
        mine = w.tokens["mine" if who.kind == "me" else "theirs"]
        assert out.response.import_token == mine
        assert out.response.wrapping_algorithm == "RSA-OAEP-SHA1"


TOKEN_OWNERS = {"mine": "me", "expired": "me", "used": "me", "theirs": "other", "forged": ""}
import_tokens = st.one_of(
    st.sampled_from([f"@{t}" for t in TOKEN_OWNERS]),
    st.sampled_from([f"@{t}" for t in TOKEN_OWNERS]),
    st.from_regex(TOKEN_RE, fullmatch=True),
    text,
    odd_strings,
    st.sampled_from(["a" * 15, "a" * 16, "a" * 128, "a" * 129]),
)
BLOBS = (
    "fresh key, for my token",
    "fresh key, for their token",
    "imported key again, for my token",
    "P-384 key, for my token",
    "P-521 key, for my token",
    "fresh key, a bit flipped",
    "fresh key, truncated",
    "fresh key, one byte more",
)
wrapped_keys = st.one_of(
    st.sampled_from([f"@{b}" for b in BLOBS]),
    st.binary(max_size=64),
    st.binary(min_size=512, max_size=512),  # one RSA-4096 block: the token tries to unwrap it
    sized(0, MAX_WRAPPED, MAX_WRAPPED + 1),
)
PUBLICS = (
    "another P-256 key",
    "the imported key",
    "a P-384 key",
    "a secp256k1 key",
    "an RSA key",
    "a DSA key",
    "an X25519 key",
    "an EC key on an unknown curve",
)
public_keys = st.one_of(
    st.just(b""), st.sampled_from([f"@{p}" for p in PUBLICS]), st.binary(max_size=100)
)


def _unknown_curve() -> bytes:
    """An EC public key whose named curve (1.3.132.0.111) no library knows."""
    der = _spki(ec.generate_private_key(ec.SECP256K1()))
    secp256k1 = bytes.fromhex("06052b8104000a")
    return der.replace(secp256k1, bytes.fromhex("06052b8104006f"))


def _spki_problem(der: bytes) -> bool:
    """Whether the service must refuse ``der`` as public_key_der (not an EC, RSA or Ed25519
    SubjectPublicKeyInfo it can read)."""
    try:
        key = serialization.load_der_public_key(der)
    except Exception:  # ValueError, UnsupportedAlgorithm
        return True
    kinds = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    return not isinstance(key, kinds)


def import_expect(
    w: World, who: Caller, req: pb.ImportKeyVersionRequest, token_kind: str
) -> Expect:
    """Up to the unwrap, the answer is known; the token's verdict on a blob is one of two."""
    name, scope, alg = req.name, req.scope, req.algorithm
    if not valid(NAME_RE, name):
        return expect(IA, "name", "is invalid")
    if scope and not valid(SCOPE_RE, scope):
        return expect(IA, "scope", "is invalid")
    if alg and alg not in ALGORITHMS:
        return expect(IA, "algorithm", "is not supported")
    bad_labels = labels_problem(dict(req.labels))
    if bad_labels is not None:
        return bad_labels
    if not valid(TOKEN_RE, req.import_token):
        return expect(IA, "import_token is missing or malformed")
    if not req.wrapped_key:
        return expect(IA, "wrapped_key is empty")
    if len(req.wrapped_key) > MAX_WRAPPED:
        return expect(IA, f"wrapped_key is {len(req.wrapped_key)} bytes")
    if req.public_key_der and _spki_problem(req.public_key_der):
        return expect(IA, "public_key_der is not a DER SubjectPublicKeyInfo")
    key = w.key(name)
    if who.kind == "reader":
        return expect(PD, f"may not import key {name!r}")
    if key is not None:
        if alg and alg != key.algorithm:
            return expect(IA, f"must be {key.algorithm}")
        if scope and scope != key.scope:
            return expect(IA, "scope is fixed at creation")
        if req.labels and dict(req.labels) != key.labels:
            return expect(IA, "labels are fixed at creation")
        alg = key.algorithm
    elif not alg:
        return expect(IA, "algorithm is required")
    if alg not in ("ec-p256", "ec-p384", "ec-p521"):
        return expect(FP, alg)
    if TOKEN_OWNERS.get(token_kind) != who.kind:
        return expect(IA, "import_token is unknown")
    if token_kind == "used":
        return expect(FP, "import_token was already used")
    if token_kind == "expired":
        return expect(FP, "import_token expired")
    if len(req.wrapped_key) != WRAPPING_BLOCK:  # p11-kit carries no two-step mechanism
        return expect(IA, f"wrapped_key is {len(req.wrapped_key)} bytes", f"{WRAPPING_BLOCK} bytes")
    # What the token makes of the block: not a key, not this one, the pair imported already.
    return Expect((IA, AE), any_of=("wrapped_key", "wrapped key", "public_key_der", "already"))


@fuzz(200)
@given(
    caller=caller_kinds,
    name=st.one_of(st.sampled_from([IMPORTED, P256, LIFE]), names(P256)),
    algorithm=st.one_of(st.sampled_from(["", "ec-p256", "ec-p384"]), algorithms),
    token=import_tokens,
    wrapped=wrapped_keys,
    scope=st.one_of(st.just(""), scopes),
    key_labels=st.one_of(st.just({}), labels),
    public=public_keys,
)
@example(
    caller="me",
    name=IMPORTED,
    algorithm="",
    token="@mine",
    wrapped="@imported key again, for my token",
    scope="",
    key_labels={},
    public="@the imported key",
)
@example(
    caller="me",
    name="zz-new",
    algorithm="ec-p256",
    token="@mine",
    wrapped="@fresh key, for my token",
    scope="",
    key_labels={},
    public="@an EC key on an unknown curve",
)
def test_import_key_version(
    w: World,
    caller: str,
    name: str,
    algorithm: str,
    token: str,
    wrapped: bytes | str,
    scope: str,
    key_labels: dict[str, str],
    public: bytes | str,
) -> None:
    """Never a success (no request here carries a fresh key with its own public key and the
    caller's own live token): a refusal that names the problem and leaves nothing behind, and
    the caller's import token still live."""
    who = w.callers[caller]
    token_kind = token[1:] if token.startswith("@") else ""
    if isinstance(wrapped, str):
        wrapped = w.blobs[wrapped[1:]]
    if isinstance(public, str):
        public = _unknown_curve() if public.endswith("unknown curve") else w.public_ders[public[1:]]
    req = pb.ImportKeyVersionRequest(
        name=name,
        algorithm=algorithm,
        import_token=w.tokens.get(token_kind, token),
        wrapped_key=wrapped,
        scope=scope,
        labels=key_labels,
        public_key_der=public,
    )
    want = import_expect(w, who, req, token_kind)
    run(w, who, "ImportKeyVersion", req, want)


# --- bytes that are not a request at all, on the raw channel ----------------------------------


_REAL = pb.SignRequest(name=P256, message=GOOD_MESSAGE).SerializeToString()
garbled = st.one_of(
    st.binary(max_size=200),
    st.integers(1, len(_REAL) - 1).map(lambda n: _REAL[:n]),
    st.tuples(st.integers(0, len(_REAL) - 1), st.integers(1, 255)).map(
        lambda t: _REAL[: t[0]] + bytes([_REAL[t[0]] ^ t[1]]) + _REAL[t[0] + 1 :]
    ),
    st.sampled_from(
        [
            b"\x0a\x02\xff\xfe",  # field 1 (a string in most requests): bad UTF-8
            b"\x0a\x03\xed\xa0\x80",  # an encoded surrogate
            b"\x08" + b"\xff" * 10 + b"\x01",  # an overlong varint
            b"\x0a\x7f" + b"a" * 10,  # a length past the end
            b"\x0b" * 200,  # groups nested 200 deep
            b"\x0b" * 50 + b"\x0c" * 50,
            b"\x0d\x00\x00\x00\x00",  # field 1 as fixed32
            b"\x09" + b"\x00" * 8,  # field 1 as fixed64
            b"\x07",  # wire type 7 does not exist
            b"\x00",  # field number 0
            b"\xfa\xff\xff\xff\x0f\x00",  # field number 2^29 - 1 (the largest), empty
            b"\x12\x80\x80\x80\x80\x10",  # a length of 2^32
            b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # version: 2^64 - 1
        ]
    ),
    sized(GRPC_LIMIT + 1, *[0] * 15),
)
"""Byte strings a request parser must refuse, or may parse: random ones, a real request cut
short or with a byte changed, invalid UTF-8 in a string, an overlong varint, a length past the
end, groups nested past the parser's limit, wrong wire types."""


RAW_PATHS = [SERVICE + m for m in sorted(METHODS)] + [
    HEALTH_CHECK,
    SERVICE + "NoSuchMethod",
]
MUTATING = {
    "CreateKey",
    "RotateKey",
    "SetPrimaryVersion",
    "DisableKeyVersion",
    "EnableKeyVersion",
    "ScheduleKeyVersionDestruction",
    "CancelKeyVersionDestruction",
    "GetImportParameters",
    "ImportKeyVersion",
}


@fuzz(300)
@given(
    path=st.sampled_from(RAW_PATHS), caller=st.sampled_from(["me"] * 4 + ["anonymous"]), raw=garbled
)
@example(path=SERVICE + "Sign", caller="me", raw=b"\xff\xff\xff")
@example(path=SERVICE + "CreateKey", caller="me", raw=b"\x0a\x02\xff\xfe")
@example(path=HEALTH_CHECK, caller="anonymous", raw=b"\x0b" * 200)
def test_raw_bytes(w: World, path: str, caller: str, raw: bytes) -> None:
    """Not protobuf, or not this method's: INVALID_ARGUMENT naming the request type (recorded
    like any refusal), never INTERNAL or UNKNOWN."""
    method = path.rsplit("/", 1)[-1]
    who = w.callers[caller]
    service = path.startswith(SERVICE)
    if method in METHODS:
        request_cls = getattr(pb, METHODS[method].input_type.name)
        type_name = request_cls.DESCRIPTOR.full_name
    else:
        request_cls = health_pb2.HealthCheckRequest if not service else None
        type_name = "grpc.health.v1.HealthCheckRequest"
    try:
        parsed = request_cls.FromString(raw) if request_cls is not None else None
    except Exception:  # DecodeError
        parsed = None
        want: Expect | None = expect(IA, f"not a valid {type_name}")
    else:
        # It is a request after all: what it asks for is the other tests' business.
        want = None
    if request_cls is None:
        want = Expect((grpc.StatusCode.UNIMPLEMENTED,))
    out = run(
        w,
        who,
        path,
        raw,
        want,
        raw=True,
        changes=method in MUTATING,
        audited=service and method in METHODS,
    )
    if parsed is not None and out.code is IA:
        assert "not a valid" not in out.details, out.details
