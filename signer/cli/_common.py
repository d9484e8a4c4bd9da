"""What the command modules share: the exit codes, the ``KEY=VALUE`` label argument, and the type
of the ``add_subparsers()`` each module's ``register`` adds its commands to."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK, EXIT_INVALID, EXIT_ERROR = 0, 1, 2


def label(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"label {text!r} must be KEY=VALUE")
    return k, v
