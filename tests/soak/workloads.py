"""The soak's callers: who they are, what each does in a loop, and what each checks.

Every caller is a thread with its own gRPC channel and its own identity:

* signers (``x509:CN=soak-signer-N``, one scope each; and ``uid:`` ones on the local socket):
  Sign (message or digest, primary or an explicit version, every format and padding),
  SignBatch, SignJWT, Verify (a good signature must be valid, a tampered one invalid),
  GetPublicKey, GetKey, GetJWKS, ListKeys;
* readers (``x509:CN=soak-auditor``, read on every scope): GetKey, ListKeys to the last page,
  GetPublicKey of every version, GetJWKS, each answer checked against the others;
* key administrators (``x509:CN=soak-admin-consumer`` and ``-enterprise``, one scope each):
  CreateKey, and on the keys being signed with: RotateKey, SetPrimaryVersion,
  Disable/EnableKeyVersion, Schedule/CancelKeyVersionDestruction (a short waiting period, so
  the reaper destroys versions during the run);
* an importer (``x509:CN=soak-importer``, scope ``imported``): GetImportParameters,
  ImportKeyVersion of EC keys it generates and wraps here (signer.client.build_import_request,
  as the CLI does), then signs with them and checks the signatures against its own copy;
* an intruder (``x509:CN=soak-intruder``, no grant; and calls with no identity at all): every
  answer must be a refusal.

x509 callers call the service's front socket with the identity headers the mTLS front sets
(signer._internal.front), as the front itself does: the soak stands in for nginx, so that it can
have
several certificate identities without TLS in the way. ``uid:`` callers come through the
local socket and its relay, known by SO_PEERCRED.

Every signature answered is verified here (tests.soak.crypto) against the public key of the
version the answer names, fetched once per version and pinned.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import code_pb2

from signer.client import build_import_request
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc
from tests.soak.crypto import (
    PublicKey,
    PublicKeys,
    hash_for,
    jwk_matches,
    load_pem,
    spki,
    verify_jws,
    verify_signature,
)
from tests.soak.ledger import Ledger

SCOPES = ("consumer", "enterprise")
IMPORTED = "imported"
UNAVAILABLE_PAUSE = 0.1  # seconds a caller waits after an UNAVAILABLE
_CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {
    "ec-p256": ec.SECP256R1,
    "ec-p384": ec.SECP384R1,
    "ec-p521": ec.SECP521R1,
}


@dataclass(frozen=True)
class KeyInfo:
    name: str
    algorithm: str
    scope: str


@dataclass(frozen=True)
class Signed:
    """A signature a caller received and verified, kept to send back to Verify."""

    name: str
    version: int
    algorithm: str
    signature: bytes
    message: bytes | None
    digest: bytes | None
    fmt: str
    pad: str


@dataclass
class Settings:
    deadline: float = 60.0  # per call: past it, a call counts as hung (DEADLINE_EXCEEDED)
    create_every: float = 60.0  # seconds between CreateKey calls of each administrator
    import_every: float = 20.0  # seconds between imports
    waiting_period: int = 20  # seconds a scheduled version waits before the reaper destroys it
    live_versions: int = 3  # versions (enabled or disabled) an administrator lets a key keep


@dataclass
class World:
    ledger: Ledger
    settings: Settings
    pubkeys: PublicKeys = field(default_factory=PublicKeys)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: dict[str, KeyInfo] = field(default_factory=dict)
    # Verifications waiting for a public key this caller could not fetch (run at the end).
    pending: list[Callable[[Caller], bool]] = field(default_factory=list)

    def add_key(self, key: KeyInfo) -> None:
        with self.lock:
            self.keys[key.name] = key

    def keys_in(self, scopes: Sequence[str]) -> list[KeyInfo]:
        with self.lock:
            return [k for k in self.keys.values() if k.scope in scopes]

    def key(self, name: str) -> KeyInfo | None:
        with self.lock:
            return self.keys.get(name)

    def later(self, check: Callable[[Caller], bool]) -> None:
        with self.lock:
            self.pending.append(check)

    def pause(self, seconds: float) -> bool:
        """Sleeps; True when the soak is ending."""
        return self.stop.wait(seconds)


class Caller:
    """One identity on one channel. ``call`` counts every answer in the ledger: an OK (and the
    audit record it must have), or an error status, expected if in ``accept`` or UNAVAILABLE
    (whose timing against the token host's restarts is judged afterwards)."""

    def __init__(
        self,
        world: World,
        label: str,
        identity: str,
        channel: grpc.Channel,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.world = world
        self.label = label
        self.identity = identity
        self.channel = channel
        self.metadata = metadata
        self.stub = pb_grpc.SignerServiceStub(channel)
        self.last_answer = time.monotonic()

    def call(self, method: str, request: Any, accept: Sequence[str] = ()) -> Any | None:
        t0 = time.monotonic()
        try:
            response = getattr(self.stub, method)(
                request, metadata=self.metadata, timeout=self.world.settings.deadline
            )
        except grpc.RpcError as exc:
            code = exc.code().name
            took = time.monotonic() - t0
            self.last_answer = time.monotonic()
            expected = code == "UNAVAILABLE" or code in accept
            self.world.ledger.failed(method, code, exc.details() or "", took, expected, self.label)
            if code == "UNAVAILABLE":
                # As a client would: a short pause, not a spin (enough callers still pile up
                # records fast enough to reach the audit log's unsigned bound in an outage).
                self.world.pause(UNAVAILABLE_PAUSE)
            return None
        self.last_answer = time.monotonic()
        self.world.ledger.answered(self.identity, method, request, time.monotonic() - t0)
        return response

    def public_key(self, name: str, version: int) -> tuple[str, PublicKey] | None:
        """The version's public key: pinned, or fetched (and pinned) now; None when it cannot
        be had at the moment."""
        known = self.world.pubkeys.get(name, version)
        if known is not None:
            return known
        req = pb.GetPublicKeyRequest(name=name, version=version, format=pb.PEM)
        resp = self.call("GetPublicKey", req, accept=("FAILED_PRECONDITION",))
        if resp is None:
            return None
        if resp.version != version or resp.name != name:
            self.world.ledger.defect(
                "GetPublicKey answered for another version",
                key=name,
                asked=version,
                got=f"{resp.name}/{resp.version}",
            )
            return None
        key = load_pem(resp.pem)
        self.pin(name, version, resp.algorithm, key)
        return resp.algorithm, key

    def pin(self, name: str, version: int, algorithm: str, key: PublicKey) -> None:
        if not self.world.pubkeys.pin(name, version, algorithm, key):
            self.world.ledger.defect(
                "a version's public key changed", key=name, version=version, caller=self.label
            )

    def check(self, s: Signed, independent: PublicKey | None = None) -> None:
        """Verifies ``s`` against its version's public key (or ``independent``, a key known
        without asking the service); defers it when the key cannot be had now."""
        if independent is not None:
            found: tuple[str, PublicKey] | None = (s.algorithm, independent)
        else:
            found = self.public_key(s.name, s.version)
        if found is None:
            self.world.later(lambda other: _check_later(other, s))
            return
        algorithm, key = found
        if algorithm != s.algorithm:
            self.world.ledger.defect(
                "signature answered with another algorithm than its key's",
                key=s.name,
                version=s.version,
                answered=s.algorithm,
                key_algorithm=algorithm,
            )
        good = verify_signature(
            algorithm,
            key,
            s.signature,
            message=s.message,
            digest=s.digest,
            fmt=s.fmt,
            rsa_padding=s.pad,
        )
        self.world.ledger.signature(
            good,
            caller=self.label,
            key=s.name,
            version=s.version,
            algorithm=algorithm,
            input="message" if s.message is not None else "digest",
            format=s.fmt,
            padding=s.pad,
            signature=s.signature.hex()[:48],
        )


def _check_later(caller: Caller, s: Signed) -> bool:
    found = caller.public_key(s.name, s.version)
    if found is None:
        return False
    caller.check(s)
    return True


# --- requests -----------------------------------------------------------------------------------

_FORMATS = {"der": pb.DER, "raw": pb.RAW, "": pb.SIGNATURE_FORMAT_UNSPECIFIED}
_PADDINGS = {"pss": pb.PSS, "pkcs1v15": pb.PKCS1V15, "": pb.RSA_PADDING_UNSPECIFIED}


def _family(algorithm: str) -> str:
    return algorithm.split("-")[0]  # ec, rsa, ed25519


def _choose_format(rng: random.Random, algorithm: str) -> tuple[str, str]:
    """A signature format and RSA padding the key's family takes (the other one unset)."""
    family = _family(algorithm)
    if family == "ec":
        return rng.choice(("der", "raw", "")), ""
    if family == "rsa":
        return "", rng.choice(("pss", "pkcs1v15", ""))
    return "", ""


def _input(
    rng: random.Random, algorithm: str, message: bytes, digest_share: float = 0.25
) -> tuple[bytes | None, bytes | None]:
    """``message`` as it is, or (not for ed25519) its digest, computed here."""
    if _family(algorithm) == "ed25519" or rng.random() >= digest_share:
        return message, None
    h = hashlib.new(hash_for(algorithm).name, message)
    return None, h.digest()


def _message(caller: Caller, n: int, rng: random.Random) -> bytes:
    size = rng.choice((16, 64, 256, 1024, 4096))
    return f"{caller.label} {n} ".encode() + rng.randbytes(size)


# --- signers ------------------------------------------------------------------------------------

SIGNER_OPS = (
    ("sign", 40),
    ("sign_version", 5),
    ("batch", 8),
    ("jwt", 10),
    ("verify", 12),
    ("verify_tampered", 4),
    ("public_key", 7),
    ("get_key", 7),
    ("jwks", 4),
    ("list", 3),
)


def sign(c: Caller, k: KeyInfo, rng: random.Random, n: int, version: int = 0) -> Signed | None:
    fmt, pad = _choose_format(rng, k.algorithm)
    message, digest = _input(rng, k.algorithm, _message(c, n, rng))
    req = pb.SignRequest(
        name=k.name,
        version=version,
        message=message,
        digest=digest,
        signature_format=_FORMATS[fmt],
        rsa_padding=_PADDINGS[pad],
    )
    # An explicit version may have been disabled or scheduled by an administrator meanwhile.
    resp = c.call("Sign", req, accept=("FAILED_PRECONDITION",) if version else ())
    if resp is None:
        return None
    if version and resp.version != version:
        c.world.ledger.defect(
            "Sign used another version", key=k.name, asked=version, got=resp.version
        )
    s = Signed(
        k.name,
        resp.version,
        resp.algorithm,
        resp.signature,
        message,
        digest,
        fmt or "der",
        pad or "pss",
    )
    c.check(s)
    return s


def sign_batch(c: Caller, k: KeyInfo, rng: random.Random, n: int, version: int = 0) -> None:
    count = rng.choice((1, 7, 50, 51, 120, 260))  # across the service's 50-item chunks
    fmt, pad = _choose_format(rng, k.algorithm)
    inputs = [_input(rng, k.algorithm, _message(c, n * 1000 + i, rng)) for i in range(count)]
    items = [
        pb.SignBatchItem(message=m) if m is not None else pb.SignBatchItem(digest=d)
        for m, d in inputs
    ]
    req = pb.SignBatchRequest(
        name=k.name,
        version=version,
        items=items,
        signature_format=_FORMATS[fmt],
        rsa_padding=_PADDINGS[pad],
    )
    resp = c.call("SignBatch", req, accept=("FAILED_PRECONDITION",) if version else ())
    if resp is None:
        return
    if len(resp.results) != count:
        c.world.ledger.defect(
            "SignBatch answered another number of results",
            key=k.name,
            items=count,
            results=len(resp.results),
        )
    for (m, d), r in zip(inputs, resp.results, strict=False):
        if r.WhichOneof("outcome") == "error":
            # The version's state is read again before each chunk: one disabled meanwhile
            # fails the rest (FAILED_PRECONDITION). Nothing else should fail one item alone.
            code = code_pb2.Code.Name(r.error.code)
            c.world.ledger.count("batch_items", code)
            if r.error.code != code_pb2.FAILED_PRECONDITION:
                c.world.ledger.defect(
                    "SignBatch item failed", key=k.name, code=code, error=r.error.message[:200]
                )
            continue
        c.world.ledger.count("batch_items", "OK")
        c.check(
            Signed(
                k.name, resp.version, resp.algorithm, r.signature, m, d, fmt or "der", pad or "pss"
            )
        )


def sign_jwt(c: Caller, k: KeyInfo, rng: random.Random, n: int) -> None:
    claims = json.dumps(
        {"sub": c.label, "n": n, "jti": rng.randbytes(12).hex(), "iat": int(time.time())}
    ).encode()
    resp = c.call("SignJWT", pb.SignJWTRequest(name=k.name, claims=claims))
    if resp is None:
        return
    found = c.public_key(k.name, resp.version)
    if found is None:

        def later(other: Caller) -> bool:
            got = other.public_key(k.name, resp.version)
            if got is None:
                return False
            _check_jwt(other, k, resp, claims, got[1])
            return True

        c.world.later(later)
        return
    _check_jwt(c, k, resp, claims, found[1])


def _check_jwt(c: Caller, k: KeyInfo, resp: Any, claims: bytes, key: PublicKey) -> None:
    good, header, body = verify_jws(resp.token, k.algorithm, key)
    c.world.ledger.signature(good, caller=c.label, key=k.name, version=resp.version, jwt=True)
    kid = f"{k.name}/{resp.version}"
    if header.get("kid") != kid or resp.kid != kid or body != claims:
        c.world.ledger.defect(
            "JWT header or claims not as asked", key=k.name, kid=resp.kid, header=header
        )


def verify(c: Caller, s: Signed, tampered: bool) -> None:
    signature = s.signature
    if tampered:
        i = len(signature) // 2
        signature = signature[:i] + bytes([signature[i] ^ 0x40]) + signature[i + 1 :]
    req = pb.VerifyRequest(
        name=s.name,
        version=s.version,
        message=s.message,
        digest=s.digest,
        signature=signature,
        signature_format=_FORMATS[s.fmt],
        rsa_padding=_PADDINGS[s.pad],
    )
    # The version may have been disabled, scheduled or destroyed since it signed.
    resp = c.call("Verify", req, accept=("FAILED_PRECONDITION",))
    if resp is None:
        return
    right = resp.valid == (not tampered) and resp.version == s.version
    c.world.ledger.count("verify_answers", "right" if right else "wrong")
    if not right:
        c.world.ledger.defect(
            "Verify answered wrongly",
            key=s.name,
            version=s.version,
            tampered=tampered,
            valid=resp.valid,
        )


def get_public_key(c: Caller, k: KeyInfo, rng: random.Random, recent: deque[Signed]) -> None:
    versions = [s.version for s in recent if s.name == k.name]
    version = rng.choice(versions) if versions and rng.random() < 0.5 else 0
    fmt = rng.choice((pb.PEM, pb.JWK))
    req = pb.GetPublicKeyRequest(name=k.name, version=version, format=fmt)
    resp = c.call("GetPublicKey", req, accept=("FAILED_PRECONDITION",) if version else ())
    if resp is None:
        return
    check_public_key(c, k.name, resp)


def check_public_key(c: Caller, name: str, resp: Any) -> None:
    """A GetPublicKey answer, PEM or JWK, against the version's pinned key."""
    if resp.pem:
        c.pin(name, resp.version, resp.algorithm, load_pem(resp.pem))
        return
    jwk = json.loads(resp.jwk)
    known = c.public_key(name, resp.version)
    if known is None:
        return
    if not jwk_matches(jwk, known[1]) or jwk.get("kid") != f"{name}/{resp.version}":
        c.world.ledger.defect(
            "a JWK is not its version's public key", key=name, version=resp.version
        )


def get_key(c: Caller, name: str) -> Any | None:
    key = c.call("GetKey", pb.GetKeyRequest(name=name))
    if key is None:
        return None
    numbers = [v.version for v in key.versions]
    primary = [v for v in key.versions if v.version == key.primary_version]
    if numbers != sorted(set(numbers)) or len(primary) != 1 or primary[0].state != pb.ENABLED:
        c.world.ledger.defect(
            "GetKey: versions out of order, or a primary not enabled",
            key=name,
            versions=numbers,
            primary=key.primary_version,
        )
    return key


def list_keys(c: Caller, rng: random.Random, scopes: Sequence[str]) -> None:
    """Every page; names strictly ascending; every key known before the listing began and
    visible to the caller is there."""
    before = {k.name for k in c.world.keys_in(scopes)}
    seen: list[str] = []
    token = ""
    for _ in range(1000):
        req = pb.ListKeysRequest(page_size=rng.choice((0, 3, 17, 100)), page_token=token)
        page = c.call("ListKeys", req)
        if page is None:
            return
        seen += [k.name for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    if seen != sorted(set(seen)):
        c.world.ledger.defect("ListKeys out of order or repeated", caller=c.label)
    missing = before - set(seen)
    if missing:
        c.world.ledger.defect("ListKeys left keys out", caller=c.label, missing=sorted(missing)[:5])


def jwks(c: Caller, scope: str) -> None:
    resp = c.call("GetJWKS", pb.GetJWKSRequest(scope=scope))
    if resp is None:
        return
    for jwk in json.loads(resp.jwks).get("keys", []):
        name, _, version = str(jwk.get("kid", "")).rpartition("/")
        if jwk.get("scope") != scope or not version.isdigit():
            c.world.ledger.defect(
                "a JWKS entry of another scope or kid",
                scope=scope,
                kid=jwk.get("kid"),
                jwk_scope=jwk.get("scope"),
            )
            continue
        known = c.public_key(name, int(version))
        if known is not None and not jwk_matches(jwk, known[1]):
            c.world.ledger.defect("a JWKS key is not its version's public key", kid=jwk.get("kid"))


def signer_loop(c: Caller, scopes: Sequence[str], seed: int) -> None:
    rng = random.Random(seed)
    recent: deque[Signed] = deque(maxlen=32)
    ops, weights = zip(*SIGNER_OPS, strict=True)
    n = 0
    while not c.world.stop.is_set():
        n += 1
        keys = c.world.keys_in(scopes)
        k = rng.choice(keys)
        op = rng.choices(ops, weights)[0]
        mine = [s for s in recent if s.name == k.name]
        if op == "sign":
            s = sign(c, k, rng, n)
            if s is not None:
                recent.append(s)
        elif op == "sign_version":
            version = rng.choice(mine).version if mine else 1
            sign(c, k, rng, n, version)
        elif op == "batch":
            version = rng.choice(mine).version if mine and rng.random() < 0.3 else 0
            sign_batch(c, k, rng, n, version)
        elif op == "jwt":
            sign_jwt(c, k, rng, n)
        elif op in ("verify", "verify_tampered") and recent:
            verify(c, rng.choice(recent), tampered=op == "verify_tampered")
        elif op == "public_key":
            get_public_key(c, k, rng, recent)
        elif op == "get_key":
            get_key(c, k.name)
        elif op == "jwks":
            jwks(c, rng.choice(scopes))
        elif op == "list":
            list_keys(c, rng, scopes)


# --- readers ------------------------------------------------------------------------------------


def reader_loop(c: Caller, scopes: Sequence[str], seed: int, pause: float = 0.05) -> None:
    rng = random.Random(seed)
    while not c.world.pause(pause):
        keys = c.world.keys_in(scopes)
        k = rng.choice(keys)
        roll = rng.random()
        if roll < 0.4:
            key = get_key(c, k.name)
            if key is None:
                continue
            for v in key.versions:  # every version's key, in both forms (destroyed: refused)
                fmt = rng.choice((pb.PEM, pb.JWK))
                req = pb.GetPublicKeyRequest(name=k.name, version=v.version, format=fmt)
                resp = c.call("GetPublicKey", req, accept=("FAILED_PRECONDITION",))
                if resp is not None:
                    check_public_key(c, k.name, resp)
        elif roll < 0.7:
            jwks(c, rng.choice(scopes))
        else:
            list_keys(c, rng, scopes)


# --- key administrators -------------------------------------------------------------------------


class _Abort(Exception):
    """An administrator's call was not answered OK (the token host restarting): the episode
    ends, and the next one starts from the key as GetKey shows it."""


def _admin(c: Caller, method: str, request: Any, rng: random.Random) -> Any:
    if c.world.pause(rng.uniform(0.05, 0.3)):
        raise _Abort
    resp = c.call(method, request)
    if resp is None:
        raise _Abort
    return resp


def _expect(c: Caller, what: str, ok: bool, **detail: Any) -> None:
    if not ok:
        c.world.ledger.defect(f"lifecycle: {what}", **detail)


def create_key(
    c: Caller, scope: str, algorithms: Sequence[str], rng: random.Random, n: int
) -> KeyInfo | None:
    algorithm = rng.choice(algorithms)
    name = f"soak-{scope}-{n}-{algorithm}"
    req = pb.CreateKeyRequest(
        name=name, algorithm=algorithm, scope=scope, labels={"soak": "created"}
    )
    key = c.call("CreateKey", req)
    if key is None:
        return None
    _expect(
        c,
        "CreateKey made version 1 primary",
        key.primary_version == 1 and key.scope == scope and key.algorithm == algorithm,
        key=name,
    )
    info = KeyInfo(name, algorithm, scope)
    if c.public_key(name, 1) is None:
        return None  # not signed with until the next GetKey shows it
    c.world.add_key(info)
    return info


def lifecycle(c: Caller, k: KeyInfo, rng: random.Random) -> None:
    """One episode on a key others are signing with: rotate; make the old version primary and
    back; disable, enable; schedule its destruction (and half the time cancel it and enable it
    again); keep the key's live versions bounded by scheduling the oldest."""
    s = c.world.settings
    key = _admin(c, "GetKey", pb.GetKeyRequest(name=k.name), rng)
    old = key.primary_version
    rotated = _admin(c, "RotateKey", pb.RotateKeyRequest(name=k.name), rng)
    new = rotated.primary_version
    _expect(
        c,
        "RotateKey made a new primary",
        new > max(v.version for v in key.versions),
        key=k.name,
        old=old,
        new=new,
    )
    c.public_key(k.name, new)
    got = _admin(c, "SetPrimaryVersion", pb.SetPrimaryVersionRequest(name=k.name, version=old), rng)
    _expect(c, "SetPrimaryVersion", got.primary_version == old, key=k.name, version=old)
    got = _admin(c, "SetPrimaryVersion", pb.SetPrimaryVersionRequest(name=k.name, version=new), rng)
    _expect(c, "SetPrimaryVersion", got.primary_version == new, key=k.name, version=new)
    v = _admin(c, "DisableKeyVersion", pb.KeyVersionRequest(name=k.name, version=old), rng)
    _expect(c, "DisableKeyVersion", v.state == pb.DISABLED, key=k.name, version=old)
    v = _admin(c, "EnableKeyVersion", pb.KeyVersionRequest(name=k.name, version=old), rng)
    _expect(c, "EnableKeyVersion", v.state == pb.ENABLED, key=k.name, version=old)
    req = pb.ScheduleKeyVersionDestructionRequest(
        name=k.name, version=old, waiting_period_seconds=s.waiting_period
    )
    v = _admin(c, "ScheduleKeyVersionDestruction", req, rng)
    _expect(
        c,
        "ScheduleKeyVersionDestruction",
        v.state == pb.DESTRUCTION_SCHEDULED and v.destroy_time.seconds > 0,
        key=k.name,
        version=old,
    )
    if rng.random() < 0.5:
        v = _admin(
            c, "CancelKeyVersionDestruction", pb.KeyVersionRequest(name=k.name, version=old), rng
        )
        _expect(
            c,
            "CancelKeyVersionDestruction leaves it disabled",
            v.state == pb.DISABLED,
            key=k.name,
            version=old,
        )
        v = _admin(c, "EnableKeyVersion", pb.KeyVersionRequest(name=k.name, version=old), rng)
        _expect(c, "EnableKeyVersion", v.state == pb.ENABLED, key=k.name, version=old)
    # Bound the key: the oldest live versions but the newest few are scheduled.
    key = _admin(c, "GetKey", pb.GetKeyRequest(name=k.name), rng)
    live = [
        x.version
        for x in key.versions
        if x.state in (pb.ENABLED, pb.DISABLED) and x.version != key.primary_version
    ]
    for version in sorted(live)[: max(0, len(live) - (s.live_versions - 1))]:
        req = pb.ScheduleKeyVersionDestructionRequest(
            name=k.name, version=version, waiting_period_seconds=s.waiting_period
        )
        _admin(c, "ScheduleKeyVersionDestruction", req, rng)


def admin_loop(c: Caller, scope: str, algorithms: Sequence[str], seed: int) -> None:
    rng = random.Random(seed)
    last_create = -1e9
    n = 0
    while not c.world.stop.is_set():
        try:
            if time.monotonic() - last_create >= c.world.settings.create_every:
                n += 1
                if create_key(c, scope, algorithms, rng, n) is not None:
                    last_create = time.monotonic()
                else:
                    c.world.pause(1.0)
                continue
            lifecycle(c, rng.choice(c.world.keys_in((scope,))), rng)
        except _Abort:
            c.world.pause(1.0)


# --- the importer -------------------------------------------------------------------------------


def import_once(c: Caller, rng: random.Random, n: int, mine: dict[str, KeyInfo]) -> bool:
    params = c.call("GetImportParameters", pb.GetImportParametersRequest())
    if params is None:
        return False
    algorithm = rng.choice(("ec-p256", "ec-p384", "ec-p521"))
    private = ec.generate_private_key(_CURVES[algorithm]())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    same = [k for k in mine.values() if k.algorithm == algorithm]
    fresh = not same or rng.random() < 0.3
    name = f"soak-imported-{n}-{algorithm}" if fresh else rng.choice(same).name
    req = build_import_request(
        name,
        algorithm,
        pem,
        params,
        scope=IMPORTED if fresh else "",
        labels={"soak": "imported"} if fresh else None,
    )
    key = c.call("ImportKeyVersion", req)
    if key is None:
        return False
    info = KeyInfo(name, algorithm, IMPORTED)
    mine[name] = info
    c.world.add_key(info)
    version = key.primary_version
    ours = private.public_key()
    served = c.public_key(name, version)
    if served is not None and spki(served[1]) != spki(ours):
        c.world.ledger.defect(
            "an imported version's public key is not the imported key's", key=name, version=version
        )
    c.pin(name, version, algorithm, ours)
    # Its signatures, checked against the key this caller made (not one the service gave).
    for i in range(3):
        message, digest = _input(rng, algorithm, _message(c, n * 10 + i, rng), 0.5)
        fmt, pad = _choose_format(rng, algorithm)
        resp = c.call(
            "Sign",
            pb.SignRequest(
                name=name,
                version=version,
                message=message,
                digest=digest,
                signature_format=_FORMATS[fmt],
            ),
        )
        if resp is not None:
            c.check(
                Signed(
                    name,
                    resp.version,
                    resp.algorithm,
                    resp.signature,
                    message,
                    digest,
                    fmt or "der",
                    pad or "pss",
                ),
                independent=ours,
            )
    return True


def importer_loop(c: Caller, seed: int) -> None:
    rng = random.Random(seed)
    mine: dict[str, KeyInfo] = {}
    n = 0
    next_import = 0.0
    while not c.world.stop.is_set():
        if time.monotonic() >= next_import:
            n += 1
            if import_once(c, rng, n, mine):
                next_import = time.monotonic() + c.world.settings.import_every
            elif c.world.pause(1.0):
                return
            continue
        if not mine or c.world.pause(0.2):
            continue
        k = rng.choice(list(mine.values()))
        if rng.random() < 0.5:
            sign_jwt(c, k, rng, n)
        else:
            sign_batch(c, k, rng, n)


# --- the intruder -------------------------------------------------------------------------------


def intruder_loop(c: Caller, anonymous: Caller, seed: int) -> None:
    """Refusals only, slowly (under the refusal throttle's budget of 50 a minute)."""
    rng = random.Random(seed)
    n = 0
    while not c.world.pause(rng.uniform(2.0, 4.0)):
        n += 1
        k = rng.choice(c.world.keys_in((*SCOPES, IMPORTED)))
        refused = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED")
        if n % 4 == 0:
            got = anonymous.call("ListKeys", pb.ListKeysRequest(), accept=("UNAUTHENTICATED",))
        elif n % 4 == 1:
            got = c.call("RotateKey", pb.RotateKeyRequest(name=k.name), accept=refused)
        else:
            req = pb.SignRequest(name=k.name, message=b"not mine to sign")
            got = c.call("Sign", req, accept=refused)
        if got is not None:
            c.world.ledger.defect("a caller with no grant was answered OK", key=k.name, n=n)
