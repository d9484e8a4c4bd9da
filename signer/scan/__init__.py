"""The auditor's dump scanner: is any known key or PIN, in any representation, in this file?

Known-secret mode searches every representation of every component of every secret (see
:mod:`signer.scan._patterns`), and every ``min_fragment``-byte window of each, in one Hyperscan
pass over the file. Blind mode, given only public keys, looks for private-key structures and
verifies candidate windows mathematically. An ELF core's findings are mapped to virtual
addresses and named mappings.

    scanner = Scanner(load_secrets(paths))        # compile once
    result = scanner.scan("core.1234", maps="maps.1234", markers={"payload": b"..."})
    result.findings, result.markers_found, result.bytes_scanned

An input the scanner cannot use (a dump, a maps snapshot, a secrets or public-key file that
cannot be read or is not what it should be, a secret too short to search for) is a
:class:`signer.errors.ScanError` naming the file and the problem; an ELF core whose headers
cannot be read is scanned as raw bytes, with a note saying so.

:func:`sanitize` writes a copy of a dump with every finding overwritten as its whole encoded
object (or, ``strict``, only what a backtrace needs), verified by a second scan.
"""

from signer.scan._result import BlindCheck, BlindReport, Finding, ScanResult
from signer.scan._sanitize import SanitizeResult, sanitize
from signer.scan._scanner import Scanner, scan_file
from signer.scan._secrets import (
    MIN_PATTERN,
    Secret,
    load_public_keys,
    load_secrets,
    public_key_id,
    secret_from_key,
    secret_from_pin,
    secret_from_raw,
)

__all__ = [
    "MIN_PATTERN",
    "BlindCheck",
    "BlindReport",
    "Finding",
    "SanitizeResult",
    "ScanResult",
    "Scanner",
    "Secret",
    "load_public_keys",
    "load_secrets",
    "public_key_id",
    "sanitize",
    "scan_file",
    "secret_from_key",
    "secret_from_pin",
    "secret_from_raw",
]
