"""``signer scan``: exit codes 0/1/2, the table, JSON and SARIF outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import signer.scan as scan_api
from signer.cli.main import EXIT_ERROR, EXIT_INVALID, EXIT_OK, main
from signer.scan import Finding, ScanResult
from signer.scan.report import format_table, to_json, to_sarif

from .conftest import PIN, Keys, Plant, memory_like


@pytest.fixture
def files(tmp_path: Path, keys: Keys, plant: Plant) -> dict[str, Path]:
    key = tmp_path / "key.pem"
    key.write_bytes(
        keys.p256.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub = tmp_path / "key.pub"
    pub.write_bytes(
        keys.p256.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    pin = tmp_path / "user.pin"
    pin.write_bytes(PIN + b"\n")
    marker = tmp_path / "marker"
    marker.write_bytes(b"known-payload-0123456789")
    d = keys.p256.private_numbers().private_value.to_bytes(32, "big")
    dirty = plant([(1001, d), (3001, PIN), (5001, marker.read_bytes())], memory_like(1 << 16))
    clean = plant([(5001, marker.read_bytes())], memory_like(1 << 16))
    return {"key": key, "pub": pub, "pin": pin, "marker": marker, "dirty": dirty, "clean": clean}


def test_findings_exit_1_with_table_json_and_sarif(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json, out_sarif = tmp_path / "r.json", tmp_path / "r.sarif"
    rc = main(
        [
            "scan",
            str(files["dirty"]),
            "--secrets",
            str(files["key"]),
            str(files["pin"]),
            "--json",
            str(out_json),
            "--sarif",
            str(out_sarif),
            "--marker",
            f"payload={files['marker']}",
        ]
    )
    assert rc == EXIT_INVALID
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == [
        "SECRET",
        "COMPONENT",
        "REPRESENTATION",
        "OFFSET",
        "LENGTH",
        "ADDRESS",
        "MAPPING",
    ]
    assert lines[1].split() == ["key.pem", "private_value", "be", "0x3e9", "32", "-", "-"]
    assert lines[2].split() == ["user.pin", "pin", "utf8", "0xbb9", "32", "-", "-"]
    assert "2 findings" in err
    assert "markers payload=1" in err
    assert PIN.decode() not in out + err  # names, never values

    doc = json.loads(out_json.read_text())
    assert doc["path"] == str(files["dirty"])
    assert doc["clean"] is False
    assert doc["markers_found"] == {"payload": 1}
    assert doc["findings"][0] == {
        "secret_id": "key.pem",
        "component": "private_value",
        "representation": "be",
        "offset": 1001,
        "length": 32,
        "address": None,
        "mapping": None,
        "detail": "",
    }

    sarif = json.loads(out_sarif.read_text())
    assert sarif["version"] == "2.1.0"
    [run] = sarif["runs"]
    assert run["tool"]["driver"]["name"] == "signer-scan"
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == ["be", "utf8"]
    assert len(run["results"]) == 2
    loc = run["results"][0]["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == str(files["dirty"])
    assert loc["region"] == {"byteOffset": 1001, "byteLength": 32}
    assert run["results"][0]["ruleId"] == "be"
    assert run["results"][0]["properties"]["mapping"] is None
    assert "address" in run["results"][0]["properties"]


def test_clean_exit_0(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_sarif = tmp_path / "r.sarif"
    rc = main(
        ["scan", str(files["clean"]), "--secrets", str(files["key"]), "--sarif", str(out_sarif)]
    )
    assert rc == EXIT_OK
    out, err = capsys.readouterr()
    assert out == ""
    assert "scan: clean" in err
    sarif = json.loads(out_sarif.read_text())
    assert sarif["runs"][0]["results"] == []
    assert sarif["version"] == "2.1.0"


def test_blind_via_public_keys(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["scan", str(files["dirty"]), "--public-keys", str(files["pub"]), "--blind-budget", "5"]
    )
    assert rc == EXIT_INVALID
    out, _ = capsys.readouterr()
    assert "verified-ec-scalar" in out
    assert "d*G == Q of public key key.pub" in out


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_blind_workers_option_is_checked(
    files: dict[str, Path], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["scan", str(files["dirty"]), "--public-keys", str(files["pub"])]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--blind-workers", value])
    assert exc.value.code == 2
    assert f"{value!r} is not an integer from 1 to 64" in capsys.readouterr().err


def test_blind_offsets_option(files: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "out.json"
    pub = str(files["pub"])
    args = ["--public-keys", pub, "--blind-offsets", "likely", "--json", str(report)]
    main(["scan", str(files["dirty"]), *args])
    blind = json.loads(report.read_text())["blind"]
    assert blind["offsets"] == "likely"
    assert [c["name"] for c in blind["checks"]] == [
        "ec-scalar-le64-aligned",
        "ec-scalar-be-aligned-or-framed",
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["scan", "DUMP"],  # nothing to search for
        ["scan", "MISSING", "--secrets", "KEY"],  # unreadable dump
        ["scan", "DUMP", "--secrets", "MISSING"],  # unreadable secrets
        ["scan", "DUMP", "--secrets", "KEY", "--min-fragment", "3"],
        ["scan", "DUMP", "--secrets", "KEY", "--marker", "m=MISSING"],
    ],
)
def test_errors_exit_2(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    subst = {"DUMP": str(files["dirty"]), "KEY": str(files["key"]), "MISSING": str(tmp_path / "x")}
    argv = [next((a.replace(k, v) for k, v in subst.items() if k in a), a) for a in args]
    assert main(argv) == EXIT_ERROR
    assert capsys.readouterr().err.splitlines()[-1].startswith("error:")


def test_error_message_names_the_problem(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["scan", str(files["dirty"])]) == EXIT_ERROR
    assert "nothing to search for" in capsys.readouterr().err


def test_a_local_file_error_is_printed_without_a_status(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dump the scanner cannot use is the scanner's error, not the service's: ``error:`` and
    the message naming the file, no INVALID_ARGUMENT (issue 13), exit 2."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    missing = tmp_path / "missing"
    fifo_message = (
        f"dump {fifo} is a FIFO or pipe, not a regular file: save it to a file and scan that"
    )
    for dump, message in [
        (fifo, fifo_message),
        (missing, f"dump {missing}: No such file or directory"),
    ]:
        assert main(["scan", str(dump), "--secrets", str(files["key"])]) == EXIT_ERROR
        assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"
    assert main(["scan", str(files["dirty"]), "--secrets", str(missing)]) == EXIT_ERROR
    assert capsys.readouterr().err == f"error: secrets file {missing}: No such file or directory\n"


def test_several_dumps_table_and_json(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "r.json"
    rc = main(
        [
            "scan",
            str(files["dirty"]),
            str(files["clean"]),
            "--secrets",
            str(files["pin"]),
            "--json",
            str(out_json),
        ]
    )
    assert rc == EXIT_INVALID
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "DUMP"
    assert out[1].split()[0] == str(files["dirty"])
    docs = json.loads(out_json.read_text())
    assert [d["clean"] for d in docs] == [False, True]


def test_report_formats_addresses_in_hex() -> None:
    f = Finding("k", "d", "le64", 16, 256, 0x7F0000001000, "[heap]", "")
    r = ScanResult(Path("core"), 100, 90, 5, 0.1, [f], True)
    assert json.loads(to_json([r]))["findings"][0]["address"] == "0x7f0000001000"
    assert "0x7f0000001000  [heap]" in format_table([r])
    res = to_sarif([r])["runs"][0]["results"][0]
    assert res["properties"]["address"] == "0x7f0000001000"
    assert res["properties"]["mapping"] == "[heap]"
    assert format_table([ScanResult(Path("core"), 1, 1, 1, 0.1, [], False)]) == ""


def test_public_api_pinned() -> None:
    assert scan_api.__all__ == [
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
    for name in scan_api.__all__:
        assert hasattr(scan_api, name)


def test_scan_file_convenience(files: dict[str, Path]) -> None:
    secrets = scan_api.load_secrets([files["pin"]])
    result = scan_api.scan_file(files["dirty"], secrets)
    assert [(f.secret_id, f.offset) for f in result.findings] == [("user.pin", 3001)]


def test_a_clean_scan_that_did_not_finish_is_not_clean(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Blind mode out of its budget before it covered the dump: no finding in what it reached,
    but it proves nothing for the rest, so not "clean" and not exit 0: INCOMPLETE, exit 2 (it
    said "clean" and exited 0, the gate and sanitize already refusing such a result). The same
    dump with the budget it needs is clean, exit 0."""
    big = tmp_path / "big.raw"
    big.write_bytes(memory_like(16 << 20))
    args = ["scan", str(big), "--public-keys", str(files["pub"]), "--blind-budget"]
    assert main([*args, "0.001"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "INCOMPLETE" in err
    assert "scan: clean" not in err
    assert main([*args, "120"]) == EXIT_OK
    assert "scan: clean" in capsys.readouterr().err
