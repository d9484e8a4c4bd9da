"""Scan results for people (a table), programs (JSON) and code-scanning tools (SARIF 2.1.0).

No output carries key material: findings name a secret by its id, never by its bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import metadata
from typing import Any
from urllib.parse import quote

from signer.scan._patterns import family
from signer.scan._result import Finding, ScanResult

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"

_RULE_TEXT = {
    "be": "Big-endian bytes of a key component",
    "le64": "Little-endian 64-bit limbs of a key component (OpenSSL BIGNUM on x86-64)",
    "le": "Little-endian bytes of a key component",
    "cpython30": "A key component as a CPython int (30-bit digits)",
    "hex": "Lowercase hex of a key component or secret",
    "HEX": "Uppercase hex of a key component or secret",
    "b64": "Base64 of a key component, key or secret",
    "b64url": "Base64url of a key component, key or secret",
    "jwk": "A key component as in a JWK (unpadded base64url)",
    "pkcs1-der": "A whole RSA private key as PKCS#1 DER",
    "sec1-der": "A whole EC private key as SEC1 DER",
    "pkcs8-der": "A whole private key as PKCS#8 DER",
    "pem": "A whole private key as PEM",
    "le32": "Little-endian 32-bit words of a key component (.NET BigInteger, 32-bit BIGNUM)",
    "java-mag": "A key component as a Java BigInteger (int[] mag)",
    "dec": "Decimal text of a key component",
    "hex-colon": "Colon-separated hex of a key component",
    "openssl-text": "A key component as openssl pkey -text prints it",
    "pem-crlf": "A whole private key as PEM with CRLF line ends",
    "pem-json": "A whole private key as PEM in a JSON string",
    "openssh-key": "The key fields of an OpenSSH private key",
    "ppk-private": "The private blob of a PuTTY .ppk key",
    "latin1": "A PIN or secret as Latin-1 text",
    "utf16be": "A PIN or secret as UTF-16BE text",
    "utf16-pem-private-key": "A PEM private-key block in a UTF-16 string (blind)",
    "utf16-openssh-private": "An OpenSSH private key in a UTF-16 string (blind)",
    "utf8": "A PIN as UTF-8 text",
    "utf16le": "A PIN or secret as UTF-16LE text",
    "utf32le": "A PIN or secret as UTF-32LE text",
    "raw": "The bytes of a raw secret",
    "pem-private-key": "A PEM private-key block (blind)",
    "der-pkcs8": "A DER PKCS#8 private key (blind)",
    "der-pkcs1": "A DER PKCS#1 RSA private key (blind)",
    "der-sec1": "A DER SEC1 EC private key (blind)",
    "jwk-private": "A JWK with a private part (blind)",
    "openssh-private": "An OpenSSH private key (blind)",
    "verified-rsa-factor": "A prime factor of a given RSA modulus (blind, verified)",
    "verified-ec-scalar": "The private scalar of a given EC public key (blind, verified)",
    "verified-ed25519-seed": "The seed of a given Ed25519 public key (blind, verified)",
}


def _rule_text(name: str) -> str:
    """A representation's description; a UTF-16 string of a text form (``utf16le-hex``) is
    described as its text form."""
    if name in _RULE_TEXT:
        return _RULE_TEXT[name]
    encoding, _, form = name.partition("-")
    if encoding in ("utf16le", "utf16be") and form in _RULE_TEXT:
        order = "UTF-16LE" if encoding == "utf16le" else "UTF-16BE"
        return f"{_RULE_TEXT[form]}, in a {order} string"
    return f"Key material as {name}"


def _hex(value: int | None) -> str:
    return "-" if value is None else f"{value:#x}"


def format_table(results: Sequence[ScanResult]) -> str:
    """One row per finding ('' when there is none); a DUMP column when there are several dumps,
    a DETAIL column when a finding has a detail (blind findings say what was verified)."""
    several = len(results) > 1
    with_detail = any(f.detail for r in results for f in r.findings)
    header = [
        *(["DUMP"] if several else []),
        *("SECRET", "COMPONENT", "REPRESENTATION", "OFFSET", "LENGTH", "ADDRESS", "MAPPING"),
        *(["DETAIL"] if with_detail else []),
    ]
    rows = [
        [
            *([str(r.path)] if several else []),
            *(f.secret_id, f.component, f.representation, _hex(f.offset), str(f.length)),
            *(_hex(f.address), f.mapping or "-"),
            *([f.detail] if with_detail else []),
        ]
        for r in results
        for f in r.findings
    ]
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def to_json(results: Sequence[ScanResult]) -> str:
    """One scan: the ScanResult object; several: an array of them. Addresses are hex strings."""
    docs = [r.to_dict() for r in results]
    return json.dumps(docs[0] if len(docs) == 1 else docs, indent=2) + "\n"


def _version() -> str:
    try:
        return metadata.version("signer")
    except metadata.PackageNotFoundError:
        return "0"


def _message(f: Finding) -> str:
    where = f" at address {f.address:#x}" if f.address is not None else ""
    inside = f" in {f.mapping}" if f.mapping else ""
    what = f"{f.component} of {f.secret_id} as {f.representation}"
    text = f"{what}: {f.length} bytes at offset {f.offset}{where}{inside}"
    return f"{text} ({f.detail})" if f.detail else text


def to_sarif(results: Sequence[ScanResult]) -> dict[str, Any]:
    """SARIF 2.1.0: one run of tool 'signer-scan', a rule per representation family, a result
    per finding located by byte offset and length in the dump."""
    families = sorted({family(f.representation) for r in results for f in r.findings})
    rule_index = {name: i for i, name in enumerate(families)}
    rules = [
        {
            "id": name,
            "name": name,
            "shortDescription": {"text": _rule_text(name)},
            "defaultConfiguration": {"level": "error"},
        }
        for name in families
    ]
    artifacts = [{"location": {"uri": quote(str(r.path))}, "length": r.size} for r in results]
    sarif_results = [
        {
            "ruleId": family(f.representation),
            "ruleIndex": rule_index[family(f.representation)],
            "level": "error",
            "message": {"text": _message(f)},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": quote(str(r.path)), "index": ai},
                        "region": {"byteOffset": f.offset, "byteLength": f.length},
                    }
                }
            ],
            "properties": {
                "address": None if f.address is None else f"{f.address:#x}",
                "mapping": f.mapping,
                "secretId": f.secret_id,
                "component": f.component,
                "representation": f.representation,
                **({"detail": f.detail} if f.detail else {}),
            },
        }
        for ai, r in enumerate(results)
        for f in r.findings
    ]
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "signer-scan",
                        "version": _version(),
                        "rules": rules,
                    }
                },
                "artifacts": artifacts,
                "invocations": [{"executionSuccessful": all(r.complete for r in results)}],
                "results": sarif_results,
                "properties": {
                    "scans": [
                        {k: v for k, v in r.to_dict().items() if k != "findings"} for r in results
                    ]
                },
            }
        ],
    }


def summary(r: ScanResult) -> str:
    """One line for stderr: size, memory scanned, patterns, time, findings, markers."""
    mib = 1 << 20
    rate = r.size / mib / r.seconds if r.seconds > 0 else 0.0
    parts = [
        f"{r.path}: {'ELF core' if r.is_core else 'raw file'} {r.size / mib:.1f} MiB",
        f"{r.bytes_scanned / mib:.1f} MiB of memory scanned",
        f"{r.patterns} patterns",
        f"{r.seconds:.2f} s ({rate:.0f} MiB/s)",
        f"{len(r.findings)} finding{'s' if len(r.findings) != 1 else ''}",
    ]
    if r.markers_found:
        parts.append("markers " + ", ".join(f"{k}={v}" for k, v in r.markers_found.items()))
    if not r.finished:
        parts.append("INCOMPLETE")
    if r.blind is not None:
        covered = sum(c.bytes_covered for c in r.blind.checks)
        total = sum(c.bytes_total for c in r.blind.checks) or 1
        parts.append(f"blind math coverage {100 * covered / total:.0f}%")
    return "; ".join(parts)
