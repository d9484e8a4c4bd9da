"""``python -m benchmarks.bare_server --config FILE``: the service without authorisation and
without its audit log, only so that :mod:`benchmarks.transport` can measure what they cost.
Not a way to run the service: nothing else starts it, and no setting turns this on."""

from __future__ import annotations

import argparse
import asyncio

from signer._internal import config, logs
from signer._internal.server import _serve, harden_process


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bare_server")
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    logs.setup("warning")
    cfg = config.load(args.config)
    harden_process(cfg)
    asyncio.run(_serve(cfg, bare=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
