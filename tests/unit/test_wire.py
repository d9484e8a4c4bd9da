"""signer._wire: the one table between our errors and gRPC statuses, read both ways."""

from __future__ import annotations

from signer import errors
from signer._wire import STATUS, error_from
from signer.errors import Internal
from tests.unit.test_errors import WIRE_CLASSES


def test_every_wire_error_class_has_a_distinct_status() -> None:
    statuses = [STATUS[cls] for cls in WIRE_CLASSES]
    assert len(set(statuses)) == len(statuses)
    assert set(STATUS) == set(WIRE_CLASSES)
    for cls, status in STATUS.items():
        assert (
            status.name
            == "".join(
                "_" + ch if ch.isupper() and i else ch for i, ch in enumerate(cls.__name__)
            ).upper()
        )


def test_error_from_a_number_gRPC_does_not_know_is_internal() -> None:
    exc = error_from(99, "boom")
    assert type(exc) is Internal
    assert exc.message == "99: boom"
    assert type(error_from(5, "gone")) is errors.NotFound
