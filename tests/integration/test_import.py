"""Wrapped key import (BYOK) and token-host provisioning, against the real token host.

The caller wraps under a wrapping key generated in the token; only the token unwraps. Every
rejection is checked twice from outside the service: the token's objects are counted over a
connection of the test's own (``own_session``), and the metadata store is asked for the key.
Generating the RSA-4096 wrapping key takes about a second, so each test asks for at most two
import tokens, and reuses them.
"""

from __future__ import annotations

import os
import secrets
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pkcs11 import Attribute, ObjectClass

from signer import wrapping
from signer._internal import hsm
from signer._internal.config import SOFTHSM_MODULE, TokenConfig
from signer.client import build_import_request
from signer.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from signer.v1 import signer_pb2 as pb
from tests.conftest import (
    SIGNER_BIN,
    RunningService,
    ServiceFactory,
    TokenHostHandle,
    UniqueName,
    wait_until,
    write_toml,
)
from tests.integration.token_probe import count_objects

pytestmark = pytest.mark.integration

MESSAGE = b"imported, never seen by the service"
CURVES = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1(), "ec-p521": ec.SECP521R1()}
HASHES = {"ec-p256": hashes.SHA256(), "ec-p384": hashes.SHA384(), "ec-p521": hashes.SHA512()}


# --- helpers ------------------------------------------------------------------------------------


def pem(key: PrivateKeyTypes) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def ec_key(alg: str = "ec-p256") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVES[alg])


def scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    width = (key.curve.key_size + 7) // 8
    return key.private_numbers().private_value.to_bytes(width, "big")


def verifies_ec(key: ec.EllipticCurvePrivateKey, alg: str, signature: bytes) -> bool:
    """Checks a DER signature over MESSAGE with the ORIGINAL key's public half."""
    try:
        key.public_key().verify(signature, MESSAGE, ec.ECDSA(HASHES[alg]))
    except Exception:
        return False
    return True


def count(session: Any) -> int:
    """Every object in the token, by the test's own connection."""
    return len(list(session.get_objects({})))


def assert_rejected(
    service: RunningService,
    own_session: Any,
    name: str,
    call: Callable[[], Any],
    error: type[Exception],
    *fragments: str,
) -> str:
    """``call`` fails with ``error`` naming the problem, and leaves nothing anywhere."""
    before = count(own_session)
    with pytest.raises(error) as exc:
        call()
    message = str(exc.value)
    for fragment in fragments:
        assert fragment in message, message
    assert count(own_session) == before, f"an object was left in the token: {message}"
    with pytest.raises(NotFound):
        service.server.store.get_key(name)
    return message


def request(
    params: pb.ImportParameters, name: str, alg: str, key: Any, **fields: Any
) -> pb.ImportKeyVersionRequest:
    req = build_import_request(name, alg, pem(key), params)
    for field, value in fields.items():
        setattr(req, field, value)
    return req


# --- import parameters --------------------------------------------------------------------------


def test_import_parameters_and_the_wrapping_key_in_the_token(
    service: RunningService, own_session: pkcs11.Session
) -> None:
    client = service.client()
    params = client.get_import_parameters()

    assert params.wrapping_algorithm == "RSA-OAEP-SHA1"
    assert params.two_step_wrapping_algorithm == ""  # p11-kit 0.24.1 carries no AES key wrap
    assert list(params.supported_algorithms) == ["ec-p256", "ec-p384", "ec-p521"]
    assert params.expire_time.ToDatetime(tzinfo=service.clock.now.tzinfo) == (
        service.clock.now + timedelta(days=1)
    )
    assert len(params.import_token) >= 40
    public = serialization.load_pem_public_key(params.wrapping_public_key_pem.encode())
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 4096

    # The wrapping key pair is in the token; its private half only unwraps, and stays there.
    record = service.server.store.get_import_token(params.import_token)
    priv = own_session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=record.key_id)
    flags = [
        Attribute.TOKEN,
        Attribute.PRIVATE,
        Attribute.SENSITIVE,
        Attribute.ALWAYS_SENSITIVE,
        Attribute.NEVER_EXTRACTABLE,
        Attribute.EXTRACTABLE,
        Attribute.UNWRAP,
        Attribute.SIGN,
        Attribute.DECRYPT,
        Attribute.DERIVE,
    ]
    assert {a: priv[a] for a in flags} == {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.ALWAYS_SENSITIVE: True,
        Attribute.NEVER_EXTRACTABLE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.UNWRAP: True,
        Attribute.SIGN: False,
        Attribute.DECRYPT: False,
        Attribute.DERIVE: False,
    }
    with pytest.raises(p11e.AttributeSensitive):
        priv[Attribute.PRIVATE_EXPONENT]
    pub = own_session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=record.key_id)
    assert int.from_bytes(pub[Attribute.MODULUS], "big") == public.public_numbers().n


def test_expired_import_tokens_lose_their_wrapping_key_to_the_reaper(
    service: RunningService, own_session: pkcs11.Session
) -> None:
    client = service.client()
    params = client.get_import_parameters()
    record = service.server.store.get_import_token(params.import_token)
    assert len(list(own_session.get_objects({Attribute.ID: record.key_id}))) == 2

    service.clock.advance(hours=23)
    service.blocking(service.server.keyring.reap)
    assert len(list(own_session.get_objects({Attribute.ID: record.key_id}))) == 2
    service.clock.advance(hours=1)
    service.blocking(service.server.keyring.reap)
    assert list(own_session.get_objects({Attribute.ID: record.key_id})) == []
    assert service.server.store.get_import_token(params.import_token).destroyed


def test_a_caller_asking_again_gets_its_live_import_token_not_a_new_key_pair(
    service: RunningService, own_session: pkcs11.Session
) -> None:
    """The red team looped GetImportParameters from four threads: 16 RSA-4096 pairs were left in
    the token. A caller's unused token is given back; one pair is made."""
    client = service.client()
    before = len(list(own_session.get_objects({Attribute.LABEL: "signer/import-wrapping"})))
    with ThreadPoolExecutor(4) as pool:
        tokens = {
            p.import_token for p in pool.map(lambda _: client.get_import_parameters(), range(16))
        }
    assert len(tokens) == 1
    after = len(list(own_session.get_objects({Attribute.LABEL: "signer/import-wrapping"})))
    assert after - before == 2  # one pair: its public and its private half


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (p11-kit server's p11-kit-remote, one for each
    connection)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def test_wrapping_key_generation_does_not_hold_up_signatures(
    service_factory: ServiceFactory, token_host: TokenHostHandle, unique_name: UniqueName
) -> None:
    """Slow token work has a connection of its own: with the token host's process for that
    connection frozen (SIGSTOP) in the middle of an RSA-4096 generation, signatures go on.
    Through one shared connection they all waited for the generation (1 s and more each)."""
    host_pid = token_host.host.pid
    assert host_pid is not None
    before = _children(host_pid)
    svc = service_factory()
    new = sorted(_children(host_pid) - before)
    assert len(new) == 2, f"expected a signing and an administrative connection, got {new}"
    admin_remote = new[-1]  # the service connects it second
    client = svc.client(timeout=20)
    name = unique_name()
    client.create_key(name, "ec-p256")
    with ThreadPoolExecutor(1) as pool:
        os.kill(admin_remote, signal.SIGSTOP)
        try:
            pending = pool.submit(client.get_import_parameters)
            signed = [client.sign(name, message=b"%d" % i) for i in range(20)]
            assert not pending.done()  # its generation is frozen in the token host
        finally:
            os.kill(admin_remote, signal.SIGCONT)
        assert pending.result(timeout=60).import_token
    assert len(signed) == 20


# --- round trips --------------------------------------------------------------------------------
# --- round trips --------------------------------------------------------------------------------


def test_ec_keys_import_and_sign_verifiably_with_the_original_key(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    for alg in CURVES:  # an import token each: they are single-use
        name = unique_name(alg)
        original = ec_key(alg)
        key = client.import_key(name, alg, pem(original), scope="byok", labels={"from": "test"})
        assert (key.name, key.algorithm, key.primary_version) == (name, alg, 1)
        assert (key.scope, dict(key.labels)) == ("byok", {"from": "test"})
        assert [(v.version, v.state) for v in key.versions] == [(1, pb.ENABLED)]

        # The service's public key is the original's ...
        published = serialization.load_pem_public_key(client.public_key(name).pem.encode())
        assert published.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == wrapping.public_der(original)
        # ... and the token signs with the original private key.
        sig = client.sign(name, message=MESSAGE)
        assert verifies_ec(original, alg, sig.signature)
        raw = client.sign(name, message=MESSAGE, signature_format="raw").signature
        half = len(raw) // 2
        der = utils.encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )
        assert verifies_ec(original, alg, der)
        assert client.verify(name, sig.signature, message=MESSAGE)


def test_import_as_a_new_version_becomes_primary(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    name = unique_name()
    client.create_key(name, "ec-p256", scope="team")
    old_sig = client.sign(name, message=MESSAGE).signature
    params = client.get_import_parameters()

    first, second = ec_key(), ec_key()
    key = client.import_key(name, "ec-p256", pem(first), params=params)
    assert key.primary_version == 2
    assert [(v.version, v.state) for v in key.versions] == [(1, pb.ENABLED), (2, pb.ENABLED)]
    assert key.scope == "team"
    sig = client.sign(name, message=MESSAGE)
    assert sig.version == 2
    assert verifies_ec(first, "ec-p256", sig.signature)
    # The generated version 1 still signs and verifies.
    v1 = client.sign(name, message=MESSAGE, version=1)
    assert v1.version == 1
    assert not verifies_ec(first, "ec-p256", v1.signature)
    assert client.verify(name, v1.signature, message=MESSAGE, version=1)
    assert client.verify(name, old_sig, message=MESSAGE, version=1)

    # The algorithm may be left out for an existing key (it is the key's) ...
    params = client.get_import_parameters()  # the first was used up
    key = client.import_key_version(request(params, name, "", second))
    assert key.primary_version == 3
    assert verifies_ec(second, "ec-p256", client.sign(name, message=MESSAGE).signature)
    # ... but not contradict it, nor the key's scope (checked before the import token is).
    with pytest.raises(InvalidArgument, match="is ec-p256; a version imported into it must be"):
        client.import_key(name, "ec-p384", pem(ec_key("ec-p384")), params=params)
    with pytest.raises(InvalidArgument, match="scope is fixed at creation"):
        client.import_key(name, "ec-p256", pem(ec_key()), scope="other", params=params)
    assert client.get_key(name).primary_version == 3


def test_imported_private_key_objects_are_sensitive_and_never_extractable(
    service: RunningService, own_session: pkcs11.Session, unique_name: UniqueName
) -> None:
    client = service.client()
    name = unique_name()
    client.import_key(name, "ec-p384", pem(ec_key("ec-p384")))
    kid = service.server.store.get_key(name).versions[0].key_id

    objs = list(own_session.get_objects({Attribute.ID: kid}))
    assert [o.object_class for o in objs] == [ObjectClass.PRIVATE_KEY]  # no public object
    priv = objs[0]
    flags = [
        Attribute.TOKEN,
        Attribute.PRIVATE,
        Attribute.SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.SIGN,
        Attribute.DECRYPT,
        Attribute.UNWRAP,
        Attribute.DERIVE,
        Attribute.ALWAYS_SENSITIVE,
        Attribute.NEVER_EXTRACTABLE,
        Attribute.LOCAL,
    ]
    assert {a: priv[a] for a in flags} == {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
        # Honest: the key existed outside the token before, so the token does not claim these.
        Attribute.ALWAYS_SENSITIVE: False,
        Attribute.NEVER_EXTRACTABLE: False,
        Attribute.LOCAL: False,
    }
    assert priv[Attribute.LABEL] == f"{name}/v1"
    with pytest.raises(p11e.AttributeSensitive):
        priv[Attribute.VALUE]
    with pytest.raises(p11e.AttributeReadOnly):
        priv[Attribute.EXTRACTABLE] = True
    with pytest.raises(p11e.AttributeReadOnly):
        priv[Attribute.SENSITIVE] = False


def test_request_carries_no_plaintext_key(
    service: RunningService, unique_name: UniqueName, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = service.client()
    params = client.get_import_parameters()
    sent: list[bytes] = []
    real_call = client._call

    def spy(method: str, req: Any) -> Any:
        sent.append(req.SerializeToString())
        return real_call(method, req)

    monkeypatch.setattr(client, "_call", spy)
    original = ec_key("ec-p521")
    client.import_key(unique_name(), "ec-p521", pem(original), params=params)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(FailedPrecondition):
        client.import_key(unique_name(), "rsa-2048", pem(rsa_key), params=params)

    assert len(sent) == 2
    ec_secret = scalar(original)
    ec_pkcs8 = wrapping.pkcs8_der(original)
    d = rsa_key.private_numbers().d
    rsa_secrets = [
        d.to_bytes((d.bit_length() + 7) // 8, "big"),
        rsa_key.private_numbers().p.to_bytes(128, "big"),
        wrapping.pkcs8_der(rsa_key)[:64],
    ]
    for needle in (ec_secret, ec_pkcs8, pem(original), *rsa_secrets):
        assert not any(needle in blob for blob in sent)
    # What was sent is the blob and the public key.
    req = pb.ImportKeyVersionRequest.FromString(sent[0])
    assert len(req.wrapped_key) == 512
    assert req.public_key_der == wrapping.public_der(original)


# --- what the module cannot import --------------------------------------------------------------


def test_rsa_and_ed25519_import_are_failed_precondition_through_p11kit(
    service: RunningService, own_session: pkcs11.Session, unique_name: UniqueName
) -> None:
    client = service.client()
    params = client.get_import_parameters()
    assert "rsa-2048" not in params.supported_algorithms
    name = unique_name()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = assert_rejected(
        service,
        own_session,
        name,
        lambda: client.import_key(name, "rsa-2048", pem(rsa_key), params=params),
        FailedPrecondition,
        "CKM_RSA_AES_KEY_WRAP",
        "CKM_AES_KEY_WRAP_PAD",
        "p11-kit-client.so",
        "offers neither",
    )
    assert "rsa-2048" in message
    ed = ed25519.Ed25519PrivateKey.generate()
    assert_rejected(
        service,
        own_session,
        name,
        lambda: client.import_key(name, "ed25519", pem(ed), params=params),
        FailedPrecondition,
        "importing ed25519 keys is not available",
        "CKM_EDDSA",
    )


# --- rejected imports leave nothing -------------------------------------------------------------


def test_corrupt_and_foreign_blobs_are_invalid_argument(
    service: RunningService, own_session: pkcs11.Session, unique_name: UniqueName
) -> None:
    client = service.client()
    first = client.get_import_parameters()
    assert client.get_import_parameters().import_token == first.import_token  # given back
    service.clock.advance(hours=12, seconds=1)  # under half its life left: a new one
    second = client.get_import_parameters()
    assert second.import_token != first.import_token
    name = unique_name()
    key = ec_key()
    good = request(first, name, "ec-p256", key)

    def reject(req: pb.ImportKeyVersionRequest, *fragments: str) -> None:
        assert_rejected(
            service,
            own_session,
            name,
            lambda: client.import_key_version(req),
            InvalidArgument,
            *fragments,
        )

    unwrap_failed = "the token could not unwrap wrapped_key"
    reject(request(first, name, "ec-p256", key, wrapped_key=os.urandom(512)), unwrap_failed)
    flipped = bytearray(good.wrapped_key)
    flipped[100] ^= 0x01
    reject(request(first, name, "ec-p256", key, wrapped_key=bytes(flipped)), unwrap_failed)
    reject(
        request(first, name, "ec-p256", key, wrapped_key=good.wrapped_key[:300]),
        "wrapped_key is 300 bytes",
        "exactly 512",
    )
    reject(
        request(first, name, "ec-p256", key, wrapped_key=good.wrapped_key + bytes(40)),
        "wrapped_key is 552 bytes",
        "no two-step scheme",
    )
    # Wrapped for the first import token's key, sent with the second's.
    reject(request(first, name, "ec-p256", key, import_token=second.import_token), unwrap_failed)
    # Valid OAEP of something that is not a PKCS#8 key.
    public = wrapping.load_wrapping_key(first.wrapping_public_key_pem)
    not_a_key = public.encrypt(b"not a PKCS#8 private key", wrapping.oaep_sha1())
    reject(request(first, name, "ec-p256", key, wrapped_key=not_a_key), unwrap_failed)
    reject(request(first, name, "ec-p256", key, wrapped_key=b""), "wrapped_key is empty")

    # And the genuine request still works with either token's own blob.
    assert client.import_key_version(good).primary_version == 1


def test_wrong_algorithm_and_wrong_public_key_are_invalid_argument(
    service: RunningService, own_session: pkcs11.Session, unique_name: UniqueName
) -> None:
    client = service.client()
    params = client.get_import_parameters()
    name = unique_name()
    p384 = ec_key("ec-p384")

    # The caller's way: a P-384 key imported as ec-p256. The token's object says P-384.
    assert_rejected(
        service,
        own_session,
        name,
        lambda: client.import_key(name, "ec-p256", pem(p384), params=params),
        InvalidArgument,
        "wrapped key is a P-384 key, not ec-p256",
    )
    # A P-256 key with a P-256 public key that is not its own: the challenge does not verify.
    other = wrapping.public_der(ec_key())
    assert_rejected(
        service,
        own_session,
        name,
        lambda: client.import_key_version(
            request(params, name, "ec-p256", ec_key(), public_key_der=other)
        ),
        InvalidArgument,
        "public_key_der does not match the wrapped key",
    )
    # A public key of the wrong curve.
    assert_rejected(
        service,
        own_session,
        name,
        lambda: client.import_key_version(
            request(params, name, "ec-p256", ec_key(), public_key_der=wrapping.public_der(p384))
        ),
        InvalidArgument,
        "public_key_der is a P-384 key, not ec-p256",
    )
    # SoftHSM2 gives an unwrapped EC key no CKA_EC_POINT: without the public key, no import.
    assert_rejected(
        service,
        own_session,
        name,
        lambda: client.import_key_version(
            request(params, name, "ec-p256", ec_key(), public_key_der=b"")
        ),
        InvalidArgument,
        "public_key_der is required",
    )
    assert_rejected(
        service,
        own_session,
        name,
        lambda: client.import_key_version(
            request(params, name, "ec-p256", ec_key(), public_key_der=b"\x30\x03junk")
        ),
        InvalidArgument,
        "public_key_der is not a DER SubjectPublicKeyInfo",
    )
    assert_rejected(
        service,
        own_session,
        name,
        lambda: client.import_key_version(request(params, name, "", ec_key())),
        InvalidArgument,
        "algorithm is required",
    )


def _has_audit_key(path: str) -> bool:
    with sqlite3.connect(path) as db:
        row: tuple[int] | None = db.execute("SELECT COUNT(*) FROM audit_key").fetchone()
    return row == (1,)


def test_unknown_and_expired_import_tokens(
    service_factory: ServiceFactory, own_session: pkcs11.Session, unique_name: UniqueName
) -> None:
    # Checkpoints from the first call: the audit key pair is made in the token then, not while
    # the rejections below count the token's objects (two days on, a checkpoint is due at once).
    service = service_factory(audit={"checkpoint_every": 1})
    client = service.client()
    name = unique_name()
    key = ec_key()
    params = client.get_import_parameters()
    assert wait_until(lambda: _has_audit_key(service.server.cfg.audit.path))
    req = request(params, name, "ec-p256", key)

    for token, fragment in (
        (secrets.token_urlsafe(32), "import_token is unknown"),
        ("", "import_token is missing or malformed"),
        ("not a token!", "import_token is missing or malformed"),
    ):
        bad = request(params, name, "ec-p256", key, import_token=token)
        assert_rejected(
            service,
            own_session,
            name,
            partial(client.import_key_version, bad),
            InvalidArgument,
            fragment,
        )

    service.clock.advance(days=2)
    assert_rejected(
        service,
        own_session,
        name,
        lambda: client.import_key_version(req),
        FailedPrecondition,
        "import_token expired at",
        "GetImportParameters",
    )
    # Still "expired", not "unknown", once the reaper has destroyed the wrapping key.
    service.blocking(service.server.keyring.reap)
    assert_rejected(
        service,
        own_session,
        name,
        lambda: client.import_key_version(req),
        FailedPrecondition,
        "import_token expired at",
    )


# --- the command line ---------------------------------------------------------------------------


def test_keys_import_cli_round_trip(
    service: RunningService, unique_name: UniqueName, tmp_path: Path
) -> None:
    name = unique_name("cli")
    original = ec_key("ec-p384")
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem(original))
    (tmp_path / "msg").write_bytes(MESSAGE)

    def signer(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SIGNER_BIN), *args, "--address", service.address],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = signer(
        "keys",
        "import",
        name,
        "--algorithm",
        "ec-p384",
        "--in",
        "key.pem",
        "--scope",
        "cli",
        "--label",
        "origin=byok",
    )
    assert r.returncode == 0, r.stderr
    assert '"primary_version": 1' in r.stdout
    assert '"scope": "cli"' in r.stdout
    r = signer("sign", name, "--in", "msg", "--out", "msg.sig")
    assert r.returncode == 0, r.stderr
    assert verifies_ec(original, "ec-p384", (tmp_path / "msg.sig").read_bytes())

    r = signer("keys", "import", name, "--algorithm", "ec-p256", "--in", "key.pem")
    assert r.returncode == 2
    assert "error: INVALID_ARGUMENT:" in r.stderr


# --- provisioning at the token host, and adoption -----------------------------------------------


@pytest.fixture
def recorded_popen(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records the argv and environment :func:`signer._internal.hsm.provision_key` gives its
    child."""
    calls: list[dict[str, Any]] = []
    real = subprocess.Popen

    def popen(argv: Any, *args: Any, **kwargs: Any) -> Any:
        proc = real(argv, *args, **kwargs)
        calls.append({"argv": list(argv), "env": dict(kwargs.get("env") or {}), "pid": proc.pid})
        return proc

    monkeypatch.setattr("signer._internal.hsm.subprocess.Popen", popen)
    return calls


@pytest.mark.parametrize(
    ("alg", "make"),
    [
        ("ec-p256", lambda: ec.generate_private_key(ec.SECP256R1())),
        ("rsa-2048", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ],
)
def test_provision_key_with_softhsm2_util_on_a_pty_then_adopt(
    token_host: TokenHostHandle,
    service: RunningService,
    own_session: pkcs11.Session,
    recorded_popen: list[dict[str, Any]],
    unique_name: UniqueName,
    alg: str,
    make: Callable[[], ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey],
) -> None:
    original = make()
    key_id = secrets.token_bytes(16)
    hsm.provision_key(token_host.root, pem(original), "admin-provisioned", key_id)

    # The PIN was on neither the child's argv nor its environment.
    (call,) = recorded_popen
    pin = token_host.paths.user_pin.read_bytes().strip()
    assert call["argv"][:2] == ["softhsm2-util", "--import"]
    assert "--pin" not in call["argv"]
    assert not any(pin in arg.encode() for arg in call["argv"])
    assert not any(pin in f"{k}={v}".encode() for k, v in call["env"].items())
    assert set(call["env"]) == {"PATH", "SOFTHSM2_CONF"}
    # The temporary PKCS#8 file and its directory are gone.
    assert not list(token_host.root.glob(".provision-*"))
    assert not Path(call["argv"][2]).exists()

    # What softhsm2-util made of it (reported, not patched).
    priv = own_session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
    assert {
        a: priv[a]
        for a in (
            Attribute.TOKEN,
            Attribute.PRIVATE,
            Attribute.SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.SIGN,
        )
    } == {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
    }
    rsa_extra = alg.startswith("rsa")  # softhsm2-util also lets an RSA key decrypt and unwrap
    assert (priv[Attribute.DECRYPT], priv[Attribute.UNWRAP]) == (rsa_extra, rsa_extra)
    assert (priv[Attribute.ALWAYS_SENSITIVE], priv[Attribute.NEVER_EXTRACTABLE]) == (False, False)

    # Adopted, it signs through the service, verifiably with the original key.
    name = unique_name(alg)
    key = service.blocking(lambda: service.server.keyring.adopt_key(name, alg, key_id, "admin"))
    assert (key.name, key.algorithm, key.primary, key.scope) == (name, alg, 1, "admin")
    assert key.versions[0].key_id == key_id
    client = service.client()
    sig = client.sign(name, message=MESSAGE).signature
    if isinstance(original, ec.EllipticCurvePrivateKey):
        assert verifies_ec(original, alg, sig)
    else:
        original.public_key().verify(
            sig,
            MESSAGE,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            hashes.SHA256(),
        )
    assert client.public_key(name).pem.encode() == original.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Adoption tightened what it could and relabelled the pair NAME/v1.
    priv = own_session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
    assert (priv[Attribute.DECRYPT], priv[Attribute.UNWRAP], priv[Attribute.DERIVE]) == (
        False,
        False,
        False,
    )
    assert priv[Attribute.LABEL] == f"{name}/v1"
    pub = own_session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=key_id)
    assert pub[Attribute.LABEL] == f"{name}/v1"

    # Adopting again, or the wrong thing, is refused and destroys nothing.
    signer = service.server.keyring
    with pytest.raises(AlreadyExists):
        service.blocking(lambda: signer.adopt_key(name, alg, key_id))
    other = "ec-p384" if alg.startswith("ec") else "rsa-3072"
    with pytest.raises(InvalidArgument, match=f"is an? (P-256|RSA-2048) key, not {other}"):
        service.blocking(lambda: signer.adopt_key(unique_name(), other, key_id))
    with pytest.raises(NotFound, match="no private key object with id"):
        service.blocking(lambda: signer.adopt_key(unique_name(), alg, secrets.token_bytes(16)))
    with pytest.raises(AlreadyExists, match="another key version already has this token object"):
        service.blocking(lambda: signer.adopt_key(unique_name(), alg, key_id))
    assert len(list(own_session.get_objects({Attribute.ID: key_id}))) == 2
    assert priv[Attribute.LABEL] == f"{name}/v1"


def test_provision_key_refuses_garbage_and_reports_the_tools_error(
    token_host: TokenHostHandle, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument, match="not a PEM private key"):
        hsm.provision_key(token_host.root, b"-----BEGIN NOTHING-----", "x", b"\x01")
    with pytest.raises(FailedPrecondition, match="no token in"):
        hsm.provision_key(tmp_path, pem(ec_key()), "x", b"\x01")
    # softhsm2-util refuses a second key pair with an existing CKA_ID (without --force).
    key_id = secrets.token_bytes(8)
    hsm.provision_key(token_host.root, pem(ec_key()), "first", key_id)
    with pytest.raises(FailedPrecondition, match=r"softhsm2-util --import failed \(exit status"):
        hsm.provision_key(token_host.root, pem(ec_key()), "second", key_id)
    assert not list(token_host.root.glob(".provision-*"))


def test_hsm_import_key_and_keys_adopt_cli(
    token_host: TokenHostHandle, service: RunningService, unique_name: UniqueName, tmp_path: Path
) -> None:
    original = ec_key("ec-p521")
    (tmp_path / "key.pem").write_bytes(pem(original))
    key_id = secrets.token_bytes(16)
    r = subprocess.run(
        [
            str(SIGNER_BIN),
            "hsm",
            "import-key",
            "--dir",
            str(token_host.root),
            "--in",
            "key.pem",
            "--label",
            "cli-provisioned",
            "--id",
            key_id.hex(),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    assert key_id.hex() in r.stdout

    name = unique_name("adopted")
    config = write_toml(tmp_path / "signer.toml", service.server.cfg)
    r = subprocess.run(
        [
            str(SIGNER_BIN),
            "keys",
            "adopt",
            name,
            "--algorithm",
            "ec-p521",
            "--id",
            key_id.hex(),
            "--config",
            str(config),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    sig = service.client().sign(name, message=MESSAGE)
    assert verifies_ec(original, "ec-p521", sig.signature)


# --- the two-step scheme, where the module offers it (in-process SoftHSM2) ----------------------


@pytest.fixture
def inprocess_service(
    service_factory: ServiceFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> RunningService:
    """THE TOKEN IS IN THIS PROCESS: SoftHSM2 loaded directly, because Debian's p11-kit 0.24.1
    does not carry CKM_AES_KEY_WRAP_PAD. Production uses a module that carries it."""
    paths = hsm.init(tmp_path / "hsm-inprocess")
    monkeypatch.setenv("SOFTHSM2_CONF", str(paths.conf))
    token = TokenConfig(
        module=SOFTHSM_MODULE, uri="pkcs11:token=signer", pin_file=str(paths.user_pin)
    )
    return service_factory(token=token)


@pytest.mark.inprocess
def test_rsa_import_in_two_steps_where_the_module_offers_it(
    inprocess_service: RunningService, unique_name: UniqueName
) -> None:
    svc = inprocess_service
    client = svc.client()
    params = client.get_import_parameters()
    assert params.two_step_wrapping_algorithm == wrapping.TWO_STEP
    assert {"rsa-2048", "rsa-3072", "rsa-4096", "ec-p256"} <= set(params.supported_algorithms)

    def objects() -> int:
        return int(svc.blocking(lambda: count_objects(svc.server.token)))

    before = objects()
    original = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = unique_name()
    req = build_import_request(name, "rsa-2048", pem(original), params)
    assert len(req.wrapped_key) > 512  # the OAEP block, then the RFC 5649 wrap
    key = client.import_key_version(req)
    assert (key.algorithm, key.primary_version) == ("rsa-2048", 1)
    # The private key is new; the AES transport key and the used wrapping key pair are gone.
    assert objects() == before + 1 - 2
    params = client.get_import_parameters()
    before = objects()

    pss = client.sign(name, message=MESSAGE).signature
    original.public_key().verify(
        pss,
        MESSAGE,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )
    v15 = client.sign(name, message=MESSAGE, rsa_padding="pkcs1v15").signature
    original.public_key().verify(v15, MESSAGE, padding.PKCS1v15(), hashes.SHA256())

    # A corrupt second step, and a 3072-bit key declared as rsa-2048: nothing left behind.
    other = unique_name()
    bad = build_import_request(other, "rsa-2048", pem(original), params)
    tail = bytearray(bad.wrapped_key)
    tail[-5] ^= 0x40
    bad.wrapped_key = bytes(tail)
    with pytest.raises(InvalidArgument, match="the token could not unwrap wrapped_key"):
        client.import_key_version(bad)
    big = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    with pytest.raises(InvalidArgument, match="wrapped key is an RSA-3072 key, not rsa-2048"):
        client.import_key(other, "rsa-2048", pem(big), params=params)
    assert objects() == before
    with pytest.raises(NotFound):
        svc.server.store.get_key(other)
