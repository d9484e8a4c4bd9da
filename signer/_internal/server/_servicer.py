"""The RPCs: :class:`SignerServicer`.

Each RPC asks the policy whether the caller (:data:`._identity.CALLER`) may do it to the key
(refusals are the same whether or not the key exists), then runs it in the keyring
(:mod:`signer._internal.keyring`, synchronous, free of gRPC) off the event loop: the signing path
on the lanes (:mod:`signer._internal.lanes`), state changes on a small pool of their own,
everything else (key generation, import, listings) on the administrative pool. Protobuf
conversions are in :mod:`._convert`; errors are left to :class:`._interceptor.CallInterceptor`.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from signer._internal.keyring import BATCH_CHUNK, Keyring
from signer._internal.lanes import Lanes
from signer._internal.policy import Operation, Policy
from signer._internal.server._convert import (
    key_pb,
    padding,
    sig_format,
    signed_input,
    ts,
    version_pb,
)
from signer._internal.server._identity import CALLER
from signer._internal.server._interceptor import GONE
from signer._internal.server._operations import OPERATION_OF, RPC
from signer._internal.token import TokenAPI
from signer._wire import status_of
from signer.errors import PermissionDenied, SignerError
from signer.keys import (
    DEFAULT_SCOPE,
    Key,
    Version,
    check_name,
    check_scope,
    public_jwk_json,
    public_pem,
)
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc

T = TypeVar("T")


class SignerServicer(pb_grpc.SignerServiceServicer):
    """``signer.v1.SignerService`` over a :class:`Keyring`; the caller is :data:`CALLER`."""

    def __init__(
        self,
        keyring: Keyring,
        token: TokenAPI,
        lanes: Lanes,
        admin: ThreadPoolExecutor,
        policy: Callable[[], Policy],
        changes: ThreadPoolExecutor | None = None,
    ) -> None:
        self._keyring = keyring
        self._token = token
        self._lanes = lanes
        self._admin = admin
        self._changes = changes or admin
        self._policy = policy

    # Where blocking work runs. The lanes serve the signing path: quick calls share a lane's
    # batch, a SignBatch chunk takes a lane alone. State changes have a small pool of their
    # own (_run_change). Everything else (key generation, import, listings) runs on the admin
    # pool, so that two RSA-4096 key generations (seconds each) cannot take both lanes.
    # (p11-kit's token host serves one connection's calls in order: there a generation delays
    # the signatures behind it anyway.)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._admin, functools.partial(fn, *args))

    async def _run_change(self, fn: Callable[..., T], *args: Any) -> T:
        """A state change (set primary, disable, enable, schedule or cancel a destruction):
        quick, store-only, and what an operator reaches for in an emergency, so on a pool of
        its own, never queued behind key generations a caller has piled onto the admin pool
        (review of issue 12: 128 RSA-4096 rotations held a Disable for minutes)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._changes, functools.partial(fn, *args))

    async def _run_quick(self, fn: Callable[..., T], *args: Any) -> T:
        """One signature, one verification, one metadata read: may share a lane's batch."""
        self._token.check_answering()  # not behind lanes stuck in a token that does not answer
        return await self._lanes.run(functools.partial(fn, *args), quick=True)

    # --- authorisation ------------------------------------------------------------------------

    @staticmethod
    def _operation() -> Operation:
        """What the RPC being served needs (:data:`OPERATION_OF`, the one table)."""
        return OPERATION_OF[RPC.get()]

    async def _allow(self, name: str) -> None:
        """PERMISSION_DENIED unless the caller may do what this RPC needs to key ``name``. The
        answer is the same whether or not the key exists, unless a grant names the key by
        pattern: callers learn nothing of keys they cannot see. A malformed name is
        INVALID_ARGUMENT first, so that nothing unchecked reaches the store, a message or the
        log."""
        check_name(name)
        scope = self._keyring.cached_scope(name)
        if scope is None:
            scope = await self._run_quick(self._keyring.scope_of, name)
        caller, operation = CALLER.get(), self._operation()
        if not self._policy().allows(caller, operation, name, scope):
            raise PermissionDenied(f"{caller.display} may not {operation} key {name!r}")

    async def _allow_new(self, name: str, scope: str) -> None:
        """For a key about to be created (create, import of a new key) in ``scope``."""
        check_name(name)
        check_scope(scope)
        caller, operation = CALLER.get(), self._operation()
        if not self._policy().allows_new(caller, operation, name, scope or DEFAULT_SCOPE):
            raise PermissionDenied(
                f"{caller.display} may not {operation} key {name!r} in scope "
                f"{scope or DEFAULT_SCOPE!r}"
            )

    def _key(self, k: Key) -> pb.Key:
        return key_pb(k, self._token.label)

    def _version(self, v: Version) -> pb.KeyVersion:
        return version_pb(v, self._token.label)

    # --- RPCs ---------------------------------------------------------------------------------

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Any) -> pb.Key:
        await self._allow_new(request.name, request.scope)
        key = await self._run(
            self._keyring.create_key,
            request.name,
            request.algorithm,
            request.scope,
            dict(request.labels),
        )
        return self._key(key)

    async def GetKey(self, request: pb.GetKeyRequest, context: Any) -> pb.Key:
        await self._allow(request.name)
        return self._key(await self._run_quick(self._keyring.get_key, request.name))

    def _may_read_any(self) -> Callable[[Key], bool]:
        """Which keys the caller may see in a listing. A caller with no read grant at all is
        refused one (rather than given an empty one), so its calls count against its refusal
        budget like any other refusal."""
        caller, policy, operation = CALLER.get(), self._policy(), self._operation()
        if not policy.allows_any(caller, operation):
            raise PermissionDenied(f"{caller.display} may not {operation} keys")

        def visible(k: Key) -> bool:
            return policy.allows(caller, operation, k.name, k.scope)

        return visible

    async def ListKeys(self, request: pb.ListKeysRequest, context: Any) -> pb.ListKeysResponse:
        visible = self._may_read_any()
        keys, token = await self._run(
            self._keyring.list_keys, request.page_size, request.page_token, visible
        )
        return pb.ListKeysResponse(keys=[self._key(k) for k in keys], next_page_token=token)

    async def GetPublicKey(self, request: pb.GetPublicKeyRequest, context: Any) -> pb.PublicKey:
        await self._allow(request.name)
        v, alg = await self._run_quick(self._keyring.public_key, request.name, request.version)
        out = pb.PublicKey(name=v.name, version=v.version, algorithm=alg.name)
        if request.format == pb.JWK:
            out.jwk = public_jwk_json(v.public_key_der, alg, f"{v.name}/{v.version}")
        else:
            out.pem = public_pem(v.public_key_der)
        return out

    async def Sign(self, request: pb.SignRequest, context: Any) -> pb.SignResponse:
        await self._allow(request.name)
        message, digest = signed_input(request)
        r = await self._run_quick(
            self._keyring.sign,
            request.name,
            request.version,
            message,
            digest,
            sig_format(request.signature_format),
            padding(request.rsa_padding),
        )
        return pb.SignResponse(
            signature=r.signature,
            version=r.version,
            algorithm=r.algorithm,
            signature_algorithm=r.signature_algorithm,
        )

    async def Verify(self, request: pb.VerifyRequest, context: Any) -> pb.VerifyResponse:
        await self._allow(request.name)
        message, digest = signed_input(request)
        valid, version = await self._run_quick(
            self._keyring.verify,
            request.name,
            request.version,
            message,
            digest,
            request.signature,
            sig_format(request.signature_format),
            padding(request.rsa_padding),
        )
        return pb.VerifyResponse(valid=valid, version=version)

    async def RotateKey(self, request: pb.RotateKeyRequest, context: Any) -> pb.Key:
        await self._allow(request.name)
        return self._key(
            await self._run(functools.partial(self._keyring.rotate, now=request.now), request.name)
        )

    async def SetPrimaryVersion(self, request: pb.SetPrimaryVersionRequest, context: Any) -> pb.Key:
        await self._allow(request.name)
        return self._key(
            await self._run_change(self._keyring.set_primary, request.name, request.version)
        )

    async def DisableKeyVersion(self, request: pb.KeyVersionRequest, context: Any) -> pb.KeyVersion:
        await self._allow(request.name)
        return self._version(
            await self._run_change(self._keyring.disable, request.name, request.version)
        )

    async def EnableKeyVersion(self, request: pb.KeyVersionRequest, context: Any) -> pb.KeyVersion:
        await self._allow(request.name)
        return self._version(
            await self._run_change(self._keyring.enable, request.name, request.version)
        )

    async def ScheduleKeyVersionDestruction(
        self, request: pb.ScheduleKeyVersionDestructionRequest, context: Any
    ) -> pb.KeyVersion:
        await self._allow(request.name)
        return self._version(
            await self._run_change(
                self._keyring.schedule_destruction,
                request.name,
                request.version,
                request.waiting_period_seconds,
            )
        )

    async def CancelKeyVersionDestruction(
        self, request: pb.KeyVersionRequest, context: Any
    ) -> pb.KeyVersion:
        await self._allow(request.name)
        return self._version(
            await self._run_change(self._keyring.cancel_destruction, request.name, request.version)
        )

    async def SignBatch(self, request: pb.SignBatchRequest, context: Any) -> pb.SignBatchResponse:
        await self._allow(request.name)
        items = [signed_input(item) for item in request.items]
        # The signing path, so on the lanes: the plan (hashing up to 1,000 items) and each chunk
        # as a job of its own, so that calls queued meanwhile go between them.
        self._token.check_answering()
        plan = await self._lanes.run(
            functools.partial(
                self._keyring.plan_batch,
                request.name,
                request.version,
                items,
                sig_format(request.signature_format),
                padding(request.rsa_padding),
            )
        )
        for start in range(0, len(plan.jobs), BATCH_CHUNK):
            if (gone := GONE.get()) is not None and gone.gone:  # nobody will see the rest
                plan.abandon(start)
                break
            await self._lanes.run(functools.partial(self._keyring.sign_chunk, plan, start))
        r = plan.result()
        return pb.SignBatchResponse(
            results=[
                pb.SignBatchResult(error={"code": status_of(x).value[0], "message": x.message})
                if isinstance(x, SignerError)
                else pb.SignBatchResult(signature=x)
                for x in r.results
            ],
            version=r.version,
            algorithm=r.algorithm,
            signature_algorithm=r.signature_algorithm,
        )

    async def SignJWT(self, request: pb.SignJWTRequest, context: Any) -> pb.SignJWTResponse:
        await self._allow(request.name)
        r = await self._run_quick(
            functools.partial(self._keyring.sign_jwt, set_issuer=request.set_issuer),
            request.name,
            request.claims,
        )
        return pb.SignJWTResponse(
            token=r.token, kid=r.kid, alg=r.alg, version=r.version, issuer=r.issuer
        )

    async def GetJWKS(self, request: pb.GetJWKSRequest, context: Any) -> pb.GetJWKSResponse:
        visible = self._may_read_any()
        jwks = await self._run(self._keyring.jwks, request.scope, visible)
        return pb.GetJWKSResponse(jwks=json.dumps(jwks, sort_keys=True))

    async def GetImportParameters(
        self, request: pb.GetImportParametersRequest, context: Any
    ) -> pb.ImportParameters:
        caller, operation = CALLER.get(), self._operation()
        if not self._policy().allows_any(caller, operation):
            raise PermissionDenied(f"{caller.display} may not {operation} keys")
        p = await self._run(self._keyring.get_import_parameters, caller.identity)
        return pb.ImportParameters(
            import_token=p.token.token,
            wrapping_public_key_pem=public_pem(p.token.public_key_der),
            wrapping_algorithm=p.wrapping_algorithm,
            expire_time=ts(p.token.expires),
            supported_algorithms=p.supported_algorithms,
            two_step_wrapping_algorithm=p.two_step_wrapping_algorithm,
        )

    async def ImportKeyVersion(self, request: pb.ImportKeyVersionRequest, context: Any) -> pb.Key:
        name, scope = check_name(request.name), check_scope(request.scope)
        caller, policy, operation = CALLER.get(), self._policy(), self._operation()

        def authorise(existing: Key | None) -> None:
            # Decided under the key's lock, on the key as it is then (in a worker thread: what
            # it needs of the call was read above). A new version of an existing key becomes its
            # primary, as a rotation does: it needs both grants. The refusal is the same whether
            # or not the key exists.
            if existing is None:
                ok = policy.allows_new(caller, operation, name, scope or DEFAULT_SCOPE)
            else:
                ok = all(
                    policy.allows(caller, op, name, existing.scope)
                    for op in (operation, Operation.ROTATE)
                )
            if not ok:
                raise PermissionDenied(f"{caller.display} may not {operation} key {name!r}")

        key = await self._run(
            functools.partial(
                self._keyring.import_key_version,
                name,
                request.algorithm,
                request.import_token,
                request.wrapped_key,
                scope,
                dict(request.labels),
                request.public_key_der,
                caller=caller.identity,
                authorise=authorise,
            )
        )
        return self._key(key)
