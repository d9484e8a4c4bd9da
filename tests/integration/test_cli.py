"""The `signer` command line against a real service, and `signer run` as `make run` uses it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from signer._internal import config as config_mod
from tests.conftest import (
    SIGNER_BIN,
    RunningService,
    TokenHostHandle,
    UniqueName,
    free_port,
    health_status,
    signer_cli,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_readme_round_trip_with_cli_and_openssl(
    service: RunningService, unique_name: UniqueName, tmp_path: Path
) -> None:
    """The README's sign/verify walk-through, command by command."""
    name = unique_name("cli")
    addr = service.address
    r = signer_cli("keys", "create", name, "--algorithm", "ec-p256", address=addr, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["primary_version"] == 1

    (tmp_path / "hello.txt").write_text("hello, signer\n")
    r = signer_cli(
        "sign", name, "--in", "hello.txt", "--out", "hello.sig", address=addr, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    r = signer_cli(
        "verify", name, "--in", "hello.txt", "--signature", "hello.sig", address=addr, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr

    r = signer_cli("keys", "public", name, "--out", "pub.pem", address=addr, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ossl = subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha256",
            "-verify",
            "pub.pem",
            "-signature",
            "hello.sig",
            "hello.txt",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ossl.returncode == 0, ossl.stdout + ossl.stderr
    assert "Verified OK" in ossl.stdout

    # A tampered message: exit 1, not an error.
    (tmp_path / "evil.txt").write_text("hello, signer!\n")
    r = signer_cli(
        "verify", name, "--in", "evil.txt", "--signature", "hello.sig", address=addr, cwd=tmp_path
    )
    assert r.returncode == 1
    assert "INVALID" in r.stderr


def test_cli_digest_version_rotate_list_show_jwk(
    service: RunningService, unique_name: UniqueName, tmp_path: Path
) -> None:
    import hashlib

    name = unique_name("cli")
    addr = service.address
    assert (
        signer_cli(
            "keys", "create", name, "--algorithm", "ec-p384", address=addr, cwd=tmp_path
        ).returncode
        == 0
    )
    r = signer_cli("keys", "rotate", name, address=addr, cwd=tmp_path)
    assert json.loads(r.stdout)["primary_version"] == 2
    (tmp_path / "d.bin").write_bytes(hashlib.sha384(b"x").digest())
    r = signer_cli(
        "sign",
        name,
        "--in",
        "d.bin",
        "--out",
        "d.sig",
        "--digest",
        "--version",
        "1",
        address=addr,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stderr)["version"] == 1
    r = signer_cli(
        "verify",
        name,
        "--in",
        "d.bin",
        "--signature",
        "d.sig",
        "--digest",
        "--version",
        "1",
        address=addr,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    # Version 2 did not make that signature.
    r = signer_cli(
        "verify",
        name,
        "--in",
        "d.bin",
        "--signature",
        "d.sig",
        "--digest",
        address=addr,
        cwd=tmp_path,
    )
    assert r.returncode == 1

    r = signer_cli("keys", "list", address=addr, cwd=tmp_path)
    assert name in r.stdout
    shown = json.loads(signer_cli("keys", "show", name, address=addr, cwd=tmp_path).stdout)
    assert [v["state"] for v in shown["versions"]] == ["enabled", "enabled"]
    assert shown["versions"][0]["pkcs11_uri"].startswith("pkcs11:token=signer;object=")
    jwk = json.loads(
        signer_cli("keys", "public", name, "--format", "jwk", address=addr, cwd=tmp_path).stdout
    )
    assert (jwk["kty"], jwk["crv"], jwk["kid"]) == ("EC", "P-384", f"{name}/2")


def test_cli_errors_exit_2_with_status_and_message(service: RunningService, tmp_path: Path) -> None:
    (tmp_path / "m").write_text("m")
    r = signer_cli(
        "sign", "no-such-key", "--in", "m", "--out", "s", address=service.address, cwd=tmp_path
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "error: NOT_FOUND: key 'no-such-key' not found"
    r = signer_cli(
        "sign", "k", "--in", "missing-file", "--out", "s", address=service.address, cwd=tmp_path
    )
    assert r.returncode == 2
    assert "missing-file" in r.stderr


def test_signer_help_lists_every_command() -> None:
    out = subprocess.run([str(SIGNER_BIN), "--help"], capture_output=True, text=True).stdout
    for command in ("hsm", "serve", "run", "keys", "sign", "verify"):
        assert command in out


@pytest.mark.slow
def _scrape(address: str) -> dict[tuple[str, str, str], float]:
    """signer_rpc_calls_total from the metrics listener at ``address``, by (rpc, code, caller)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.labels["rpc"], s.labels["code"], s.labels["caller"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "signer_rpc_calls_total"
    }


def test_signer_run_starts_everything_and_ctrl_c_stops_it(
    tmp_path: Path, token_host: TokenHostHandle
) -> None:
    """`make run` in miniature: fresh directory; token host, service on its Unix socket, mTLS
    front, demo key; both ways in work; then SIGINT stops all of it."""
    addr = f"127.0.0.1:{free_port()}"
    # Not make run's 127.0.0.1:9464 and 8443, which a developer's own make run may hold.
    metrics = ["--metrics-listen", f"127.0.0.1:{free_port()}"]
    metrics += ["--issuers-listen", f"127.0.0.1:{free_port()}"]
    state = tmp_path / "var"
    local = f"unix:{state / 'run' / 'signer.sock'}"
    proc = subprocess.Popen(
        [str(SIGNER_BIN), "run", "--dir", str(state), "--listen", addr, *metrics],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_until(lambda: _serving(local) or proc.poll() is not None, 60)
        assert proc.poll() is None, "signer run exited early"
        # Token files and PINs are owner-only; the service config names the PIN file only.
        assert (state / "hsm" / "user.pin").stat().st_mode & 0o777 == 0o600
        assert (state / "hsm" / "tls.pin").stat().st_mode & 0o777 == 0o600
        assert "pin_file" in (state / "signer.toml").read_text()
        (tmp_path / "m").write_text("demo")
        r = signer_cli("sign", "demo", "--in", "m", "--out", "s", address=local, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        tls = state / "tls"
        mtls = [
            "--tls-ca",
            str(tls / "ca.pem"),
            "--tls-cert",
            str(tls / "clients" / "dev.pem"),
            "--tls-key",
            str(tls / "clients" / "dev.key"),
        ]
        r = signer_cli(
            "verify", "demo", "--in", "m", "--signature", "s", *mtls, address=addr, cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        # Its metrics count each way in by its kind, never by who called.
        scraped = _scrape(metrics[1])
        assert scraped[("Sign", "OK", "local")] == 1
        assert scraped[("Verify", "OK", "mtls")] == 1
        hosts = _processes_mentioning(str(state / "hsm"))
        assert hosts, "the token host should be running"
        # As root the front runs as its own user, with its own directory outside var/.
        front = config_mod.load(state / "signer.toml").front.workdir
        assert _processes_mentioning(front), "the TLS front should be running"
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "service stopped" in output
    assert "token host stopped" in output
    assert "TLS front stopped" in output
    assert wait_until(lambda: not _processes_mentioning(str(state / "hsm")), 10)
    assert wait_until(lambda: not _processes_mentioning(front), 10)
    assert not Path(front).exists()  # the front's directory goes with it
    # A second start reuses the tokens, the certificates and the demo key.
    again = subprocess.Popen(
        [str(SIGNER_BIN), "run", "--dir", str(state), "--listen", addr, *metrics],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: _serving(local) or again.poll() is not None, 60)
        r = signer_cli(
            "verify", "demo", "--in", "m", "--signature", "s", *mtls, address=addr, cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
    finally:
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=30) == 0


def _serving(addr: str) -> bool:
    try:
        return health_status(addr) == "SERVING"
    except Exception:
        return False


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids
