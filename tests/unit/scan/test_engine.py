"""The search itself: chunk boundaries, random data, markers, the match limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from signer.errors import ScanError
from signer.scan import Scanner, _engine, secret_from_pin
from signer.scan._engine import PatternSet, escape, scan_chunks

from .conftest import PIN, Keys, Plant, random_bytes


def test_escape_keeps_nul_bytes() -> None:
    """python-hyperscan's literal API stops at NUL; escaped expressions do not."""
    ps = PatternSet([b"ab\x00cd\x00\x00ef"])
    hits, complete = scan_chunks(memoryview(b"--ab\x00cd\x00\x00ef--ab--"), [ps], 1 << 20)
    assert complete
    assert hits == [[(0, 2)]]
    assert escape(b"a\x00.") == b"a\\x00\\x2e"


@pytest.mark.parametrize("chunk", [7, 8, 9, 10, 11, 64, 4096])
def test_match_across_chunk_boundaries_found_exactly_once(chunk: int) -> None:
    lit = b"0123456789"
    data = b"".join(bytes([i]) * (3 + i % 5) + lit for i in range(40))
    expected = [(0, i) for i in range(len(data)) if data.startswith(lit, i)]
    hits, complete = scan_chunks(memoryview(data), [PatternSet([lit])], chunk)
    assert complete
    assert sorted(hits[0]) == expected


def test_overlapping_occurrences_all_found() -> None:
    hits, _ = scan_chunks(memoryview(b"aaaaaaaa"), [PatternSet([b"aaaaaa"])], 3)
    assert sorted(hits[0]) == [(0, 0), (0, 1), (0, 2)]


@pytest.mark.parametrize("start", [4096 - 40, 4096 - 16, 4096 - 1, 4096, 8192 - 100])
def test_scanner_finds_a_secret_across_a_chunk_boundary_once(
    keys: Keys, plant: Plant, start: int
) -> None:
    small = Scanner([s for s in keys.secrets() if s.id in ("ec-p384", "user-pin")], chunk_size=4096)
    d = keys.p384.private_numbers().private_value.to_bytes(48, "big")
    path = plant([(start, b"\xff" + d + b"\xff"), (20001, PIN)], None)
    got = [(f.secret_id, f.representation, f.offset, f.length) for f in small.scan(path).findings]
    assert got == [("ec-p384", "be", start + 1, 48), ("user-pin", "utf8", 20001, 32)]


def test_chunk_size_does_not_change_findings(keys: Keys, plant: Plant) -> None:
    p_le = keys.rsa2048.private_numbers().p.to_bytes(128, "little")
    # Each slice is followed by a byte that cannot continue it, so a random neighbour never
    # grows a match and the expected lengths are exact.
    items = [(i * 3001 + 1, p_le[: 20 + i] + bytes([p_le[20 + i] ^ 0xFF])) for i in range(15)]
    path = plant(items, None)
    secrets = [s for s in keys.secrets() if s.id == "rsa-2048"]
    small = Scanner(secrets, chunk_size=1000).scan(path).findings
    large = Scanner(secrets).scan(path).findings
    assert small == large
    assert [f.length for f in small] == [20 + i for i in range(15)]


def test_random_data_gives_no_finding(scanner: Scanner, tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(8 << 20))
    result = scanner.scan(path)
    assert result.findings == []
    assert (result.size, result.bytes_scanned, result.is_core) == (8 << 20, 8 << 20, False)
    assert result.patterns == scanner.pattern_count > 10_000
    assert result.complete


def test_markers_counted_in_the_same_pass(scanner: Scanner, plant: Plant) -> None:
    m1, m2 = b"marker-one-0123456789", b"marker-two-abcdefghij"
    small = Scanner([secret_from_pin(PIN, "pin")], chunk_size=1024)
    path = plant([(100, m1), (1024 - 5, m1), (50_000, m1 + PIN)], None)
    for sc in (scanner, small):
        result = sc.scan(path, markers={"m1": m1, "m2": m2})
        assert result.markers_found == {"m1": 3, "m2": 0}
        assert [f.offset for f in result.findings] == [50_000 + len(m1)]


def test_marker_too_short_refused(scanner: Scanner, plant: Plant) -> None:
    with pytest.raises(ScanError, match="marker 'm'"):
        scanner.scan(plant([], None), markers={"m": b"abc"})


def test_match_limit_makes_the_result_incomplete(
    monkeypatch: pytest.MonkeyPatch, plant: Plant
) -> None:
    monkeypatch.setattr(_engine, "MAX_HITS", 5)
    sc = Scanner([secret_from_pin(PIN, "pin")])
    result = sc.scan(plant([(i * 100, PIN) for i in range(10)], None))
    assert not result.complete
    assert any("INCOMPLETE" in n for n in result.notes)


def test_empty_file(scanner: Scanner, tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    result = scanner.scan(path, markers={"m": b"0123456789"})
    assert (result.size, result.findings, result.markers_found) == (0, [], {"m": 0})


def test_unreadable_file_raises(scanner: Scanner, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ScanError) as ei:
        scanner.scan(missing)
    assert ei.value.message == f"dump {missing}: No such file or directory"
    assert isinstance(ei.value.__cause__, FileNotFoundError)


def test_scanner_reusable_and_deterministic(scanner: Scanner, keys: Keys, plant: Plant) -> None:
    path = plant([(333, keys.ed25519.private_bytes_raw())], random_bytes(1 << 16, seed=9))
    assert scanner.scan(path).findings == scanner.scan(path).findings != []
