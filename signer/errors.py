"""The one exception tree of the signer.

Everything this project raises on purpose is a :class:`SignerError`. The classes say what went
wrong, not how it travels: an error carries no wire status. Each boundary translates through one
table of its own:

* PKCS#11 errors become these in :mod:`signer._internal.token` (``_errors.py``), and nowhere else;
* these become gRPC statuses in the server's interceptor and come back as the same classes in
  :mod:`signer.client`, both through the one table in :mod:`signer._wire`;
* the ``signer`` command prints them and exits 2: ``error: STATUS: message`` for a class the
  table gives a status (whether the service answered it or the command raised it), ``error:
  message`` for the local classes below.

Messages name the problem (the parameter, the key, the version, the file) and never carry a
secret: no PIN, no key material, no payload.

    SignerError                 root: a message, nothing else
    ├── InvalidArgument         bad input: name, algorithm, digest length, message size, ...
    ├── NotFound                unknown key or version
    ├── AlreadyExists           duplicate key name
    ├── FailedPrecondition      the state forbids it: disabled/destroyed version, missing mechanism
    │   └── LoginRefused        the token turns the service away (waiting will not help)
    ├── Unavailable             the token host, the store or the audit log cannot serve now
    │   └── StoreUncertain      a store write failed with an I/O error: it may yet be on disk
    ├── Unauthenticated         no caller identity
    ├── PermissionDenied        the caller may not do this
    ├── ResourceExhausted       a bound was reached: live import tokens, calls, refused calls
    ├── Internal                a bug or an unexpected token answer; details go to the log only
    ├── ConfigError             a configuration, policy or PIN file is wrong (start-up, SIGHUP)
    ├── TokenRejected           a JWT fails verification (signer.jose, the relying party's side)
    ├── ScanError               the scanner cannot use a dump or a secrets file
    │   └── CoreFormatError     not an ELF core, or a malformed one
    ├── HarnessError            the crash harness could not start, crash or collect a process
    └── GateError               the dump gate cannot be installed, uninstalled or run as asked

The last five never travel over gRPC: they are raised in the caller's own process.

A value a caller sent goes into a message only through :func:`shown`, which bounds it: a message
travels in a gRPC trailer (nginx refuses large ones), a log line and an audit record.
"""

from __future__ import annotations


class SignerError(Exception):
    """Root of every error this project raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SignerError):
    """The request itself is wrong; the same request will fail again."""


class NotFound(SignerError):
    """No such key or version (or none the caller may know of)."""


class AlreadyExists(SignerError):
    """A key of that name exists."""


class FailedPrecondition(SignerError):
    """The state of the key, the token or the service forbids it now."""


class Unavailable(SignerError):
    """Cannot serve now; the same call may succeed later."""


class Unauthenticated(SignerError):
    """No caller identity."""


class PermissionDenied(SignerError):
    """The caller's grants do not allow it."""


class ResourceExhausted(SignerError):
    """A bound was reached."""


class Internal(SignerError):
    """A bug or an unexpected answer; the details went to the log, not the message."""


class LoginRefused(FailedPrecondition):
    """The token refuses the service's PIN: no call can be served, and waiting will not help
    (signer/_internal/token/_logins.py)."""


class StoreUncertain(Unavailable):
    """A store write failed with an I/O error: it was rolled back for this process, but what
    it wrote may come back at the recovery after a crash (a COMMIT whose fsync failed); or, on
    PostgreSQL, its connection was lost during COMMIT, which the server may have done. Code
    that would undo what the write stood for must not: it may be on record."""


# What "the token cannot be used now" looks like to code that would otherwise try again later.
TOKEN_AWAY: tuple[type[SignerError], ...] = (Unavailable, LoginRefused)


class ConfigError(SignerError):
    """A configuration file or setting is wrong; raised at start-up or reload, never over the
    wire."""


class TokenRejected(SignerError):
    """A JWT failed verification; the message says which check."""


class ScanError(SignerError):
    """The scanner cannot use its input (a dump, a secrets file, a key set)."""


class CoreFormatError(ScanError):
    """The file is not an ELF core the scanner can read, or a malformed one."""


class HarnessError(SignerError):
    """The crash harness could not start, crash or collect a process."""


class GateError(SignerError):
    """The dump gate cannot be installed, uninstalled or run as asked (not root, a path others
    could write, a core_pattern the kernel would cut short)."""


# The most of a caller's value a message shows.
SHOWN_CHARS = 64


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` of at most ``limit`` characters of it, saying how long it really was:
    untrusted input in a message, a log line or an audit record, bounded (issue 11)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
