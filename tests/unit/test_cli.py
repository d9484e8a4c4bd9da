"""signer.cli: the parser's documented forms, exit codes and error printing (fake client)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from signer.cli import _calls, _host
from signer.cli._common import label
from signer.cli.main import EXIT_ERROR, EXIT_INVALID, EXIT_OK, build_parser, main
from signer.client import DEFAULT_ADDRESS, ClientTLS, Signature
from signer.errors import NotFound, Unavailable
from signer.v1 import signer_pb2 as pb

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ts(t: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(t)
    return out


def pb_key(name: str = "payments") -> pb.Key:
    return pb.Key(
        name=name,
        algorithm="ec-p256",
        primary_version=1,
        create_time=ts(T0),
        scope="team",
        labels={"env": "prod"},
        versions=[
            pb.KeyVersion(
                name=name,
                version=1,
                algorithm="ec-p256",
                state=pb.ENABLED,
                create_time=ts(T0),
                pkcs11_uri="pkcs11:token=signer;object=x",
            )
        ],
    )


class FakeClient:
    """Stands in for SignerClient; configured per test through ``FakeClient.behaviour``."""

    behaviour: ClassVar[dict[str, Any]] = {}
    instances: ClassVar[list[FakeClient]] = []

    def __init__(self, address: str = DEFAULT_ADDRESS, tls: ClientTLS | None = None) -> None:
        self.address = address
        self.tls = tls
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.closed = False
        FakeClient.instances.append(self)

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True

    def _do(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((method, args, kwargs))
        value = self.behaviour.get(method)
        if isinstance(value, BaseException):
            raise value
        return value

    def create_key(self, *a: Any, **k: Any) -> Any:
        return self._do("create_key", *a, **k)

    def get_key(self, *a: Any, **k: Any) -> Any:
        return self._do("get_key", *a, **k)

    def iter_keys(self, *a: Any, **k: Any) -> Any:
        return iter(self._do("iter_keys", *a, **k) or [])

    def public_key(self, *a: Any, **k: Any) -> Any:
        return self._do("public_key", *a, **k)

    def rotate(self, *a: Any, **k: Any) -> Any:
        return self._do("rotate", *a, **k)

    def set_primary(self, *a: Any, **k: Any) -> Any:
        return self._do("set_primary", *a, **k)

    def disable(self, *a: Any, **k: Any) -> Any:
        return self._do("disable", *a, **k)

    def enable(self, *a: Any, **k: Any) -> Any:
        return self._do("enable", *a, **k)

    def schedule_destruction(self, *a: Any, **k: Any) -> Any:
        return self._do("schedule_destruction", *a, **k)

    def cancel_destruction(self, *a: Any, **k: Any) -> Any:
        return self._do("cancel_destruction", *a, **k)

    def sign(self, *a: Any, **k: Any) -> Any:
        return self._do("sign", *a, **k)

    def verify(self, *a: Any, **k: Any) -> Any:
        return self._do("verify", *a, **k)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    monkeypatch.setattr(FakeClient, "behaviour", {})
    monkeypatch.setattr(FakeClient, "instances", [])
    monkeypatch.setattr(_calls, "SignerClient", FakeClient)
    return FakeClient


def only_call(fake: type[FakeClient]) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    (client,) = fake.instances
    assert client.closed
    (call,) = client.calls
    return call


# --- parser -----------------------------------------------------------------------------------


def parse(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


def test_keys_create() -> None:
    a = parse("keys", "create", "payments", "--algorithm", "ec-p256")
    assert (a.command, a.keys_command, a.name, a.algorithm) == (
        "keys",
        "create",
        "payments",
        "ec-p256",
    )
    assert (a.scope, a.label, a.address) == ("", [], DEFAULT_ADDRESS)
    assert a.func is _calls.cmd_keys_create
    a = parse(
        "keys",
        "create",
        "p",
        "--algorithm",
        "ed25519",
        "--scope",
        "s",
        "--label",
        "a=b",
        "--label",
        "c=d",
    )
    labels = [x if isinstance(x, tuple) else label(x) for x in a.label]
    assert (a.scope, labels) == ("s", [("a", "b"), ("c", "d")])


def test_keys_create_needs_known_algorithm(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        parse("keys", "create", "p", "--algorithm", "dsa")
    assert ei.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("keys", "create", "p")


def test_keys_list_show_rotate() -> None:
    a = parse("keys", "list")
    assert (a.keys_command, a.json, a.address, a.func) == (
        "list",
        False,
        DEFAULT_ADDRESS,
        _calls.cmd_keys_list,
    )
    assert parse("keys", "list", "--json").json is True
    a = parse("keys", "show", "payments")
    assert (a.name, a.address, a.func) == ("payments", DEFAULT_ADDRESS, _calls.cmd_keys_show)
    a = parse("keys", "rotate", "payments", "--address", "10.0.0.1:9")
    assert (a.name, a.address, a.func) == ("payments", "10.0.0.1:9", _calls.cmd_keys_rotate)


@pytest.mark.parametrize("fmt", ["pem", "jwk"])
def test_keys_public(fmt: str) -> None:
    a = parse("keys", "public", "payments", "--format", fmt)
    assert (a.name, a.format, a.version, a.out, a.address) == (
        "payments",
        fmt,
        0,
        None,
        DEFAULT_ADDRESS,
    )
    assert parse("keys", "public", "payments").format == "pem"
    with pytest.raises(SystemExit):
        parse("keys", "public", "payments", "--format", "der")


def test_keys_version_ops() -> None:
    a = parse("keys", "schedule-destruction", "k", "2", "--waiting-period", "86400")
    assert (a.op, a.name, a.version, a.waiting_period) == ("schedule-destruction", "k", 2, 86400)
    for op in ("disable", "enable", "cancel-destruction"):
        a = parse("keys", op, "k", "3")
        assert (a.op, a.version, a.waiting_period, a.func) == (op, 3, 0, _calls.cmd_keys_version_op)
    a = parse("keys", "set-primary", "k", "4")
    assert (a.version, a.func) == (4, _calls.cmd_keys_set_primary)


def test_sign_forms() -> None:
    a = parse("sign", "payments", "--in", "msg.bin", "--out", "sig.der")
    assert (a.command, a.name, a.infile, a.out) == ("sign", "payments", "msg.bin", "sig.der")
    assert (a.digest, a.version, a.format, a.padding, a.address) == (
        False,
        0,
        "der",
        "pss",
        DEFAULT_ADDRESS,
    )
    assert a.func is _calls.cmd_sign
    a = parse(
        "sign",
        "p",
        "--in",
        "-",
        "--out",
        "s",
        "--digest",
        "--version",
        "3",
        "--format",
        "raw",
        "--padding",
        "pkcs1v15",
    )
    assert (a.infile, a.digest, a.version, a.format, a.padding) == ("-", True, 3, "raw", "pkcs1v15")
    with pytest.raises(SystemExit):
        parse("sign", "p", "--in", "f")  # --out is required


def test_verify_forms() -> None:
    a = parse("verify", "payments", "--in", "msg.bin", "--signature", "sig.der")
    assert (a.command, a.name, a.infile, a.signature) == (
        "verify",
        "payments",
        "msg.bin",
        "sig.der",
    )
    assert (a.digest, a.version, a.address, a.func) == (
        False,
        0,
        DEFAULT_ADDRESS,
        _calls.cmd_verify,
    )
    with pytest.raises(SystemExit):
        parse("verify", "p", "--in", "f")  # --signature is required


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for command in ("hsm", "serve", "run", "keys", "sign", "verify"):
        assert f"\n    {command} " in out, command


def test_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main([])
    assert ei.value.code == 2
    assert "required" in capsys.readouterr().err


# --- main() with a fake client -----------------------------------------------------------------


def test_service_error_exit_2(fake: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    fake.behaviour["get_key"] = NotFound("key 'ghost' not found")
    assert main(["keys", "show", "ghost", "--address", "127.0.0.1:7"]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.err == "error: NOT_FOUND: key 'ghost' not found\n"
    assert captured.out == ""
    assert fake.instances[0].address == "127.0.0.1:7"
    assert fake.instances[0].closed


def test_unavailable_exit_2(fake: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    fake.behaviour["iter_keys"] = Unavailable("connection refused")
    assert main(["keys", "list"]) == EXIT_ERROR
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: connection refused")


def test_keys_create_prints_key(fake: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    fake.behaviour["create_key"] = pb_key()
    rc = main(
        [
            "keys",
            "create",
            "payments",
            "--algorithm",
            "ec-p256",
            "--scope",
            "team",
            "--label",
            "env=prod",
            "--label",
            "x=a=b",
        ]
    )
    assert rc == EXIT_OK
    assert only_call(fake) == (
        "create_key",
        ("payments", "ec-p256", "team", {"env": "prod", "x": "a=b"}),
        {},
    )
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "payments"
    assert out["created"] == "2026-01-01T00:00:00Z"
    assert out["labels"] == {"env": "prod"}
    assert out["versions"] == [
        {
            "version": 1,
            "state": "enabled",
            "created": "2026-01-01T00:00:00Z",
            "pkcs11_uri": "pkcs11:token=signer;object=x",
        }
    ]


def test_keys_create_bad_label_is_usage_error(
    fake: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    fake.behaviour["create_key"] = pb_key()
    rc: int | str | None
    try:
        rc = main(["keys", "create", "payments", "--algorithm", "ec-p256", "--label", "novalue"])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert all(not c.calls for c in fake.instances)


def test_keys_list_table_and_json(
    fake: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    fake.behaviour["iter_keys"] = [pb_key("alpha"), pb_key("beta")]
    assert main(["keys", "list"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ALGORITHM", "PRIMARY", "VERSIONS", "SCOPE"]
    assert lines[1].split() == ["alpha", "ec-p256", "1", "1", "team"]
    assert lines[2].split()[0] == "beta"
    assert main(["keys", "list", "--json"]) == EXIT_OK
    assert [k["name"] for k in json.loads(capsys.readouterr().out)] == ["alpha", "beta"]


@pytest.mark.parametrize(
    ("fmt", "expected"), [("pem", "-----BEGIN PUBLIC KEY-----\n"), ("jwk", '{"kty": "EC"}\n')]
)
def test_keys_public_output(
    fake: type[FakeClient],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    fmt: str,
    expected: str,
) -> None:
    fake.behaviour["public_key"] = pb.PublicKey(
        name="k", version=2, pem="-----BEGIN PUBLIC KEY-----\n", jwk='{"kty": "EC"}'
    )
    assert main(["keys", "public", "k", "--format", fmt, "--version", "2"]) == EXIT_OK
    assert capsys.readouterr().out == expected
    assert fake.instances[0].calls == [("public_key", ("k", 2, fmt), {})]
    out = tmp_path / "pub"
    assert main(["keys", "public", "k", "--format", fmt, "--out", str(out)]) == EXIT_OK
    assert out.read_text() == expected
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("now", [False, True])
def test_keys_rotate_prints_the_pending_next_version(
    fake: type[FakeClient], capsys: pytest.CaptureFixture[str], now: bool
) -> None:
    """Issue 17: in an issuer's scope the new version becomes primary after a lead time; the key
    printed says which and when (and --now asks for it at once)."""
    key = pb_key()
    key.versions.add(name="payments", version=2, algorithm="ec-p256", state=pb.ENABLED)
    key.next_primary_version = 2
    key.next_primary_time.CopyFrom(ts(T0 + timedelta(hours=1)))
    fake.behaviour["rotate"] = key
    assert main(["keys", "rotate", "payments", *(["--now"] if now else [])]) == EXIT_OK
    assert only_call(fake) == ("rotate", ("payments",), {"now": now})
    out = json.loads(capsys.readouterr().out)
    assert (out["primary_version"], out["next_primary_version"], out["next_primary_time"]) == (
        1,
        2,
        "2026-01-01T01:00:00Z",
    )


def test_keys_show_has_no_next_version_without_one(
    fake: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    fake.behaviour["get_key"] = pb_key()
    assert main(["keys", "show", "payments"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert "next_primary_version" not in out
    assert "next_primary_time" not in out


def test_keys_version_op_calls(fake: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    v = pb.KeyVersion(name="k", version=2, state=pb.DESTRUCTION_SCHEDULED, destroy_time=ts(T0))
    fake.behaviour["schedule_destruction"] = v
    assert main(["keys", "schedule-destruction", "k", "2", "--waiting-period", "90000"]) == EXIT_OK
    assert only_call(fake) == ("schedule_destruction", ("k", 2, 90000), {})
    assert json.loads(capsys.readouterr().out) == {
        "name": "k",
        "version": 2,
        "state": "destruction_scheduled",
        "destroy_time": "2026-01-01T00:00:00Z",
    }
    fake.behaviour["disable"] = pb.KeyVersion(name="k", version=1, state=pb.DISABLED)
    assert main(["keys", "disable", "k", "1"]) == EXIT_OK
    assert fake.instances[-1].calls == [("disable", ("k", 1), {})]
    assert json.loads(capsys.readouterr().out)["state"] == "disabled"


def test_sign_writes_signature(
    fake: type[FakeClient], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    infile, out = tmp_path / "msg", tmp_path / "sig"
    infile.write_bytes(b"hello")
    fake.behaviour["sign"] = Signature(b"\x30\x01sig", 3, "ec-p256", "ECDSA-SHA256")
    assert main(["sign", "k", "--in", str(infile), "--out", str(out), "--version", "3"]) == EXIT_OK
    assert out.read_bytes() == b"\x30\x01sig"
    assert only_call(fake) == (
        "sign",
        ("k",),
        {"version": 3, "signature_format": "der", "rsa_padding": "pss", "message": b"hello"},
    )
    report = json.loads(capsys.readouterr().err)
    assert report == {
        "name": "k",
        "version": 3,
        "algorithm": "ec-p256",
        "signature_algorithm": "ECDSA-SHA256",
        "out": str(out),
    }


def test_sign_digest_from_stdin(
    fake: type[FakeClient], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("sys.stdin", SimpleNamespace(buffer=io.BytesIO(b"\x01" * 32)))
    fake.behaviour["sign"] = Signature(b"s", 1, "rsa-2048", "RSASSA-PKCS1-v1_5-SHA256")
    out = tmp_path / "sig"
    argv = [
        "sign",
        "k",
        "--in",
        "-",
        "--out",
        str(out),
        "--digest",
        "--padding",
        "pkcs1v15",
        "--format",
        "raw",
    ]
    assert main(argv) == EXIT_OK
    _, _, kwargs = only_call(fake)
    assert kwargs == {
        "version": 0,
        "signature_format": "raw",
        "rsa_padding": "pkcs1v15",
        "digest": b"\x01" * 32,
    }


@pytest.mark.parametrize(
    ("valid", "rc", "word"), [(True, EXIT_OK, "valid"), (False, EXIT_INVALID, "INVALID")]
)
def test_verify_exit_codes(
    fake: type[FakeClient],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    valid: bool,
    rc: int,
    word: str,
) -> None:
    infile, sig = tmp_path / "msg", tmp_path / "sig"
    infile.write_bytes(b"hello")
    sig.write_bytes(b"signature-bytes")
    fake.behaviour["verify"] = valid
    assert main(["verify", "k", "--in", str(infile), "--signature", str(sig)]) == rc
    assert capsys.readouterr().err == word + "\n"
    assert only_call(fake) == (
        "verify",
        ("k", b"signature-bytes"),
        {"version": 0, "signature_format": "der", "rsa_padding": "pss", "message": b"hello"},
    )


def test_missing_input_file_exit_2(
    fake: type[FakeClient], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.bin"
    assert main(["sign", "k", "--in", str(missing), "--out", str(tmp_path / "s")]) == EXIT_ERROR
    assert capsys.readouterr().err == f"error: No such file or directory: {missing}\n"
    assert all(not c.calls for c in fake.instances)
    assert main(["verify", "k", "--in", str(missing), "--signature", str(missing)]) == EXIT_ERROR
    assert "No such file or directory" in capsys.readouterr().err


def test_mtls_flags_reach_the_client_and_half_of_them_is_an_error(
    fake: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["keys", "list", "--address", "127.0.0.1:50051"]
    tls = ["--tls-ca", "ca.pem", "--tls-cert", "me.pem", "--tls-key", "me.key"]
    assert main([*argv, *tls]) == EXIT_OK
    (client,) = fake.instances
    assert client.address == "127.0.0.1:50051"
    assert client.tls == ClientTLS("ca.pem", "me.pem", "me.key")

    assert main([*argv, "--tls-ca", "ca.pem"]) == EXIT_ERROR
    assert "mTLS needs all of --tls-ca, --tls-cert and --tls-key" in capsys.readouterr().err


def test_address_and_tls_files_default_from_the_environment(
    fake: type[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGNER_ADDRESS", "unix:/run/signer.sock")
    for what in ("CA", "CERT", "KEY"):
        monkeypatch.setenv(f"SIGNER_TLS_{what}", f"{what.lower()}.pem")
    assert main(["keys", "list"]) == EXIT_OK
    (client,) = fake.instances
    assert client.address == "unix:/run/signer.sock"
    assert client.tls == ClientTLS("ca.pem", "cert.pem", "key.pem")


# --- wrapped import and adoption ------------------------------------------------------------


def test_cli_forms() -> None:
    a = parse(
        "keys",
        "import",
        "k",
        "--algorithm",
        "ec-p256",
        "--in",
        "key.pem",
        "--scope",
        "s",
        "--label",
        "a=b",
    )
    assert (a.func, a.name, a.algorithm, a.infile, a.scope, a.label) == (
        _calls.cmd_keys_import,
        "k",
        "ec-p256",
        "key.pem",
        "s",
        [("a", "b")],
    )
    a = parse("keys", "adopt", "k", "--algorithm", "rsa-2048", "--id", "0A0b", "--config", "c.toml")
    assert (a.func, a.id, a.config, a.scope) == (_host.cmd_keys_adopt, b"\x0a\x0b", "c.toml", "")
    a = parse("hsm", "import-key", "--dir", "d", "--in", "k.pem", "--label", "l", "--id", "ff")
    assert (a.func, a.dir, a.infile, a.label, a.id, a.token) == (
        _host.cmd_hsm_import_key,
        "d",
        "k.pem",
        "l",
        b"\xff",
        "signer",
    )


@pytest.mark.parametrize("bad", ["xyz", "", "0", "00" * 65])
def test_cli_refuses_a_bad_id(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("hsm", "import-key", "--in", "k.pem", "--label", "l", "--id", bad)
    assert exc.value.code == 2
    assert "must be 1 to 64 bytes in hex" in capsys.readouterr().err


def test_keys_import_reads_the_pem_and_calls_import_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[Any, ...]] = []

    class Client:
        def __init__(self, address: str, tls: object = None) -> None:
            self.address = address

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def import_key(self, *args: Any, **kwargs: Any) -> pb.Key:
            calls.append((self.address, args, kwargs))
            return pb.Key(name="k", algorithm="ec-p256", primary_version=1)

    monkeypatch.setattr(_calls, "SignerClient", Client)
    (tmp_path / "key.pem").write_bytes(b"PEM BYTES")
    rc = main(
        [
            "keys",
            "import",
            "k",
            "--algorithm",
            "ec-p256",
            "--in",
            str(tmp_path / "key.pem"),
            "--address",
            "h:1",
        ]
    )
    assert rc == EXIT_OK
    assert calls == [("h:1", ("k", "ec-p256", b"PEM BYTES"), {"scope": "", "labels": {}})]
    assert '"primary_version": 1' in capsys.readouterr().out


@pytest.mark.parametrize("command", ["verify", "archive"])
@pytest.mark.parametrize(
    ("db", "why"),
    [
        ("postgresql://signer:hunter2@db/audit", "--db must not carry the database's password"),
        ("host=db dbname=audit password=hunter2", "--db looks like a libpq key=value string"),
    ],
)
def test_audit_log_db_is_checked_as_store_path_is(
    command: str, db: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--db goes through the check store.path does (REVIEW.md 8): a password given on the
    command line is refused, naming --db, and never echoed back (before: accepted, the key=value
    string taken as a file, and the location printed whole)."""
    extra = ["--older-than-days", "1"] if command == "archive" else []
    assert main(["audit-log", command, "--db", db, *extra]) == EXIT_ERROR
    out = capsys.readouterr()
    assert why in out.err
    assert "hunter2" not in out.err + out.out
