"""signer._internal.server's RPC-to-operation table: every RPC of the service has its operation,
written down once, and the audit log records a call under the name the table is keyed by."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from signer._internal.policy import Caller, Operation
from signer._internal.server import (
    OPERATION_OF,
    PUBLIC_PREFIXES,
    SignerServicer,
    audit_event,
    rpc_name,
)
from signer.v1 import signer_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["SignerService"]
RPCS = {m.name for m in SERVICE.methods}


def test_every_rpc_of_the_service_has_an_operation_and_no_entry_is_stale() -> None:
    assert set(OPERATION_OF) == RPCS


def test_no_rpc_of_the_service_is_public() -> None:
    """Only health checks and reflection go without a caller; every RPC of ours is authorised."""
    methods = [f"/{SERVICE.full_name}/{name}" for name in RPCS]
    assert not [m for m in methods if m.startswith(PUBLIC_PREFIXES)]


def test_the_servicer_implements_every_rpc_of_the_table() -> None:
    """Its own methods, not the generated base class's UNIMPLEMENTED ones."""
    assert not [name for name in OPERATION_OF if name not in vars(SignerServicer)]


def test_every_operation_is_what_some_rpc_needs() -> None:
    """A grant's operation that no RPC asks for would grant nothing."""
    assert set(OPERATION_OF.values()) == set(Operation)


# The entries a reader would not guess from the RPC's name. Each is explained beside its entry
# in signer/_internal/server/_operations.py; changing one is a change of policy semantics, so it
# is pinned here too.
NOT_OBVIOUS = {
    "SetPrimaryVersion": Operation.ROTATE,  # choosing the primary is what a rotation does
    "EnableKeyVersion": Operation.DISABLE,  # the same grant both ways
    "ScheduleKeyVersionDestruction": Operation.DESTROY,
    "CancelKeyVersionDestruction": Operation.DESTROY,  # the same grant both ways
    "ListKeys": Operation.READ,  # and only the keys the caller may read are listed
    "GetJWKS": Operation.READ,  # likewise
    "GetImportParameters": Operation.IMPORT,  # any import grant at all
    "ImportKeyVersion": Operation.IMPORT,  # and rotate, for a new version of an existing key
}


@pytest.mark.parametrize(("rpc", "operation"), sorted(NOT_OBVIOUS.items()))
def test_the_entries_a_name_does_not_say(rpc: str, operation: Operation) -> None:
    assert OPERATION_OF[rpc] is operation


def test_an_entry_the_name_does_not_say_is_pinned_above() -> None:
    """An RPC whose name does not contain its operation's word (``read`` is any Get) must be in
    NOT_OBVIOUS, that is, thought about and explained."""
    guessable = {
        rpc
        for rpc, op in OPERATION_OF.items()
        if op.value in rpc.lower() or (op is Operation.READ and rpc.startswith("Get"))
    }
    assert set(OPERATION_OF) - guessable <= set(NOT_OBVIOUS)


def test_the_audit_log_records_a_call_under_the_tables_name() -> None:
    method = f"/{SERVICE.full_name}/SetPrimaryVersion"
    event = audit_event(
        datetime(2026, 1, 1, tzinfo=UTC),
        method,
        Caller.unix(1000, "alice"),
        pb.SetPrimaryVersionRequest(name="k", version=2),
        None,
        None,
    )
    assert event.operation == rpc_name(method) == "SetPrimaryVersion"
    assert event.operation in OPERATION_OF


@pytest.mark.parametrize(("next_version", "recorded"), [(0, 3), (4, 4)])
def test_the_audit_log_records_the_version_a_rotation_made(
    next_version: int, recorded: int
) -> None:
    """Issue 17: a rotation in an issuer's scope makes a version that is primary only later; the
    record names it, not the primary that still signs."""
    event = audit_event(
        datetime(2026, 1, 1, tzinfo=UTC),
        f"/{SERVICE.full_name}/RotateKey",
        Caller.unix(1000, "alice"),
        pb.RotateKeyRequest(name="k"),
        pb.Key(name="k", primary_version=3, next_primary_version=next_version),
        None,
    )
    assert event.version == recorded
