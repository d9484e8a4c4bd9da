"""Protobuf from and to the keyring's types: keys, versions and their states, timestamps, a
signing request's input, signature format and RSA padding."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from signer._internal.token import object_uri
from signer.keys import Key, Padding, SigFormat, State, Version
from signer.v1 import signer_pb2 as pb

_STATE_TO_PB = {
    State.ENABLED: pb.ENABLED,
    State.DISABLED: pb.DISABLED,
    State.DESTRUCTION_SCHEDULED: pb.DESTRUCTION_SCHEDULED,
    State.DESTROYED: pb.DESTROYED,
}


def ts(t: datetime | None) -> Timestamp | None:
    if t is None:
        return None
    out = Timestamp()
    out.FromDatetime(t)
    return out


def version_pb(v: Version, token_label: str) -> pb.KeyVersion:
    """A version; its PKCS#11 URI names the token ``token_label``."""
    return pb.KeyVersion(
        name=v.name,
        version=v.version,
        algorithm=v.algorithm,
        state=_STATE_TO_PB[v.state],
        create_time=ts(v.created),
        destroy_time=ts(v.destroy_at),
        pkcs11_uri=""
        if v.state is State.DESTROYED
        else object_uri(token_label, f"{v.name}/v{v.version}", v.key_id),
    )


def key_pb(k: Key, token_label: str) -> pb.Key:
    """A key as the keyring gives it: ``primary`` the effective primary, ``next_primary`` set
    only while one is pending."""
    return pb.Key(
        name=k.name,
        algorithm=k.algorithm,
        primary_version=k.primary,
        versions=[version_pb(v, token_label) for v in k.versions],
        create_time=ts(k.created),
        scope=k.scope,
        labels=k.labels,
        next_primary_version=k.next_primary or 0,
        next_primary_time=ts(k.next_primary_at),
    )


def signed_input(request: Any) -> tuple[bytes | None, bytes | None]:
    """(message, digest) of a request's ``input`` oneof: one of them is None."""
    which = request.WhichOneof("input")
    return (
        request.message if which == "message" else None,
        request.digest if which == "digest" else None,
    )


def sig_format(value: int) -> SigFormat:
    return SigFormat.RAW if value == pb.RAW else SigFormat.DER


def padding(value: int) -> Padding:
    return Padding.PKCS1V15 if value == pb.PKCS1V15 else Padding.PSS
