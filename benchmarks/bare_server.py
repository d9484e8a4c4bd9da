"""``python -m benchmarks.bare_server --config FILE``: the service without authorisation and
without its audit log, only so that :mod:`benchmarks.transport` and :mod:`benchmarks.signing`
can measure what they cost.

It is assembled here, outside the shipped package, from the service's own parts: the same
:class:`signer._internal.server.Server`, given a policy that allows everything and an audit log
that keeps nothing instead of the ones its configuration names. The service itself has no
switch for this (issue 13). The interceptor still runs in full (caller, places, throttle, the
audit event built and handed to the recorder), so what ``unix`` costs over ``unix-bare`` is the
policy's decisions and the log's writing."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from signer._internal import config, logs
from signer._internal.audit import Event, MakeKey
from signer._internal.policy import Caller, Operation, Policy
from signer._internal.server import serve


class AllowEverything(Policy):
    """Every caller may do everything to every key."""

    def allows(self, caller: Caller, operation: Operation, name: str, scope: str | None) -> bool:
        return True

    def allows_new(self, caller: Caller, operation: Operation, name: str, scope: str) -> bool:
        return True

    def allows_any(self, caller: Caller, operation: Operation) -> bool:
        return True


class KeepNothing:
    """An audit log (:class:`signer._internal.server.Recorder`) that records nothing and never
    refuses a call: no store, no audit key, no checkpoints."""

    failure: str | None = None

    def start(self, make_key: MakeKey, pin_to: Path) -> None:
        pass

    def on_change(self, listener: Callable[[], None]) -> None:
        pass

    def check(self) -> None:
        pass

    def paused(self) -> None:
        pass

    async def record(self, event: Event) -> int:
        return 0

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bare_server")
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    logs.setup("warning")
    cfg = config.load(args.config)
    return serve(
        cfg,
        policy=AllowEverything((), "benchmarks: every call allowed"),
        audit=KeepNothing(),
    )


if __name__ == "__main__":
    raise SystemExit(main())
