"""signer._internal.token._errors: the one table from PKCS#11 errors to ours."""

from __future__ import annotations

import logging

import pkcs11.exceptions as p11e
import pytest

from signer._internal.token._errors import PKCS11_ERRORS, UNWRAP_ERRORS, map_errors
from signer.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    SignerError,
    Unavailable,
)


@pytest.mark.parametrize(
    ("raised", "ours", "message"),
    [
        (p11e.MechanismInvalid, FailedPrecondition, "the token refused the mechanism: "),
        (p11e.DataLenRange, InvalidArgument, "the token refused the input: DataLenRange"),
        (p11e.DataInvalid, InvalidArgument, "the token refused the input: DataInvalid"),
        (p11e.ObjectHandleInvalid, NotFound, "key object is gone from the token ("),
        (p11e.KeyHandleInvalid, NotFound, "key object is gone from the token (KeyHandleInvalid)"),
        (p11e.GeneralError, Internal, "token error: GeneralError"),
        (p11e.AttributeValueInvalid, Internal, "token error: AttributeValueInvalid"),
    ],
)
def test_the_table_names_the_return_code(
    raised: type[Exception], ours: type[SignerError], message: str
) -> None:
    with pytest.raises(ours) as caught, map_errors():
        raise raised()
    assert type(caught.value) is ours
    assert caught.value.message.startswith(message)
    assert isinstance(caught.value.__cause__, raised)


def test_most_specific_first_the_catch_all_last() -> None:
    classes = list(PKCS11_ERRORS)
    assert classes[-1] is p11e.PKCS11Error
    for i, cls in enumerate(classes):
        assert not any(issubclass(cls, earlier) for earlier in classes[:i])


def test_an_unexpected_answer_is_logged_by_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(Internal), map_errors():
        raise p11e.FunctionFailed()
    assert [r.getMessage() for r in caplog.records] == ["token error"]
    assert caplog.records[0].error == "FunctionFailed"  # type: ignore[attr-defined]


def test_our_errors_and_others_go_through() -> None:
    mine = Unavailable("token unavailable: test")
    with pytest.raises(Unavailable) as caught, map_errors():
        raise mine
    assert caught.value is mine
    with pytest.raises(KeyError), map_errors():
        raise KeyError("not from the token")


def test_a_partial_table_leaves_the_rest_to_the_next() -> None:
    """The import maps C_UnwrapKey's answers first; the session's table sees the rest."""
    with (
        pytest.raises(InvalidArgument) as caught,
        map_errors(),
        map_errors(UNWRAP_ERRORS, kind="an EC P-256"),
    ):
        raise p11e.GeneralError()  # the session's table says INTERNAL; an unwrap, the caller's key
    assert caught.value.message == (
        "the token could not unwrap wrapped_key (GeneralError): it is corrupt, was wrapped for "
        "another import token's wrapping key, or is not an EC P-256 key in PKCS#8"
    )
    unwrap = map_errors(UNWRAP_ERRORS, kind="an RSA-2048")
    with (
        pytest.raises(FailedPrecondition, match="refuses RSA-OAEP with SHA-1"),
        map_errors(),
        unwrap,
    ):
        raise p11e.MechanismParamInvalid()
    unwrap = map_errors(UNWRAP_ERRORS, kind="an RSA-2048")
    with pytest.raises(Internal, match="token error: DeviceMemory"), map_errors(), unwrap:
        raise p11e.DeviceMemory()
