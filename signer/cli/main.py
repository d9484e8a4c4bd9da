"""``signer``: the one command line of the project.

``pip install signer`` brings the commands that call the service; the others need an extra (see
:data:`EXTRAS`), and import what it brings only when they run, so that the client's commands work
without it.

Exit codes: 0 success; 1 a signature that does not verify, or key material found by ``scan``;
2 an error: bad usage, an error status from the service (printed as ``error: STATUS: message``),
or an error raised here, such as a dump ``scan`` cannot read (``error: message``).

Here: the root parser, :func:`main` and its one ``except SignerError``. Each command's arguments
and handler live together in one module: :mod:`._calls` the caller's commands over gRPC,
:mod:`._certs` the caller's ``keys csr`` and ``keys certificate``, :mod:`._host` the
operator's on the service's host, :mod:`._tools` the auditor's (``scan``, ``sanitize``,
``crash-test``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from signer._wire import STATUS, status_name
from signer.cli import _calls, _certs, _gate, _host, _tools
from signer.cli._common import EXIT_ERROR, EXIT_INVALID, EXIT_OK
from signer.errors import SignerError

__all__ = [
    "EXIT_ERROR",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXTRAS",
    "build_parser",
    "described",
    "main",
    "missing_extra",
]

EXTRAS: dict[str, str] = {
    "pkcs11": "service",
    "grpc_health": "service",
    "grpc_reflection": "service",
    # [store] path = "postgresql://..." (signer._internal.pgstore).
    "psycopg": "service",
    "psycopg_pool": "service",
    "hyperscan": "scan",
    "numpy": "scan",
}
"""The extra (pyproject.toml) that brings each module a command may need and the client lacks."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signer",
        description="HSM-backed signing: keys stay in a PKCS#11 token in its own process.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order of the calls is the order of `signer --help` and `signer keys --help`.
    _host.register(sub)  # hsm, audit-log, store, front, serve, run
    keys_p = sub.add_parser("keys", help="create, inspect, rotate and retire keys")
    keys = keys_p.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    _calls.register_new_keys(keys)  # keys create, import
    _host.register_keys(keys)  # keys adopt, reconcile
    _calls.register_keys(keys)  # keys list, show, public, rotate, set-primary, disable, ...
    _certs.register_keys(keys)  # keys csr, certificate
    _calls.register(sub)  # jwt, jwks, sign, verify
    _tools.register(sub)  # scan, sanitize, crash-test
    _gate.register(sub)  # dump-gate install, uninstall, status, handle
    return p


def described(exc: SignerError) -> str:
    """What ``error:`` says: the status for an error the service can answer with (so a script
    can tell NOT_FOUND from UNAVAILABLE), the message alone for one raised here (a scan's
    unreadable dump is not INVALID_ARGUMENT)."""
    if isinstance(exc, tuple(STATUS)):
        return f"{status_name(exc)}: {exc.message}"
    return exc.message


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """What to say when a command's module is not installed: the extra that brings it, or None
    for a module no extra brings (a bug, not an installation to complete)."""
    extra = EXTRAS.get((exc.name or "").partition(".")[0])
    if extra is None:
        return None
    return (
        f"this command needs signer's {extra!r} extra, and {exc.name} is not installed: "
        f"pip install 'signer[{extra}]'"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except SignerError as exc:
        print(f"error: {described(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        needed = missing_extra(exc)
        if needed is None:
            raise
        print(f"error: {needed}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
