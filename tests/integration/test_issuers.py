"""Issuers over HTTPS (README "Issuers over HTTPS"): the service publishes each issuer's JWKS and
OpenID configuration, the real front serves them without a client certificate, and standard
verifiers with no code of ours (PyJWT's PyJWKClient, Node's jose), each given only the
enterprise issuer's URL, accept enterprise tokens and reject consumer ones.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Generator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from signer import jose
from signer._internal.pki import DevCA
from signer.client import SignerClient
from signer.errors import FailedPrecondition, InvalidArgument
from tests.conftest import (
    FakeClock,
    ServiceFactory,
    TokenHostHandle,
    UniqueName,
    free_port,
    need_tool,
    wait_until,
)
from tests.integration.fronts import Deployment, deploy

pytestmark = pytest.mark.integration

NODE_VERIFIER = Path(__file__).parents[1] / "node" / "verify.mjs"
AUDIENCE = "portal"


class Issuers:
    """A deployment with two issuers, enterprise and consumer, on the front's issuers port."""

    def __init__(self, deployment: Deployment, port: int, root: Path) -> None:
        self.deployment = deployment
        self.base = f"https://localhost:{port}"
        self.root = root
        self.ssl = ssl.create_default_context(cafile=str(deployment.pki.cert))

    def issuer(self, scope: str) -> str:
        return f"{self.base}/{scope}"

    def get(self, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, headers=headers)
        return self.request(req)

    def request(self, req: urllib.request.Request) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=10) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def jwks(self, scope: str) -> dict[str, Any]:
        status, _, body = self.get(f"/{scope}/jwks.json")
        assert status == 200
        result: dict[str, Any] = json.loads(body)
        return result

    def kids(self, scope: str) -> set[str]:
        return {k["kid"] for k in self.jwks(scope)["keys"]}

    def published(self, scope: str, kids: set[str]) -> bool:
        """Whether ``scope``'s JWKS holds ``kids`` and its discovery document, written after
        it, names their algorithm (a verifier made earlier would be told of none)."""
        status, _, body = self.get(f"/{scope}/.well-known/openid-configuration")
        algs = json.loads(body)["id_token_signing_alg_values_supported"] if status == 200 else []
        return self.kids(scope) == kids and algs == ["ES256"]

    def client(self) -> SignerClient:
        return self.deployment.client()


def deploy_issuers(
    service_factory: ServiceFactory,
    token_host: TokenHostHandle,
    pki: DevCA,
    tmp_path: Path,
    clock: FakeClock | None = None,
    **jwt_settings: Any,
) -> Generator[Issuers, None, None]:
    port = free_port()
    root = tmp_path / "issuers"
    base = f"https://localhost:{port}"
    settings = {
        "issuers": f"enterprise={base}/enterprise, consumer={base}/consumer",
        "issuers_dir": str(root),
        # Long: a document appears at once only if the key change itself publishes it.
        "publish_interval_seconds": 3600.0,
    } | jwt_settings
    with deploy(
        service_factory,
        token_host,
        pki,
        tmp_path,
        front={"issuers_listen": f"127.0.0.1:{port}", "issuers_dir": str(root)},
        clock=clock,
        jwt=settings,
    ) as d:
        issuers = Issuers(d, port, root)
        assert wait_until(lambda: (root / "consumer" / "jwks.json").exists(), timeout=10)
        yield issuers


@pytest.fixture
def issuers(
    service_factory: ServiceFactory, token_host: TokenHostHandle, pki: DevCA, tmp_path: Path
) -> Generator[Issuers, None, None]:
    yield from deploy_issuers(service_factory, token_host, pki, tmp_path)


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "aud": AUDIENCE, "exp": int(time.time()) + 600} | extra


def make_keys(issuers: Issuers, unique_name: UniqueName) -> tuple[str, str]:
    enterprise, consumer = unique_name(), unique_name()
    with issuers.client() as c:
        c.create_key(enterprise, "ec-p256", scope="enterprise")
        c.create_key(consumer, "ec-p256", scope="consumer")
    return enterprise, consumer


# --- what the front serves -----------------------------------------------------------------


def test_a_new_key_is_published_at_once_and_served_without_a_client_certificate(
    issuers: Issuers, unique_name: UniqueName
) -> None:
    enterprise, consumer = make_keys(issuers, unique_name)
    # The publish interval is an hour: only the key change's own publication can show it.
    assert wait_until(lambda: f"{enterprise}/1" in issuers.kids("enterprise"), timeout=5)
    assert issuers.kids("enterprise") == {f"{enterprise}/1"}
    assert issuers.kids("consumer") == {f"{consumer}/1"}
    status, headers, body = issuers.get("/enterprise/jwks.json")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "public, max-age=300"
    assert headers["access-control-allow-origin"] == "*"
    jwk = json.loads(body)["keys"][0]
    assert jwk["scope"] == "enterprise"
    assert jwk["alg"] == "ES256"
    assert jwk["use"] == "sig"
    assert "d" not in jwk
    # Revalidation: the ETag answers 304 while nothing changed.
    status, again, _ = issuers.get("/enterprise/jwks.json", **{"If-None-Match": headers["etag"]})
    assert status == 304
    assert again["etag"] == headers["etag"]
    status, _, body = issuers.get("/enterprise/.well-known/openid-configuration")
    assert status == 200
    discovery = json.loads(body)
    assert discovery["issuer"] == issuers.issuer("enterprise")
    assert discovery["jwks_uri"] == issuers.issuer("enterprise") + "/jwks.json"
    assert discovery["id_token_signing_alg_values_supported"] == ["ES256"]


def test_a_changed_set_gets_a_new_etag(issuers: Issuers, unique_name: UniqueName) -> None:
    """Two sets of one size: nginx's ETag is mtime and size, and the publisher makes the new
    file a second younger, so a verifier revalidating with If-None-Match gets the new set."""
    first, second = unique_name(), unique_name()
    assert len(first) == len(second)
    with issuers.client() as c:
        c.create_key(first, "ec-p256", scope="enterprise")
        assert wait_until(lambda: issuers.kids("enterprise") == {f"{first}/1"}, timeout=5)
        _, headers, _ = issuers.get("/enterprise/jwks.json")
        c.disable(first, 1)
        c.create_key(second, "ec-p256", scope="enterprise")
    assert wait_until(lambda: issuers.kids("enterprise") == {f"{second}/1"}, timeout=5)
    status, _, body = issuers.get("/enterprise/jwks.json", **{"If-None-Match": headers["etag"]})
    assert status == 200
    assert {k["kid"] for k in json.loads(body)["keys"]} == {f"{second}/1"}


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/enterprise/",
        "/enterprise",
        "/enterprise/.well-known/",
        "/enterprise/jwks.json.tmp",
        "/enterprise/.tmp-x",
        "/nosuch/jwks.json",
        "/signer.v1.SignerService/Sign",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_nothing_else_is_served(issuers: Issuers, path: str) -> None:
    status, _, _ = issuers.get(path)
    assert status == 404


def test_only_get_and_head(issuers: Issuers) -> None:
    url = issuers.base + "/enterprise/jwks.json"
    post = urllib.request.Request(url, data=b"{}", method="POST")
    assert issuers.request(post)[0] == 403
    head = urllib.request.Request(url, method="HEAD")
    assert issuers.request(head)[0] == 200


def test_grpc_on_the_issuers_port_reaches_no_service(issuers: Issuers) -> None:
    """The issuers' port asks for no certificate, so it must lead nowhere but to the files: a
    gRPC call there is answered by nginx, and the gRPC port still refuses a caller without a
    certificate."""
    creds = grpc.ssl_channel_credentials(issuers.deployment.pki.cert.read_bytes())
    for address, expected in (
        (issuers.base.removeprefix("https://"), grpc.StatusCode.UNIMPLEMENTED),
        (issuers.deployment.address.replace("127.0.0.1", "localhost"), None),
    ):
        with grpc.secure_channel(address, creds) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        code = info.value.code()
        if expected is not None:
            assert code == expected, info.value.details()
            assert "404" in (info.value.details() or "")
        else:
            assert code == grpc.StatusCode.UNAUTHENTICATED


# --- SignJWT and iss ------------------------------------------------------------------------


def test_an_issuers_keys_sign_jwts_only(issuers: Issuers, unique_name: UniqueName) -> None:
    """Raw Sign with an enterprise key would mint a token the enterprise verifiers accept with
    any iss and no bounded exp (hostile review of issue 17): refused, batch too."""
    enterprise, consumer = make_keys(issuers, unique_name)
    with issuers.client() as c:
        for name in (enterprise, consumer):
            with pytest.raises(FailedPrecondition, match="signs JWTs only"):
                c.sign(name, message=b"header.payload")
            with pytest.raises(FailedPrecondition, match="signs JWTs only"):
                c.sign_batch(name, messages=[b"a", b"b"])


def test_set_issuer_puts_the_scopes_issuer(issuers: Issuers, unique_name: UniqueName) -> None:
    enterprise, consumer = make_keys(issuers, unique_name)
    with issuers.client() as c:
        token = c.sign_jwt(enterprise, claims(), set_issuer=True)
        assert jwt.decode(token, options={"verify_signature": False})["iss"] == issuers.issuer(
            "enterprise"
        )
        # A consumer key cannot speak for the enterprise issuer, and no exp, no token.
        with pytest.raises(InvalidArgument, match="signs only for"):
            c.sign_jwt(consumer, claims(iss=issuers.issuer("enterprise")))
        with pytest.raises(InvalidArgument, match='"exp"'):
            c.sign_jwt(enterprise, {"sub": "alice"}, set_issuer=True)


# --- standard verifiers ---------------------------------------------------------------------


class PyJWTVerifier:
    """A relying party written with PyJWT only, given the issuer's URL."""

    def __init__(self, issuers: Issuers, issuer: str, **client: Any) -> None:
        with urllib.request.urlopen(
            f"{issuer}/.well-known/openid-configuration", context=issuers.ssl, timeout=10
        ) as resp:
            meta = json.load(resp)
        assert meta["issuer"] == issuer
        self.issuer = issuer
        self.algorithms = meta["id_token_signing_alg_values_supported"]
        self.keys = jwt.PyJWKClient(meta["jwks_uri"], ssl_context=issuers.ssl, **client)

    def verify(self, token: str) -> tuple[bool, str]:
        try:
            key = self.keys.get_signing_key_from_jwt(token)
            jwt.decode(
                token, key.key, algorithms=self.algorithms, audience=AUDIENCE, issuer=self.issuer
            )
        except jwt.PyJWTError as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return True, "ok"


class NodeVerifier:
    """A relying party written with Node's jose only (tests/node/verify.mjs), given the
    issuer's URL; it keeps running, so its jose cache lives across tokens."""

    def __init__(self, issuers: Issuers, issuer: str, cache_ms: int = 0, cooldown_ms: int = 0):
        node = need_tool("node")
        if not (NODE_VERIFIER.parent / "node_modules" / "jose").is_dir():
            pytest.fail("tests/node/node_modules has no jose: run make deps (make node)")
        args = [node, str(NODE_VERIFIER), issuer, AUDIENCE]
        if cache_ms:
            args += [str(cache_ms), str(cooldown_ms or 30_000)]
        env = dict(os.environ, NODE_EXTRA_CA_CERTS=str(issuers.deployment.pki.cert))
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=NODE_VERIFIER.parent,
        )
        ready = self._line()
        assert ready == {"ready": True}, ready

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"node verifier exited: {self.proc.stderr.read()[-2000:]}")
        result: dict[str, Any] = json.loads(line)
        return result

    def verify(self, token: str) -> tuple[bool, str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(token + "\n")
        self.proc.stdin.flush()
        out = self._line()
        return bool(out["ok"]), str(out.get("code", "ok"))

    def close(self) -> None:
        try:
            self.proc.communicate(timeout=10)  # closes stdin: the verifier ends
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


def forged(c: SignerClient, name: str, kid: str, payload: dict[str, Any]) -> str:
    """A JWT whose claims name the enterprise issuer, signed through raw Sign with ``name``, a
    key of a scope without an issuer (an issuer's keys sign through SignJWT only): what SignJWT
    refuses to make, made anyway, to show the verifiers refuse it on their own."""
    data = jose.signing_input("ES256", kid, json.dumps(payload).encode())
    sig = c.sign(name, message=data, signature_format="raw").signature
    return jose.compact(data, sig)


def test_standard_verifiers_of_the_enterprise_issuer_accept_only_enterprise_tokens(
    issuers: Issuers, unique_name: UniqueName
) -> None:
    enterprise, consumer = make_keys(issuers, unique_name)
    issuer = issuers.issuer("enterprise")
    with issuers.client() as c:
        good = c.sign_jwt(enterprise, claims(), set_issuer=True)
        other = c.sign_jwt(consumer, claims(), set_issuer=True)
        outsider = unique_name()
        c.create_key(outsider, "ec-p256", scope="payments")
        forgery = forged(c, outsider, f"{outsider}/1", claims(iss=issuer))
        # The forger guesses an enterprise kid: the other key's signature does not verify.
        spoof = forged(c, outsider, f"{enterprise}/1", claims(iss=issuer))
    assert wait_until(lambda: issuers.published("enterprise", {f"{enterprise}/1"}), timeout=5)
    assert wait_until(lambda: issuers.published("consumer", {f"{consumer}/1"}), timeout=5)
    node = NodeVerifier(issuers, issuer)
    try:
        for verifier in (PyJWTVerifier(issuers, issuer), node):
            name = type(verifier).__name__
            ok, why = verifier.verify(good)
            assert ok, f"{name} rejected an enterprise token: {why}"
            for token, what in ((other, "consumer"), (forgery, "forged"), (spoof, "spoofed")):
                ok, why = verifier.verify(token)
                assert not ok, f"{name} accepted a {what} token"
        # The consumer issuer's own verifier accepts the consumer token: the rejection above is
        # the issuer's, not a broken token.
        assert PyJWTVerifier(issuers, issuers.issuer("consumer")).verify(other)[0]
    finally:
        node.close()


def test_a_publication_that_fails_is_retried_and_never_stops_the_service(
    service_factory: ServiceFactory, tmp_path: Path, unique_name: UniqueName
) -> None:
    """The issuers' directory cannot be made (a file is in the way): the service starts and
    signs all the same, and the next key change after it is cleared publishes."""
    root = tmp_path / "issuers"
    root.write_text("in the way")
    svc = service_factory(
        jwt={
            "issuers": "enterprise=https://localhost:8443/enterprise",
            "issuers_dir": str(root),
            "publish_interval_seconds": 3600.0,
        }
    )
    name = unique_name()
    with svc.client() as c:
        c.create_key(name, "ec-p256", scope="enterprise")
        assert c.sign_jwt(name, claims(), set_issuer=True)
        root.unlink()
        c.rotate(name)
    jwks = root / "enterprise" / "jwks.json"
    assert wait_until(jwks.exists, timeout=5)
    assert f"{name}/1" in jwks.read_text()


# --- rotation under the verifiers' caches ----------------------------------------------------

LEAD, GRACE = 3600.0, 7200.0  # the service's time (a FakeClock, advanced by the test)
CACHE = 4.0  # the verifiers' JWKS cache, real seconds (PyJWKClient lifespan, jose cacheMaxAge)
COOLDOWN = 120.0  # no refetch for an unknown kid within this: only the cache's age refetches


def test_rotation_under_the_verifiers_caches_rejects_no_valid_token(
    service_factory: ServiceFactory,
    token_host: TokenHostHandle,
    pki: DevCA,
    tmp_path: Path,
    unique_name: UniqueName,
) -> None:
    """PyJWKClient and Node's jose, each with its own cache, verify every token of a key across
    a rotation: the next version is published before it signs (lead), the replaced one stays
    published after (grace). Time is the service's FakeClock, moved past the lead and the grace;
    between the rotation and the switch the verifiers' caches run out, as a lead longer than any
    cache makes them. The control, a rotation with no lead, is rejected by both: the verifiers'
    caches are real, so the test could fail."""
    clock = FakeClock(datetime.now(UTC))
    gen = deploy_issuers(
        service_factory,
        token_host,
        pki,
        tmp_path,
        clock,
        publish_interval_seconds=0.2,  # the time-driven changes (grace ending) show quickly
        rotation_lead_seconds=LEAD,
        retired_grace_seconds=GRACE,
    )
    issuers = next(gen)
    name = unique_name()
    issuer = issuers.issuer("enterprise")
    with issuers.client() as c:
        c.create_key(name, "ec-p256", scope="enterprise")
        assert wait_until(lambda: issuers.published("enterprise", {f"{name}/1"}), timeout=5)
        py = PyJWTVerifier(issuers, issuer, lifespan=CACHE, cooldown_duration=COOLDOWN)
        node = NodeVerifier(issuers, issuer, int(CACHE * 1000), int(COOLDOWN * 1000))
        verifiers: list[PyJWTVerifier | NodeVerifier] = [py, node]

        def token() -> tuple[str, str]:
            t = c.sign_jwt(name, claims(), set_issuer=True)
            return t, str(jwt.get_unverified_header(t)["kid"])

        def accepted(t: str, when: str) -> None:
            for v in verifiers:
                ok, why = v.verify(t)
                assert ok, f"{type(v).__name__} rejected a valid token {when}: {why}"

        def caches_run_out() -> None:
            time.sleep(CACHE + 0.5)  # a cache's lifetime: what is waited for is time itself

        try:
            first, kid = token()
            assert kid == f"{name}/1"
            accepted(first, "before the rotation")  # both caches now hold version 1 only
            c.rotate(name)
            assert wait_until(
                lambda: issuers.kids("enterprise") == {f"{name}/1", f"{name}/2"}, timeout=5
            )
            before, kid = token()
            assert kid == f"{name}/1", "the next version must not sign before the lead"
            accepted(before, "during the lead, from the cache of before the rotation")
            caches_run_out()
            accepted(before, "during the lead, after a refetch")
            clock.advance(seconds=LEAD)
            after, kid = token()
            assert kid == f"{name}/2"
            accepted(after, "right after the switch")
            accepted(before, "right after the switch (the retired version)")
            clock.advance(seconds=GRACE - 60)
            caches_run_out()
            assert issuers.kids("enterprise") == {f"{name}/1", f"{name}/2"}
            accepted(before, "within the grace, after a refetch")
            clock.advance(seconds=61)
            assert wait_until(lambda: issuers.kids("enterprise") == {f"{name}/2"}, timeout=5)

            # The control: no lead. The caches are fresh (refetched just now) and hold version
            # 2 only; version 3 signs at once, and both verifiers reject it.
            caches_run_out()
            accepted(after, "before the control")
            c.rotate(name, now=True)
            control, kid = token()
            assert kid == f"{name}/3"
            for v in verifiers:
                ok, _ = v.verify(control)
                assert not ok, f"{type(v).__name__} accepted a key it had not fetched yet"
        finally:
            node.close()
            gen.close()
