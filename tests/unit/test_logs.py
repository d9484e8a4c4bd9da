"""signer._internal.logs: one JSON object per record, extra fields included, exceptions by class
name."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from signer._internal import logs
from signer._internal.logs import JsonFormatter


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("signer.test-logs")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.handlers[:] = []
    logger.propagate = True


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_record(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.info("first")
    logger.warning("second %s", "arg")
    out = records(stream)
    assert len(out) == 2
    assert stream.getvalue().count("\n") == 2
    first, second = out
    assert first["msg"] == "first"
    assert first["level"] == "info"
    assert first["logger"] == "signer.test-logs"
    assert second["msg"] == "second arg"
    assert second["level"] == "warning"
    assert first["time"].endswith("+00:00")
    assert "." in first["time"]  # milliseconds


def test_extra_fields(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    logger.info(
        "key created",
        extra={
            "key": "payments",
            "version": 2,
            "ratio": 0.5,
            "ok": True,
            "none": None,
            "obj": Opaque(),
        },
    )
    (rec,) = records(stream)
    assert rec["key"] == "payments"
    assert rec["version"] == 2
    assert rec["ratio"] == 0.5
    assert rec["ok"] is True
    assert rec["none"] is None
    assert rec["obj"] == "opaque!"  # non-JSON values become strings


def test_standard_attributes_not_dumped(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.info("plain")
    (rec,) = records(stream)
    assert set(rec) == {"time", "level", "logger", "msg"}


def test_exception_class_name(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    try:
        raise ValueError("bad thing")
    except ValueError:
        logger.exception("crashed", extra={"method": "/x/Y"})
    (rec,) = records(stream)
    assert rec["exception"] == "ValueError"
    assert rec["level"] == "error"
    assert rec["method"] == "/x/Y"
    assert "Traceback" in rec["traceback"]
    assert "bad thing" in rec["traceback"]


def test_no_exception_keys_without_exc_info(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.error("no exc", exc_info=False)
    (rec,) = records(stream)
    assert "exception" not in rec
    assert "traceback" not in rec


def test_setup_installs_json_handler() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logs.setup("warning")
        assert root.level == logging.WARNING
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
