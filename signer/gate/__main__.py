"""``python -m signer.gate COMMAND ...``: the ``signer dump-gate`` commands, without the rest of
the command line (the kernel starts the handler for every crash: it loads no gRPC)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from signer.cli import _gate
from signer.cli._common import EXIT_ERROR
from signer.errors import SignerError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m signer.gate", description=_gate.DESCRIPTION)
    _gate.register_commands(parser.add_subparsers(dest="gate_command", required=True))
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except SignerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    return rc


if __name__ == "__main__":
    sys.exit(main())
