"""``signer``: the one command line of the project.

``pip install signer`` brings the commands that call the service; the others need an extra (see
:data:`EXTRAS`), and import what it brings only when they run, so that the client's commands work
without it.

Exit codes: 0 success; 1 a signature that does not verify, or key material found by ``scan``;
2 an error: bad usage, an error status from the service (printed as ``error: STATUS: message``),
or an error raised here, such as a dump ``scan`` cannot read (``error: message``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signer._internal.reconcile import DEFAULT_GRACE_SECONDS
from signer._wire import STATUS, status_name
from signer.client import DEFAULT_ADDRESS, ClientTLS, SignerClient
from signer.errors import InvalidArgument, SignerError
from signer.keys import ALGORITHMS
from signer.v1 import signer_pb2 as pb

if TYPE_CHECKING:
    from signer._internal.config import AuditConfig

EXIT_OK, EXIT_INVALID, EXIT_ERROR = 0, 1, 2

EXTRAS: dict[str, str] = {
    "pkcs11": "service",
    "grpc_health": "service",
    "grpc_reflection": "service",
    "hyperscan": "scan",
    "numpy": "scan",
}
"""The extra (pyproject.toml) that brings each module a command may need and the client lacks."""


def _client(args: argparse.Namespace) -> SignerClient:
    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if any(given) and not all(given):
        raise InvalidArgument("mTLS needs all of --tls-ca, --tls-cert and --tls-key")
    tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key) if all(given) else None
    return SignerClient(args.address, tls=tls)


def _state(v: pb.KeyVersion) -> str:
    return pb.KeyVersionState.Name(v.state).lower()


def _key_dict(k: pb.Key) -> dict[str, Any]:
    return {
        "name": k.name,
        "algorithm": k.algorithm,
        "scope": k.scope,
        "labels": dict(k.labels),
        "primary_version": k.primary_version,
        "created": k.create_time.ToDatetime().isoformat() + "Z",
        "versions": [
            {
                "version": v.version,
                "state": _state(v),
                "created": v.create_time.ToDatetime().isoformat() + "Z",
                **(
                    {"destroy_time": v.destroy_time.ToDatetime().isoformat() + "Z"}
                    if v.HasField("destroy_time")
                    else {}
                ),
                **({"pkcs11_uri": v.pkcs11_uri} if v.pkcs11_uri else {}),
            }
            for v in k.versions
        ],
    }


def _print_key(k: pb.Key) -> None:
    print(json.dumps(_key_dict(k), indent=2))


def _print_version(v: pb.KeyVersion) -> None:
    out = {"name": v.name, "version": v.version, "state": _state(v)}
    if v.HasField("destroy_time"):
        out["destroy_time"] = v.destroy_time.ToDatetime().isoformat() + "Z"
    print(json.dumps(out, indent=2))


# --- commands ---------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_key(c.create_key(args.name, args.algorithm, args.scope, dict(args.label)))
    return EXIT_OK


def _label(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"label {text!r} must be KEY=VALUE")
    return k, v


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        keys = list(c.iter_keys())
    if args.json:
        print(json.dumps([_key_dict(k) for k in keys], indent=2))
        return EXIT_OK
    print(f"{'NAME':<32} {'ALGORITHM':<10} {'PRIMARY':>7} {'VERSIONS':>8}  SCOPE")
    for k in keys:
        print(
            f"{k.name:<32} {k.algorithm:<10} {k.primary_version:>7} {len(k.versions):>8}  {k.scope}"
        )
    return EXIT_OK


def cmd_keys_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_key(c.get_key(args.name))
    return EXIT_OK


def cmd_keys_public(args: argparse.Namespace) -> int:
    with _client(args) as c:
        pk = c.public_key(args.name, args.version, args.format)
    text = pk.jwk + "\n" if args.format == "jwk" else pk.pem
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_key(c.rotate(args.name))
    return EXIT_OK


def cmd_keys_set_primary(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print_key(c.set_primary(args.name, args.version))
    return EXIT_OK


def cmd_keys_version_op(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.op == "disable":
            v = c.disable(args.name, args.version)
        elif args.op == "enable":
            v = c.enable(args.name, args.version)
        elif args.op == "schedule-destruction":
            v = c.schedule_destruction(args.name, args.version, args.waiting_period)
        else:
            v = c.cancel_destruction(args.name, args.version)
    _print_version(v)
    return EXIT_OK


def cmd_keys_import(args: argparse.Namespace) -> int:
    pem = Path(args.infile).read_bytes()  # wrapped by the client below; never sent as is
    with _client(args) as c:
        key = c.import_key(
            args.name, args.algorithm, pem, scope=args.scope, labels=dict(args.label)
        )
    _print_key(key)
    return EXIT_OK


def _hex_id(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if not 1 <= len(value) <= 64:
        raise argparse.ArgumentTypeError(f"id {text!r} must be 1 to 64 bytes in hex")
    return value


def cmd_keys_adopt(args: argparse.Namespace) -> int:
    from signer._internal import config
    from signer._internal.keyring import adopt_with_config

    key = adopt_with_config(
        config.load(args.config), args.name, args.algorithm, args.id, args.scope, dict(args.label)
    )
    print(
        json.dumps(
            {
                "name": key.name,
                "algorithm": key.algorithm,
                "version": 1,
                "key_id": args.id.hex(),
                "scope": key.scope,
            },
            indent=2,
        )
    )
    return EXIT_OK


def cmd_keys_reconcile(args: argparse.Namespace) -> int:
    from signer._internal import config
    from signer._internal.reconcile import reconcile_with_config

    if args.grace < 0:
        raise InvalidArgument(f"--grace must not be negative, got {args.grace:g}")
    if args.grace > 0:
        print(f"reconcile: comparing twice, {args.grace:g} s apart", file=sys.stderr)
    report = reconcile_with_config(config.load(args.config), args.repair, args.grace)
    sys.stdout.write(report.to_json() if args.json else report.table())
    return EXIT_OK if report.consistent else EXIT_INVALID


def _read_input(args: argparse.Namespace) -> dict[str, bytes]:
    data = sys.stdin.buffer.read() if args.infile == "-" else Path(args.infile).read_bytes()
    return {"digest": data} if args.digest else {"message": data}


def cmd_jwt_sign(args: argparse.Namespace) -> int:
    claims = sys.stdin.buffer.read() if args.claims == "-" else Path(args.claims).read_bytes()
    with _client(args) as c:
        print(c.sign_jwt(args.name, claims.strip()))
    return EXIT_OK


def cmd_jwks(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(json.dumps(c.jwks(args.scope), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    with _client(args) as c:
        sig = c.sign(
            args.name,
            version=args.version,
            signature_format=args.format,
            rsa_padding=args.padding,
            **_read_input(args),
        )
    Path(args.out).write_bytes(sig.signature)
    print(
        json.dumps(
            {
                "name": args.name,
                "version": sig.version,
                "algorithm": sig.algorithm,
                "signature_algorithm": sig.signature_algorithm,
                "out": args.out,
            }
        ),
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    signature = Path(args.signature).read_bytes()
    with _client(args) as c:
        ok = c.verify(
            args.name,
            signature,
            version=args.version,
            signature_format=args.format,
            rsa_padding=args.padding,
            **_read_input(args),
        )
    print("valid" if ok else "INVALID", file=sys.stderr)
    return EXIT_OK if ok else EXIT_INVALID


def cmd_hsm_init(args: argparse.Namespace) -> int:
    from signer._internal import hsm

    paths = hsm.init(args.dir, args.label)
    # Where the credentials are, never what they are.
    where = f"{paths.so_pin.name} and {paths.user_pin.name}"
    print(f"token {args.label!r} in {paths.root}; credentials in owner-only {where}")
    print(
        f"TLS token {hsm.TLS_LABEL!r}: credentials in {paths.tls_so_pin.name} and "
        f"{paths.tls_pin.name}; the endpoint key pair {hsm.TLS_KEY_LABEL!r} was generated in it, "
        f"public key in {paths.tls_public_key}"
    )
    return EXIT_OK


def cmd_hsm_serve(args: argparse.Namespace) -> int:
    from signer._internal import hsm, logs

    logs.setup(args.log_level)
    return hsm.serve_forever(args.dir, args.label)


def cmd_hsm_import_key(args: argparse.Namespace) -> int:
    from signer._internal import hsm

    hsm.provision_key(
        args.dir, Path(args.infile).read_bytes(), args.label, args.id, token=args.token
    )
    print(json.dumps({"token": args.token, "label": args.label, "id": args.id.hex()}))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from signer._internal import config, logs, server

    logs.setup(args.log_level)
    return server.serve(config.load(args.config))


def _audit_config(args: argparse.Namespace) -> tuple[Path, Path, Path, AuditConfig]:
    from signer._internal import config

    cfg = config.load(args.config) if args.config else config.Config()
    db = Path(args.db or cfg.audit.path)
    pinned = Path(args.public_key or (f"{db}.key.pem" if args.db else cfg.audit.pinned_key))
    archives = Path(args.archive_dir or (f"{db}.archive" if args.db else cfg.audit.archives))
    return db, pinned, archives, cfg.audit


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from signer._internal import audit

    db, pinned, archives, cfg = _audit_config(args)
    # A young log has no checkpoint yet, so no audit key was made or pinned: the chain alone.
    key = pinned.read_bytes() if pinned.exists() else None
    witnessed = [Path(w) for w in args.witness]
    if not witnessed and cfg.witness_file and not args.db:
        witnessed = [Path(cfg.witness_file)]
    verdict = audit.verify_log(
        db,
        key,
        archives if args.archives else None,
        max_unsigned_records=cfg.max_unsigned_records,
        witnesses=witnessed,
    )
    if verdict.first_bad is not None:
        seq, what = verdict.first_bad
        print(f"audit log {db} is NOT whole: first bad record {seq}: {what}")
        return EXIT_INVALID
    print(
        f"audit log {db} is whole: {verdict.records} records, {verdict.checkpoints} signed "
        f"checkpoints, signed up to record {verdict.last_checkpoint}"
        + (
            f"; {verdict.unsigned_tail} newer records not yet under a checkpoint"
            if verdict.unsigned_tail
            else ""
        )
        + (
            f"; {verdict.archived} earlier records in archives"
            + (" (checked)" if args.archives else " (not checked: --archives)")
            if verdict.archived
            else ""
        )
        + (
            f"; {verdict.witnessed} checkpoints of {', '.join(map(str, witnessed))} agree"
            if witnessed
            else ""
        )
    )
    if key is None:
        print(
            f"note: no audit key is pinned ({pinned}): nothing in this log is signed yet. A young "
            "log is so until its first checkpoint; otherwise the pinned key's file is missing, "
            "and only "
            "a witness (--witness) can show that records were not cut from its end."
        )
    return EXIT_OK


def cmd_audit_archive(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from signer._internal import audit

    db, _, archives, _ = _audit_config(args)
    before = datetime.now(UTC) - timedelta(days=args.older_than_days)
    store = audit.SQLiteAuditStore(db)
    try:
        segment = audit.archive(store, archives, before)
    finally:
        store.close()
    if segment is None:
        print(f"nothing to archive: no signed checkpoint older than {args.older_than_days} days")
    else:
        print(
            f"archived records {segment.first_seq} to {segment.last_seq} to "
            f"{archives / segment.file} (sha256 {segment.sha256})"
        )
    return EXIT_OK


def cmd_front_serve(args: argparse.Namespace) -> int:
    from signer._internal import config, front, logs

    logs.setup(args.log_level)
    return front.serve_forever(config.load(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    from signer._internal import launcher, logs

    logs.setup(args.log_level)
    return launcher.run(args.dir, args.listen)


def _marker(text: str) -> tuple[str, Path]:
    name, sep, file = text.partition("=")
    if not sep or not name or not file:
        raise argparse.ArgumentTypeError(f"marker {text!r} must be NAME=FILE")
    return name, Path(file)


def cmd_scan(args: argparse.Namespace) -> int:
    from signer.scan import Scanner, load_public_keys, load_secrets
    from signer.scan.report import format_table, summary, to_json, to_sarif

    known = load_secrets(args.secrets)
    public = load_public_keys(args.public_keys) if args.public_keys else None
    markers = {name: file.read_bytes() for name, file in args.marker}
    scanner = Scanner(
        known,
        args.min_fragment,
        public_keys=public,
        blind_budget_seconds=args.blind_budget,
    )
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
    print(
        f"scan: {found} findings in {len(results)} dumps" if found else "scan: clean",
        file=sys.stderr,
    )
    return EXIT_INVALID if found else EXIT_OK


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signer",
        description="HSM-backed signing: keys stay in a PKCS#11 token in its own process.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_parser(parent: Any, name: str, help: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        env = os.environ.get
        sp.add_argument(
            "--address",
            default=env("SIGNER_ADDRESS", DEFAULT_ADDRESS),
            help=f"service address: unix:/path or host:port "
            f"(default $SIGNER_ADDRESS, else {DEFAULT_ADDRESS})",
        )
        for what, meta in (("ca", "CA.pem"), ("cert", "CERT.pem"), ("key", "KEY.pem")):
            sp.add_argument(
                f"--tls-{what}",
                default=env(f"SIGNER_TLS_{what.upper()}"),
                metavar=meta,
                help=f"mTLS {what} (default $SIGNER_TLS_{what.upper()})",
            )
        return sp

    def log_level(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--log-level", default="info", choices=["debug", "info", "warning", "error"]
        )

    # signer hsm ...
    hsm_p = sub.add_parser("hsm", help="the token host (SoftHSM2 behind p11-kit server)")
    hsm_sub = hsm_p.add_subparsers(dest="hsm_command", required=True, metavar="COMMAND")
    sp = hsm_sub.add_parser("init", help="create a token with random PINs in owner-only files")
    sp.add_argument("--dir", default="var/hsm", help="token host directory (default var/hsm)")
    sp.add_argument("--label", default="signer", help="token label (default signer)")
    sp.set_defaults(func=cmd_hsm_init)
    sp = hsm_sub.add_parser("serve", help="serve the token on DIR/run/p11-kit.sock, core dumps off")
    sp.add_argument("--dir", default="var/hsm")
    sp.add_argument("--label", default="signer")
    log_level(sp)
    sp.set_defaults(func=cmd_hsm_serve)
    sp = hsm_sub.add_parser(
        "import-key",
        help="import a private key with softhsm2-util (PIN typed on its terminal, not on argv)",
    )
    sp.add_argument("--dir", default="var/hsm")
    sp.add_argument("--in", dest="infile", required=True, help="PEM private key")
    sp.add_argument("--label", required=True, help="CKA_LABEL of the key objects")
    sp.add_argument("--id", required=True, type=_hex_id, help="CKA_ID in hex")
    sp.add_argument("--token", default="signer", help="token label (default signer)")
    sp.set_defaults(func=cmd_hsm_import_key)

    # signer audit-log verify
    audit_p = sub.add_parser("audit-log", help="the tamper-evident audit log")
    audit_sub = audit_p.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    sp = audit_sub.add_parser(
        "verify",
        help="prove the chain and every checkpoint signature (exit 0 whole, 1 first bad record)",
    )
    sp.add_argument("--config", help="the service's TOML configuration (for [audit])")
    sp.add_argument("--db", help="the audit log file (default: audit.path of the config)")
    sp.add_argument(
        "--public-key", help="the pinned audit key PEM (default: the log's path + .key.pem)"
    )
    sp.add_argument("--archive-dir", help="archive files (default: the log's path + .archive)")
    sp.add_argument("--archives", action="store_true", help="check the archive files too")
    sp.add_argument(
        "--witness",
        action="append",
        default=[],
        metavar="FILE",
        help="a witness of the checkpoints: audit.witness_file, the service's log, or syslog "
        "lines (journalctl -o cat); repeatable (default: audit.witness_file of the config)",
    )
    sp.set_defaults(func=cmd_audit_verify)
    sp = audit_sub.add_parser(
        "archive",
        help="move records up to the newest signed checkpoint older than N days to a file",
    )
    sp.add_argument("--config", help="the service's TOML configuration (for [audit])")
    sp.add_argument("--db", help="the audit log file (default: audit.path of the config)")
    sp.add_argument("--archive-dir", help="where archives go (default: audit.archive_dir)")
    sp.add_argument("--older-than-days", type=float, required=True)
    sp.set_defaults(func=cmd_audit_archive, public_key=None)

    # signer front serve
    front_p = sub.add_parser("front", help="the mTLS front (nginx, its key in the TLS token)")
    front_sub = front_p.add_subparsers(dest="front_command", required=True, metavar="COMMAND")
    sp = front_sub.add_parser(
        "serve", help="serve mTLS in front of the service's Unix socket ([front] of the config)"
    )
    sp.add_argument("--config", required=True, help="TOML configuration with a [front] section")
    log_level(sp)
    sp.set_defaults(func=cmd_front_serve)

    # signer serve / run
    sp = sub.add_parser("serve", help="run the gRPC service (config: TOML plus SIGNER_* overrides)")
    sp.add_argument("--config", help="TOML configuration file")
    log_level(sp)
    sp.set_defaults(func=cmd_serve)
    sp = sub.add_parser("run", help="token host + service + demo key in the foreground (make run)")
    sp.add_argument("--dir", default="var", help="state directory (default var)")
    sp.add_argument("--listen", default="127.0.0.1:50051")
    log_level(sp)
    sp.set_defaults(func=cmd_run)

    # signer keys ...
    keys_p = sub.add_parser("keys", help="create, inspect, rotate and retire keys")
    keys_sub = keys_p.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    sp = client_parser(keys_sub, "create", "generate a key in the token")
    sp.add_argument("name")
    sp.add_argument("--algorithm", required=True, choices=list(ALGORITHMS))
    sp.add_argument("--scope", default="", help="key scope, fixed at creation")
    sp.add_argument("--label", action="append", default=[], type=_label, metavar="KEY=VALUE")
    sp.set_defaults(func=cmd_keys_create)
    sp = client_parser(keys_sub, "import", "import a private key, wrapped here for the token")
    sp.add_argument("name", help="a new key (version 1) or an existing one (new primary version)")
    sp.add_argument("--algorithm", required=True, choices=list(ALGORITHMS))
    sp.add_argument("--in", dest="infile", required=True, help="PEM private key")
    sp.add_argument("--scope", default="", help="key scope, fixed at creation")
    sp.add_argument("--label", action="append", default=[], type=_label, metavar="KEY=VALUE")
    sp.set_defaults(func=cmd_keys_import)
    sp = keys_sub.add_parser(
        "adopt", help="record a key provisioned with 'signer hsm import-key' (store and token)"
    )
    sp.add_argument("name")
    sp.add_argument("--algorithm", required=True, choices=list(ALGORITHMS))
    sp.add_argument("--id", required=True, type=_hex_id, help="CKA_ID in hex")
    sp.add_argument("--config", required=True, help="the service's TOML configuration")
    sp.add_argument("--scope", default="", help="key scope, fixed at creation")
    sp.add_argument("--label", action="append", default=[], type=_label, metavar="KEY=VALUE")
    sp.set_defaults(func=cmd_keys_adopt)
    sp = keys_sub.add_parser(
        "reconcile",
        help="compare the key store with the token; --repair removes what a crash left "
        "(exit 0 consistent, 1 disagreement, 2 error)",
        description="Every key version not DESTROYED must have its private key object in the "
        "token, holding the public key the store has; every object the service made must be "
        "named by a version, a live import token or the audit log; destroyed versions and "
        "spent import tokens must have none. --repair destroys objects the service made that "
        "nothing names (a crash between generating and storing) or that the store says are "
        "gone, and records destructions a crash left half done; a version whose object is "
        "missing or different is reported, never changed. Objects the service did not make "
        "are listed and left alone. The token must be this store's alone.",
    )
    sp.add_argument("--config", required=True, help="the service's TOML configuration")
    sp.add_argument("--repair", action="store_true", help="repair what can be (see above)")
    sp.add_argument("--json", action="store_true", help="the report as JSON")
    sp.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        metavar="SECONDS",
        help="compare twice this far apart and keep what both find, for a running service "
        f"(default {DEFAULT_GRACE_SECONDS:g}); 0 for one pass, refused while the service runs",
    )
    sp.set_defaults(func=cmd_keys_reconcile)
    sp = client_parser(keys_sub, "list", "list keys")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_keys_list)
    sp = client_parser(keys_sub, "show", "show a key and its versions (JSON)")
    sp.add_argument("name")
    sp.set_defaults(func=cmd_keys_show)
    sp = client_parser(keys_sub, "public", "print a public key")
    sp.add_argument("name")
    sp.add_argument("--format", choices=["pem", "jwk"], default="pem")
    sp.add_argument("--version", type=int, default=0, help="default: the primary version")
    sp.add_argument("--out", help="write to this file instead of stdout")
    sp.set_defaults(func=cmd_keys_public)
    sp = client_parser(keys_sub, "rotate", "add a new version and make it primary")
    sp.add_argument("name")
    sp.set_defaults(func=cmd_keys_rotate)
    sp = client_parser(keys_sub, "set-primary", "make a version primary")
    sp.add_argument("name")
    sp.add_argument("version", type=int)
    sp.set_defaults(func=cmd_keys_set_primary)
    for op, help_text in (
        ("disable", "disable a version (it cannot sign or verify)"),
        ("enable", "enable a disabled version"),
        ("schedule-destruction", "destroy a version after a waiting period (default 7 days)"),
        ("cancel-destruction", "cancel a scheduled destruction (the version stays disabled)"),
    ):
        sp = client_parser(keys_sub, op, help_text)
        sp.add_argument("name")
        sp.add_argument("version", type=int)
        if op == "schedule-destruction":
            sp.add_argument(
                "--waiting-period",
                type=int,
                default=0,
                metavar="SECONDS",
                help="default: the service's configured period",
            )
        else:
            sp.set_defaults(waiting_period=0)
        sp.set_defaults(func=cmd_keys_version_op, op=op)

    # signer jwt sign / jwks
    jwt_p = sub.add_parser("jwt", help="JWTs signed in the token")
    jwt_sub = jwt_p.add_subparsers(dest="jwt_command", required=True, metavar="COMMAND")
    sp = client_parser(jwt_sub, "sign", "sign a JWT with KEY's primary version; prints the token")
    sp.add_argument("name", help="key name")
    sp.add_argument("--claims", required=True, help="JSON claims file ('-' for stdin)")
    sp.set_defaults(func=cmd_jwt_sign)
    sp = client_parser(sub, "jwks", "print the JWKS of a scope (each JWK carries its scope)")
    sp.add_argument("--scope", required=True)
    sp.set_defaults(func=cmd_jwks)

    # signer sign / verify
    for name, help_text, fn in (
        ("sign", "sign a file (signature written as raw bytes; DER for ECDSA)", cmd_sign),
        ("verify", "verify a signature (exit 0 valid, 1 invalid)", cmd_verify),
    ):
        sp = client_parser(sub, name, help_text)
        sp.add_argument("name", help="key name")
        sp.add_argument("--in", dest="infile", required=True, help="input file ('-' for stdin)")
        if name == "sign":
            sp.add_argument("--out", required=True, help="signature file to write")
        else:
            sp.add_argument("--signature", required=True, help="signature file")
        sp.add_argument(
            "--digest", action="store_true", help="the input is already a digest, not a message"
        )
        sp.add_argument("--version", type=int, default=0, help="default: the primary version")
        sp.add_argument(
            "--format", choices=["der", "raw"], default="der", help="ECDSA encoding (default der)"
        )
        sp.add_argument(
            "--padding",
            choices=["pss", "pkcs1v15"],
            default="pss",
            help="RSA padding (default pss)",
        )
        sp.set_defaults(func=fn)

    # signer scan
    sp = sub.add_parser(
        "scan",
        help="scan core dumps for keys and PINs (exit 0 clean, 1 findings)",
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
        "--marker",
        action="append",
        default=[],
        type=_marker,
        metavar="NAME=FILE",
        help="count occurrences of FILE's bytes (proves the dump holds known memory)",
    )
    sp.set_defaults(func=cmd_scan)

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
