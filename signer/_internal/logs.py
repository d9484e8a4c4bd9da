"""Structured (JSON lines) logging.

Records carry names, versions, states and sizes; never a payload, a signature input, a PIN,
key material or a wrapped blob. Values go in ``extra={...}``, so a reviewer can see every field.

Loggers are named for the component, not the module: ``signer.server``, ``signer.keyring``,
``signer.token``, ``signer.audit``, ``signer.relay``, ``signer.front``, ``signer.hsm``,
``signer.launcher``, ``signer.supervisor``. Where code sits inside ``signer._internal`` may
change; what an operator filters the log on should not.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import OrderedDict
from datetime import UTC, datetime

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v if isinstance(v, str | int | float | bool | None) else str(v)
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = record.exc_info[0].__name__
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, sort_keys=False)


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class Every:
    """Rate limit for a log line a caller could trigger at will: :meth:`due` says whether the
    line for ``key`` may be written now, with how many were held back since the last one. What
    a flood of connections or refusals can make the service write is bounded (issue 11: 37,964
    tracebacks in the log of one fd-exhaustion run). Remembers at most ``keys`` keys."""

    def __init__(self, seconds: float, keys: int = 1024) -> None:
        self.seconds = seconds
        self._keys = keys
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def due(self, key: str) -> int | None:
        """The number held back since the line was last written (0 or more) if it may be
        written now, else None (and this one is counted)."""
        now = time.monotonic()
        last, held = self._last.get(key, (-self.seconds, 0))
        if now - last < self.seconds:
            self._last[key] = (last, held + 1)
            return None
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self._keys:
            self._last.popitem(last=False)
        return held
