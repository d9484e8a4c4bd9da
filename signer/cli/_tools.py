"""The auditor's tools: ``scan`` (core dumps searched for keys and PINs), ``sanitize`` (a copy of
a dump with every finding overwritten, verified by a re-scan) and ``crash-test`` (the real
service crashed over the matrix, every dump scanned). Each imports the scanner (the ``scan``
extra) or the harness only when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from signer.cli._common import EXIT_ERROR, EXIT_INVALID, EXIT_OK

if TYPE_CHECKING:
    from signer.cli._common import Subparsers
    from signer.keys import PublicKeyType
    from signer.scan import Scanner, Secret


# --- commands ---------------------------------------------------------------------------------


def _marker(text: str) -> tuple[str, Path]:
    name, sep, file = text.partition("=")
    if not sep or not name or not file:
        raise argparse.ArgumentTypeError(f"marker {text!r} must be NAME=FILE")
    return name, Path(file)


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 64:  # signer.scan._blind.MAX_WORKERS (not imported: numpy)
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer from 1 to 64")
    return value


def _scanner(
    args: argparse.Namespace,
) -> tuple[Scanner, list[Secret], dict[str, PublicKeyType] | None]:
    """The scanner scan and sanitize build from their shared options, with what it was given."""
    from signer.scan import Scanner, load_public_keys, load_secrets

    known = load_secrets(args.secrets)
    public = load_public_keys(args.public_keys) if args.public_keys else None
    scanner = Scanner(
        known,
        args.min_fragment,
        public_keys=public,
        blind_budget_seconds=args.blind_budget,
        blind_offsets=args.blind_offsets,
        blind_workers=args.blind_workers,
    )
    return scanner, known, public


def cmd_scan(args: argparse.Namespace) -> int:
    from signer.scan.report import format_table, summary, to_json, to_sarif

    markers = {name: file.read_bytes() for name, file in args.marker}
    scanner, known, public = _scanner(args)
    print(
        f"scan: {len(known)} known, {len(public or {})} public keys: {scanner.pattern_count} "
        f"patterns compiled in {scanner.compile_seconds:.2f} s",
        file=sys.stderr,
    )
    results = []
    for dump in args.dumps:
        result = scanner.scan(dump, maps=args.maps, markers=markers)
        print(summary(result), file=sys.stderr)
        for note in result.notes:
            print(f"  note: {note}", file=sys.stderr)
        results.append(result)
    sys.stdout.write(format_table(results))
    if args.json:
        Path(args.json).write_text(to_json(results))
    if args.sarif:
        Path(args.sarif).write_text(json.dumps(to_sarif(results), indent=2) + "\n")
    found = sum(len(r.findings) for r in results)
    unfinished = [str(r.path) for r in results if not r.finished]
    if found:
        print(f"scan: {found} findings in {len(results)} dumps", file=sys.stderr)
        return EXIT_INVALID
    if unfinished:
        # Fail closed: no finding in what was searched is not "clean" for what was not.
        print(
            f"scan: no findings, but INCOMPLETE for {', '.join(unfinished)} (a bound was "
            "reached: see the notes; give blind mode more --blind-budget): not shown clean",
            file=sys.stderr,
        )
        return EXIT_ERROR
    print("scan: clean", file=sys.stderr)
    return EXIT_OK


def cmd_sanitize(args: argparse.Namespace) -> int:
    from signer.scan import sanitize

    scanner, _, _ = _scanner(args)
    done = sanitize(args.core, args.out, scanner, strict=args.strict)
    print(
        f"sanitize: {done.findings_overwritten} findings in {len(done.objects)} objects, "
        f"{done.bytes_overwritten} bytes overwritten with the filler REDACTED",
        file=sys.stderr,
    )
    if done.strict:
        print(
            f"sanitize: strict: kept {done.bytes_kept} bytes of memory in {len(done.kept)} "
            f"ranges (stacks, code, the libraries' list), zeroed {done.bytes_zeroed}, "
            f"{done.words_defaced} stack words replaced",
            file=sys.stderr,
        )
    for note in done.notes:
        print(f"  note: {note}", file=sys.stderr)
    print(
        f"sanitize: re-scan clean; {done.output}: {done.size} bytes as the original, "
        f"{done.output_disk_bytes} on disk (original {done.source_disk_bytes})",
        file=sys.stderr,
    )
    if args.json:
        sys.stdout.write(done.to_json())
    return EXIT_OK


def cmd_crash_test(args: argparse.Namespace) -> int:
    from signer.harness import Campaign, full_matrix, quick_matrix

    cases = quick_matrix() if args.quick else full_matrix()
    campaign = Campaign(Path(args.report), keep_dumps=args.keep_dumps, progress=print)
    print(f"crash campaign: {len(cases)} crashes ({'quick' if args.quick else 'full'})", flush=True)
    ok = campaign.run(cases)
    s = campaign.summary()
    print(
        f"{'PASSED' if ok else 'FAILED'}: {s['crashes']} crashes, {s['dumps_scanned']} dumps, "
        f"{s['bytes_scanned'] / 2**20:.0f} MiB scanned, {s['service_findings']} findings in the "
        f"service, controls {s['controls_caught']}/{s['controls_run']}, markers "
        f"{s['markers_found']}/{s['crashes']}; report: {args.report}/report.md"
    )
    return EXIT_OK if ok else EXIT_INVALID


# --- parser -----------------------------------------------------------------------------------


def register(sub: Subparsers) -> None:
    """``scan``, ``sanitize`` and ``crash-test``."""
    # signer scan
    sp = sub.add_parser(
        "scan",
        help="scan core dumps for keys and PINs (exit 0 clean, 1 findings, 2 an error or a "
        "scan that did not finish: INCOMPLETE)",
        description="Search dumps for every representation of known keys and PINs (--secrets) "
        "and, blind, for private keys of given public keys (--public-keys). Findings go to "
        "stdout as a table; progress and a summary to stderr. Exit 0 clean, 1 findings, 2 error.",
    )
    sp.add_argument("dumps", nargs="+", metavar="DUMP", help="core dump or any file")
    sp.add_argument(
        "--secrets",
        nargs="+",
        default=[],
        metavar="FILE",
        help="private keys (PEM, DER, OpenSSH, JWK), *.pin files (PINs), other files (raw)",
    )
    sp.add_argument(
        "--public-keys",
        nargs="+",
        metavar="FILE",
        help="public keys, certificates or JWKs: turns on blind mode",
    )
    sp.add_argument("--maps", help="/proc/PID/maps snapshot naming the core's anonymous mappings")
    sp.add_argument("--json", metavar="OUT", help="write the result(s) as JSON")
    sp.add_argument("--sarif", metavar="OUT", help="write a SARIF 2.1.0 log")
    sp.add_argument(
        "--min-fragment",
        type=int,
        default=16,
        metavar="N",
        help="report fragments carrying N bytes of a secret and more (default 16)",
    )
    sp.add_argument(
        "--blind-budget",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="time for blind mathematical checks per dump (default 60)",
    )
    sp.add_argument(
        "--blind-offsets",
        choices=("every", "likely"),
        default="every",
        help="where blind mode looks for big-endian private numbers: at every byte offset "
        "(default), or, for EC and Ed25519 keys, only at 8-aligned addresses and after a "
        "length or pad byte (2x to 3x faster at equal workers; the dump gate's "
        "detect.blind_offsets)",
    )
    sp.add_argument(
        "--blind-workers",
        type=_workers,
        default=None,
        metavar="N",
        help="processes for blind mode's math checks on an uncompressed dump (default: the "
        "CPUs this process may use, at most 4)",
    )
    sp.add_argument(
        "--marker",
        action="append",
        default=[],
        type=_marker,
        metavar="NAME=FILE",
        help="count occurrences of FILE's bytes (proves the dump holds known memory)",
    )
    sp.set_defaults(func=cmd_scan)

    # signer sanitize
    sp = sub.add_parser(
        "sanitize",
        help="write a copy of a core with every key found overwritten (exit 0 verified)",
        description="Scan CORE as 'signer scan' does, copy it to SAFE with every finding "
        "overwritten as its whole encoded object (DER key, PEM block, base64/hex run, JWK "
        "object, big number, UTF-16 string) with the filler REDACTED, keeping the ELF headers "
        "and notes (gdb still opens it), then re-scan SAFE: it is kept only if that scan is "
        "complete and clean. --strict also zeroes all memory a backtrace does not need. Exit 0 "
        "verified copy written, 2 error (no copy left).",
    )
    sp.add_argument("core", metavar="CORE", help="the core dump (or any file)")
    sp.add_argument("--out", required=True, metavar="SAFE", help="the sanitised copy (replaced)")
    sp.add_argument("--secrets", nargs="+", default=[], metavar="FILE", help="as for scan")
    sp.add_argument(
        "--public-keys", nargs="+", metavar="FILE", help="as for scan: turns on blind mode"
    )
    sp.add_argument(
        "--strict",
        action="store_true",
        help="keep only stacks (pointer words), code and the libraries' list; zero the rest",
    )
    sp.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    sp.add_argument("--min-fragment", type=int, default=16, metavar="N", help="as for scan")
    sp.add_argument(
        "--blind-budget", type=float, default=60.0, metavar="SECONDS", help="as for scan"
    )
    sp.add_argument(
        "--blind-offsets", choices=("every", "likely"), default="every", help="as for scan"
    )
    sp.add_argument("--blind-workers", type=_workers, default=None, metavar="N", help="as for scan")
    sp.set_defaults(func=cmd_sanitize)

    # signer crash-test
    sp = sub.add_parser(
        "crash-test",
        help="crash the real service over the crash matrix and scan every dump (exit 0 proven)",
        description="Starts a token host with known keys and a long random PIN, crashes the "
        "service (signals, native faults, gcore snapshots) at each moment, scans every dump for "
        "every key and the PIN, and proves each scan with a control and a marker. Writes "
        "report.md and report.json. Exit 0 all clean and proven, 1 otherwise.",
    )
    sp.add_argument("--report", required=True, metavar="DIR", help="where the report goes")
    sp.add_argument("--quick", action="store_true", help="the CI slice, not the full matrix")
    sp.add_argument("--keep-dumps", action="store_true", help="keep the cores (they hold no keys)")
    sp.set_defaults(func=cmd_crash_test)
