"""``signer dump-gate``: the kernel's core dumps scanned before they leave the host.

``install``, ``uninstall`` and ``status`` (an operator's, as root) put the gate in and out of
``/proc/sys/kernel/core_pattern`` and say what it has done (:mod:`signer.gate._install`);
``handle`` is what the kernel runs for each dump (:func:`signer.gate.handle`). ``python -m
signer.gate`` runs the same commands (:func:`register_commands`). Each imports the gate only when
it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from signer.cli._common import EXIT_INVALID, EXIT_OK

if TYPE_CHECKING:
    from signer.cli._common import Subparsers

DESCRIPTION = (
    "The dump gate: the kernel pipes every core dump on the host to it; it keeps the dump in a "
    "root-only quarantine, scans it, and releases it only if clean."
)
DEFAULT_CONFIG = "/etc/signer/dump-gate.toml"  # signer.gate.DEFAULT_CONFIG, not imported for it


# --- install, uninstall, status ---------------------------------------------------------------


def cmd_install(args: argparse.Namespace) -> int:
    from signer.gate._install import install

    done = install(args.config, pipe_limit=args.pipe_limit, wrapper=args.wrapper)
    print("\n".join(done.lines()))
    return EXIT_OK


def cmd_uninstall(args: argparse.Namespace) -> int:
    from signer.gate._install import uninstall

    done = uninstall(args.config, state_dir=args.state_dir)
    print("\n".join(done.lines()))
    # Something else set core_pattern since the install: said, and left; a script notices.
    return EXIT_INVALID if done.left else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from signer.gate._install import status

    st = status(args.config, state_dir=args.state_dir)
    if args.json:
        sys.stdout.write(json.dumps(st.to_dict(), indent=2) + "\n")
    else:
        print("\n".join(st.lines()))
    return EXIT_OK


def _register_install(gsub: Subparsers) -> None:
    from signer.gate._install import DEFAULT_CONFIG, DEFAULT_PIPE_LIMIT, DEFAULT_WRAPPER

    def config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            metavar="PATH",
            help=f"the gate's configuration (default {DEFAULT_CONFIG})",
        )

    sp = gsub.add_parser(
        "install",
        help="run the gate for every crash on this host (sets core_pattern; root)",
        description="Writes the wrapper the kernel runs, checks that the config loads and that "
        "everything the kernel will run as root is writable by root alone, records the current "
        "core_pattern and core_pipe_limit in the state directory's state.json, then sets both. "
        "A re-install keeps the pattern the first one replaced.",
    )
    config(sp)
    sp.add_argument(
        "--pipe-limit",
        type=int,
        default=DEFAULT_PIPE_LIMIT,
        metavar="N",
        help="core_pipe_limit: dumps handled at once; the kernel keeps /proc/PID until the gate "
        f"exits (default {DEFAULT_PIPE_LIMIT})",
    )
    sp.add_argument(
        "--wrapper",
        type=Path,
        default=DEFAULT_WRAPPER,
        metavar="PATH",
        help=f"where the wrapper goes, in a directory only root can write (default "
        f"{DEFAULT_WRAPPER})",
    )
    sp.set_defaults(func=cmd_install)

    sp = gsub.add_parser(
        "uninstall",
        help="restore the core_pattern the gate replaced (root)",
        description="Restores the recorded core_pattern and core_pipe_limit if core_pattern is "
        "still the gate's; if something else has set it since, says what it found and leaves "
        "it (exit 1). Marks the state uninstalled. The quarantine is kept.",
    )
    config(sp)
    sp.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="the gate's state directory, when the config no longer loads",
    )
    sp.set_defaults(func=cmd_uninstall)

    sp = gsub.add_parser(
        "status",
        help="installed or not, the replaced pattern, and what the gate has decided",
        description="Says whether the gate is core_pattern, what it replaced, the config, the "
        "decisions in gate.log by kind, the dumps the quarantine holds with their reasons, and "
        "the newest decisions.",
    )
    config(sp)
    sp.add_argument("--state-dir", type=Path, metavar="DIR", help="as for uninstall")
    sp.add_argument("--json", action="store_true", help="as JSON")
    sp.set_defaults(func=cmd_status)


# --- handle (the kernel's) ----------------------------------------------------------------


def cmd_handle(args: argparse.Namespace) -> int:
    from signer.gate import Crash, handle

    crash, problem = Crash.from_kernel(args.kernel)
    outcome = handle(args.config, crash, problem=problem)
    where = f" ({outcome.entry})" if outcome.entry else ""
    print(f"{outcome.decision}: {outcome.reason}{where}")  # /dev/null when the kernel runs it
    return EXIT_OK if outcome.released else EXIT_INVALID


def _register_handle(gsub: Subparsers) -> None:
    sp = gsub.add_parser(
        "handle",
        help="take one core dump from stdin through the gate (run by the kernel)",
        usage="%(prog)s [--config PATH] -- PID TID UID GID SIGNAL TIME CORE_LIMIT HOSTNAME EXE",
        description="Run by the kernel through core_pattern ('|WRAPPER %%P %%I %%u %%g %%s %%t "
        "%%c %%h %%E'), with the core on stdin: stores it in the quarantine, scans it, releases "
        "it if clean, and records the decision in the entry's meta.json and the gate's log. "
        "PID and TID as the initial pid namespace sees them, EXE with '/' written '!'. "
        "Arguments that are not these nine keep the dump in quarantine (quarantined:error). "
        "Exit 0 released, 1 not released (the decision says why).",
    )
    sp.add_argument("--config", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    # Everything after --config, as given: the handler reads the kernel's values itself (a
    # hostname may be '--' or '-h'), and a wrong count is a quarantined dump, not a usage error
    # that leaves the kernel's pipe unread.
    sp.add_argument("kernel", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_handle)


# --- parser -----------------------------------------------------------------------------------


def register_commands(gsub: Subparsers) -> None:
    """install, uninstall, status, handle (also ``python -m signer.gate``)."""
    _register_install(gsub)
    _register_handle(gsub)


def register(sub: Subparsers) -> None:
    """``dump-gate`` and its commands."""
    gp = sub.add_parser(
        "dump-gate",
        help="scan every core dump on this host as the kernel writes it (install, status, ...)",
        description=DESCRIPTION,
    )
    gsub = gp.add_subparsers(dest="gate_command", required=True, metavar="COMMAND")
    register_commands(gsub)
