"""The operator's commands, run on the service's host: ``hsm`` init, serve, import-key;
``serve``, ``run``, ``front serve``; ``audit-log`` verify, archive; ``store migrate``; ``keys
adopt``, ``keys reconcile``. Each imports what the ``service`` extra brings only when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from signer._internal.reconcile import DEFAULT_GRACE_SECONDS
from signer.cli._common import EXIT_INVALID, EXIT_OK, label
from signer.errors import InvalidArgument
from signer.keys import ALGORITHMS

if TYPE_CHECKING:
    from signer._internal.config import AuditConfig
    from signer.cli._common import Subparsers


# --- commands ---------------------------------------------------------------------------------


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
    return hsm.serve_forever(
        args.dir,
        args.label,
        socket=args.socket,
        group=_group_id(args.socket_group),
        tls_socket=args.tls_socket,
        tls_group=_group_id(args.tls_socket_group),
    )


def _group_id(name: str | None) -> int | None:
    """The gid of group ``name`` (None: none given)."""
    import grp

    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidArgument(f"no group {name!r}") from None


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


def _audit_config(
    args: argparse.Namespace,
) -> tuple[str | Path, Path, Path, str, AuditConfig]:
    from signer._internal import audit, config

    cfg = config.load(args.config) if args.config else config.Config()
    if args.db:
        # As store.path is checked: a password on the command line is in ps and the shell's
        # history, and would be echoed back (REVIEW.md 8).
        config._validate_store(args.db, "--db")
    location: str = args.db or cfg.audit.path
    chain: str = cfg.audit.chain if args.chain is None else args.chain
    if audit.is_database(location):
        verifying = args.func is cmd_audit_verify
        if args.db and (not args.archive_dir or (verifying and not args.public_key)):
            raise InvalidArgument(
                "--db is a database URL: give --archive-dir"
                + (" and --public-key" if verifying else "")
                + " too (files, outside the database)"
            )
        if chain and not config.CHAIN_NAME.fullmatch(chain):
            raise InvalidArgument("--chain must be 1 to 32 of a-z, 0-9 and '-'")
    elif chain:
        raise InvalidArgument("--chain names a chain of a database: the log here is a file")
    # A URL stays a string (Path would fold its '//').
    db = location if audit.is_database(location) else Path(location)
    pinned = Path(args.public_key or (f"{db}.key.pem" if args.db else cfg.audit.pinned_key))
    archives = Path(args.archive_dir or (f"{db}.archive" if args.db else cfg.audit.archives))
    return db, pinned, archives, chain, cfg.audit


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from signer._internal import audit
    from signer._internal.config import redacted

    db, pinned, archives, chain, cfg = _audit_config(args)
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
        chain=chain,
    )
    name = redacted(str(db)) + (f" (chain {chain})" if chain else "")
    if verdict.first_bad is not None:
        seq, what = verdict.first_bad
        print(f"audit log {name} is NOT whole: first bad record {seq}: {what}")
        return EXIT_INVALID
    print(
        f"audit log {name} is whole: {verdict.records} records, "
        f"{verdict.checkpoints} signed checkpoints, signed up to record {verdict.last_checkpoint}"
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
        + (
            f"; the records of chains {', '.join(verdict.cross_checked)} its checkpoints "
            "named are as signed"
            if verdict.cross_checked
            else ""
        )
        + (
            f"; {verdict.cross_unchecked} references into other chains' archives not checked: "
            "--archives"
            if verdict.cross_unchecked
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

    db, _, archives, chain, _ = _audit_config(args)
    before = datetime.now(UTC) - timedelta(days=args.older_than_days)
    # Not the writer: beside a running service, serialised with it on the chain's lock.
    store = audit.open_audit_store(db, chain=chain, writer=False)
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


def cmd_store_migrate(args: argparse.Namespace) -> int:
    from signer._internal import config, transfer

    # As store.path is checked: a password on the command line is in ps and the shell's history,
    # and would be echoed back (REVIEW.md 8). Shown only redacted.
    if not args.to.startswith(config.STORE_URL_SCHEMES):
        raise InvalidArgument("--to must be a postgresql:// URL")
    config._validate_store(args.to, "--to")
    cfg = config.load(args.config).audit if args.config else config.AuditConfig()
    src = transfer.sources(
        args.source,
        args.public_key or cfg.public_key_file or None,
        args.archive_dir or cfg.archive_dir or None,
    )
    target = config.redacted(args.to) + (f" (chain {args.chain})" if args.chain else "")
    print(f"migrating {src.store} and {src.audit} to {target}", file=sys.stderr)
    done = transfer.migrate(src, args.to, args.chain, max_unsigned_records=cfg.max_unsigned_records)
    n = done.counts
    print(
        f"migrated to {target} in {done.seconds:.1f} s, read back equal to the source:\n"
        f"  key store: {n.keys} keys, {n.versions} versions, {n.import_tokens} import tokens\n"
        f"  audit log: {n.records} records, {n.checkpoints} checkpoints, {n.archives} archives "
        f"({n.archived_records} records); audit-log verify passes on both sides"
    )
    chain = f', chain = "{args.chain}"' if args.chain else ""
    print(
        "next: set [store] path and [audit] path to the URL, with [audit] "
        f'public_key_file = "{src.pin}", archive_dir = "{src.archive_dir}"{chain} (the audit '
        "key stays in the token: the same pin verifies both; the archive files stay where they "
        "are), then start the service. The SQLite files are left as they were."
    )
    return EXIT_OK


def cmd_front_serve(args: argparse.Namespace) -> int:
    from signer._internal import config, front, logs

    logs.setup(args.log_level)
    return front.serve_forever(config.load(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    from signer._internal import launcher, logs

    logs.setup(args.log_level)
    return launcher.run(args.dir, args.listen, args.metrics_listen, args.issuers_listen)


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


# --- parser -----------------------------------------------------------------------------------


def _log_level(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _audit_log_arguments(sp: argparse.ArgumentParser) -> None:
    """Where the audit log is: what ``audit-log`` commands share."""
    sp.add_argument("--config", help="the service's TOML configuration (for [audit])")
    sp.add_argument(
        "--db",
        help="the audit log file or postgresql:// URL (default: audit.path of the config)",
    )
    sp.add_argument(
        "--chain",
        help="a database's chain, a replica's (default: audit.chain of the config; '' the one)",
    )


def register(sub: Subparsers) -> None:
    """``hsm``, ``audit-log``, ``store``, ``front``, ``serve``, ``run``."""
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
    # A token host running as a user of its own (systemd/signer-token-host.service): each
    # socket where its one client's user can reach it, 0660 to that user's group.
    sp.add_argument("--socket", type=Path, help="the signing token's socket (DIR/run/p11-kit.sock)")
    sp.add_argument("--socket-group", metavar="GROUP", help="make it 0660 to GROUP (else 0600)")
    sp.add_argument(
        "--tls-socket", type=Path, help="the TLS token's socket (DIR/run/p11-kit-tls.sock)"
    )
    sp.add_argument("--tls-socket-group", metavar="GROUP", help="make it 0660 to GROUP")
    _log_level(sp)
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
    _audit_log_arguments(sp)
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
    _audit_log_arguments(sp)
    sp.add_argument("--archive-dir", help="where archives go (default: audit.archive_dir)")
    sp.add_argument("--older-than-days", type=float, required=True)
    sp.set_defaults(func=cmd_audit_archive, public_key=None)

    # signer store migrate
    store_p = sub.add_parser("store", help="the key store and audit log's database")
    store_sub = store_p.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    sp = store_sub.add_parser(
        "migrate",
        help="move a single machine's SQLite key store and audit log to PostgreSQL, verified",
        description="Copies the key store and the audit log (its records, checkpoints, archive "
        "rows and audit key) of a stopped single-machine service into a PostgreSQL database "
        "whose schema holds neither yet, after verifying the log with its pin and archives, "
        "and verifies the copy with the same. The SQLite files are only read (an older key store's "
        "schema is brought up to date first, as the service's start would).",
    )
    sp.add_argument(
        "--from",
        dest="source",
        nargs="+",
        required=True,
        metavar="DIR_OR_FILE",
        help="the state directory (its signer.db and audit.db), or the two files",
    )
    sp.add_argument("--to", required=True, metavar="POSTGRES_URL", help="the database (store.path)")
    sp.add_argument(
        "--chain", default="", help="the chain the log becomes (audit.chain; default '')"
    )
    sp.add_argument("--config", help="the old service's TOML configuration (for [audit])")
    sp.add_argument(
        "--public-key", help="the pinned audit key PEM (default: the log's path + .key.pem)"
    )
    sp.add_argument("--archive-dir", help="archive files (default: the log's path + .archive)")
    sp.set_defaults(func=cmd_store_migrate)

    # signer front serve
    front_p = sub.add_parser("front", help="the mTLS front (nginx, its key in the TLS token)")
    front_sub = front_p.add_subparsers(dest="front_command", required=True, metavar="COMMAND")
    sp = front_sub.add_parser(
        "serve", help="serve mTLS in front of the service's Unix socket ([front] of the config)"
    )
    sp.add_argument("--config", required=True, help="TOML configuration with a [front] section")
    _log_level(sp)
    sp.set_defaults(func=cmd_front_serve)

    # signer serve / run
    sp = sub.add_parser("serve", help="run the gRPC service (config: TOML plus SIGNER_* overrides)")
    sp.add_argument("--config", help="TOML configuration file")
    _log_level(sp)
    sp.set_defaults(func=cmd_serve)
    sp = sub.add_parser("run", help="token host + service + demo key in the foreground (make run)")
    sp.add_argument("--dir", default="var", help="state directory (default var)")
    sp.add_argument("--listen", default="127.0.0.1:50051")
    sp.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9464",
        help="Prometheus metrics, host:port ('' for none; default 127.0.0.1:9464)",
    )
    sp.add_argument(
        "--issuers-listen",
        default="127.0.0.1:8443",
        help="the front's issuers server (JWKS and OpenID configuration of the tokens scope's "
        "issuer, no client certificate), host:port ('' for none; default 127.0.0.1:8443)",
    )
    _log_level(sp)
    sp.set_defaults(func=cmd_run)


def register_keys(keys: Subparsers) -> None:
    """``keys adopt`` and ``keys reconcile``: the key store and the token, on this host."""
    sp = keys.add_parser(
        "adopt", help="record a key provisioned with 'signer hsm import-key' (store and token)"
    )
    sp.add_argument("name")
    sp.add_argument("--algorithm", required=True, choices=list(ALGORITHMS))
    sp.add_argument("--id", required=True, type=_hex_id, help="CKA_ID in hex")
    sp.add_argument("--config", required=True, help="the service's TOML configuration")
    sp.add_argument("--scope", default="", help="key scope, fixed at creation")
    sp.add_argument("--label", action="append", default=[], type=label, metavar="KEY=VALUE")
    sp.set_defaults(func=cmd_keys_adopt)
    sp = keys.add_parser(
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
