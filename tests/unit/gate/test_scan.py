"""signer.gate._scan: the scan child as the handler runs it (``scan(cfg, core)``, forked, within
its budget), on small synthetic ELF cores. The budget of a sparse core, public keys in
directories of the same name, what ``detect.structural = false`` turns off, and a sanitised
copy that would fill the disk."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signer.gate import GateConfig, build_scanner
from signer.gate._config import GIB
from signer.gate._scan import data_bytes, public_keys, scan
from signer.scan._blind import default_workers
from tests.unit.gate.kit import core, ec_scalar, pem, public_pem

MB = 10**6


def config(**kw: object) -> GateConfig:
    """A budget no test's scan comes near, unless the test is about the budget."""
    values: dict[str, object] = {"min_scan_seconds": 120.0, "min_free_bytes": 0}
    values.update(kw)
    return GateConfig(**values)  # type: ignore[arg-type]


def quarantined(tmp_path: Path, data: bytes) -> Path:
    """``data`` as the handler stores it: ``core`` in an entry directory of its own."""
    entry = tmp_path / "q" / "entry"
    entry.mkdir(parents=True)
    path = entry / "core"
    path.write_bytes(data)
    return path


def report_ids(path: Path) -> set[str]:
    doc = json.loads(path.with_name("report.json").read_text())
    return {f["secret_id"] for f in doc["findings"]}


@pytest.fixture(scope="module")
def keys() -> list[ec.EllipticCurvePrivateKey]:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]


# --- the budget --------------------------------------------------------------------------------


def test_a_sparse_cores_budget_is_that_of_its_data_not_its_length(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    path = entry / "core"
    with open(path, "wb") as f:
        f.write(os.urandom(10 * MB))
        f.truncate(16 * GIB)
    try:
        os.lseek(os.open(path, os.O_RDONLY), 0, os.SEEK_HOLE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP):
            pytest.skip("no SEEK_HOLE here")
        raise
    if os.stat(path).st_blocks * 512 > GIB:
        pytest.skip("this file system does not keep holes")
    data = data_bytes(path)
    assert 10 * MB <= data < 11 * MB
    cfg = config(min_scan_seconds=1.0, seconds_per_gib=3000.0)
    out = scan(cfg, path)
    assert (out.status, out.findings, out.complete) == ("done", 0, True), out
    # 3000 s per GiB of 10 MB: 28 s. Of the length, 16 GiB: 48000 s (13 hours) to wait for.
    assert out.budget_seconds == pytest.approx(cfg.budget_seconds(data))
    assert out.budget_seconds < 30


def test_a_core_without_holes_is_counted_whole(tmp_path: Path) -> None:
    path = quarantined(tmp_path, core(size=3 << 20))
    assert data_bytes(path) == os.stat(path).st_size


# --- public keys -------------------------------------------------------------------------------


def test_key_directories_of_the_same_name_are_both_searched(
    tmp_path: Path, keys: list[ec.EllipticCurvePrivateKey]
) -> None:
    dirs = [tmp_path / "etc" / team / "keys" for team in ("a", "b")]
    for d, key in zip(dirs, keys, strict=True):
        d.mkdir(parents=True)
        (d / "signing.pem").write_bytes(public_pem(key))
    cfg = config(public_keys=tuple(dirs), structural=False)
    names = {str(d / "signing.pem") for d in dirs}
    assert set(public_keys(cfg)) == names  # were both "keys/signing.pem": one key was lost
    path = quarantined(tmp_path, core(*(ec_scalar(k) for k in keys)))
    out = scan(cfg, path)
    assert (out.status, out.findings) == ("done", 2), out
    assert report_ids(path) == names


def test_a_key_file_listed_twice_is_one_key(
    tmp_path: Path, keys: list[ec.EllipticCurvePrivateKey]
) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "signing.pem").write_bytes(public_pem(keys[0]))
    cfg = config(public_keys=(tmp_path / "keys", tmp_path / "keys" / "signing.pem"))
    assert list(public_keys(cfg)) == [str(tmp_path / "keys" / "signing.pem")]


# --- detect.structural -------------------------------------------------------------------------


def test_structural_off_reports_only_keys_of_the_configured_public_keys(
    tmp_path: Path, keys: list[ec.EllipticCurvePrivateKey]
) -> None:
    ours, theirs = keys
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ours.pem").write_bytes(public_pem(ours))
    data = core(pem(ours), pem(theirs))

    on = quarantined(tmp_path / "on", data)
    out = scan(config(public_keys=(tmp_path / "keys",), structural=True), on)
    assert out.status == "done", out
    ids = report_ids(on)
    assert str(tmp_path / "keys" / "ours.pem") in ids
    assert any(i.startswith("unknown") for i in ids), ids  # theirs, found structurally

    off = quarantined(tmp_path / "off", data)
    out = scan(config(public_keys=(tmp_path / "keys",), structural=False), off)
    assert (out.status, out.findings) == ("done", 1), out
    # Ours in PEM is found all the same: the structural detectors find it for blind mode.
    assert report_ids(off) == {str(tmp_path / "keys" / "ours.pem")}
    assert any("detect.structural is off: 1 private-key structure" in n for n in out.notes)
    # The sanitised copy overwrites ours, keeps theirs, and its re-scan agrees.
    assert out.sanitised["state"] == "verified", out.sanitised
    copy = off.with_name("core.sanitised").read_bytes()
    assert pem(ours) not in copy
    assert pem(theirs) in copy


def test_structural_off_and_no_public_keys_is_no_blind_mode(tmp_path: Path) -> None:
    pin = tmp_path / "user.pin"
    pin.write_text("8412-7730-5519\n")
    assert build_scanner(config(secrets=(pin,), structural=False)).public_keys is None
    assert build_scanner(config(secrets=(pin,), structural=True)).public_keys is not None


def test_blind_offsets_reach_the_scanner(tmp_path: Path) -> None:
    pin = tmp_path / "user.pin"
    pin.write_bytes(b"0123456789abcdef0123456789abcdef")
    default = build_scanner(config(secrets=(pin,)))
    assert (default.blind_offsets, default.blind_workers) == ("every", default_workers())
    likely = config(secrets=(pin,), blind_offsets="likely", blind_workers=3)
    for cfg in (likely, replace(likely, structural=False)):
        assert (build_scanner(cfg).blind_offsets, build_scanner(cfg).blind_workers) == ("likely", 3)


# --- the sanitised copy ------------------------------------------------------------------------


@pytest.mark.parametrize(("min_free", "state"), [(0, "verified"), (1 << 60, "skipped")])
def test_the_sanitised_copy_keeps_min_free_bytes(
    tmp_path: Path, keys: list[ec.EllipticCurvePrivateKey], min_free: int, state: str
) -> None:
    (tmp_path / "key.pem").write_bytes(pem(keys[0]))
    path = quarantined(tmp_path, core(ec_scalar(keys[0])))
    out = scan(config(secrets=(tmp_path / "key.pem",), min_free_bytes=min_free), path)
    assert (out.status, out.findings) == ("done", 1), out
    assert out.sanitised["state"].split(":")[0] == state, out.sanitised
    assert path.with_name("core.sanitised").exists() == (state == "verified")
    if state == "skipped":
        assert "min_free_bytes" in out.sanitised["state"]
        assert path.exists()  # the core itself is kept: the decision is the scan's


# --- the child ---------------------------------------------------------------------------------


def test_the_scan_child_is_the_oom_killers_first_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile core's memory pressure takes the scan child (the dump stays in quarantine),
    not the signer service: the child's oom_score_adj is 1000 from its start; the handler's is
    left as it was."""
    from signer.gate import _scan

    def child(cfg: GateConfig, core: Path, deadline: float, out: int) -> None:
        seen = Path("/proc/self/oom_score_adj").read_text().strip()
        message = {"findings": 0, "complete": True, "incomplete": None, "over_budget": False}
        os.write(
            out, (json.dumps({"scan": {**message, "notes": [seen], "seconds": 0}}) + "\n").encode()
        )

    monkeypatch.setattr(_scan, "_child", child)  # the forked child runs this in its place
    mine = Path("/proc/self/oom_score_adj").read_text()
    done = scan(config(), quarantined(tmp_path, b"\1" * 4096))
    assert (done.status, done.notes) == ("done", ["1000"])
    assert Path("/proc/self/oom_score_adj").read_text() == mine
