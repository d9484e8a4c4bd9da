"""Hostile files against the ELF reader and the scanner (issue 12).

The invariant, for every file an attacker may have shaped: a correct result (every secret whose
bytes are in the file is found; what cannot be trusted is said in the notes) or our clear error
(ScanError; ``signer scan`` exits 2 naming the problem, without a traceback). Never a
crash, never a hang, and memory within a stated bound: ``RSS_BOUND_MIB`` for a whole
``signer scan`` process, whatever the headers claim (terabytes, 2^32 program headers, a 4 GiB
hole).
"""

from __future__ import annotations

import os
import resource
import struct
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import targets
from fuzz.elfcore import Core, Load, build
from signer.errors import CoreFormatError, ScanError
from signer.scan import Scanner, ScanResult, secret_from_key, secret_from_pin
from signer.scan._elf import MAX_PROBLEMS, parse_core
from tests.unit.scan.cli import run_cli

from .conftest import PIN, random_bytes

RSS_BOUND_MIB = 256
"""What a ``signer scan`` process of these hostile files may hold: Python, Hyperscan, numpy and
cryptography take about 80 MiB; the rest is room, not a budget the scanner grows into."""
HEAP, LIB = 0x5555_5555_0000, 0x7F00_0000_0000


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def sc(ec_key: ec.EllipticCurvePrivateKey) -> Scanner:
    return Scanner([secret_from_key(ec_key, "ec"), secret_from_pin(PIN, "pin")])


def _scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


def two_segment_core(key: ec.EllipticCurvePrivateKey, is64: bool = True, big: bool = False) -> Core:
    """A heap holding the EC scalar at 0x100, a library mapping holding the PIN at 0x80."""
    heap = bytearray(random_bytes(0x1000, seed=11))
    heap[0x100 : 0x100 + 32] = _scalar(key)
    lib = bytearray(random_bytes(0x1000, seed=12))
    lib[0x80 : 0x80 + len(PIN)] = PIN
    heap_at, lib_at = (HEAP, LIB) if is64 else (0x5555_0000, 0x7F00_0000)
    return build(
        [Load(heap_at, bytes(heap)), Load(lib_at, bytes(lib))],
        [(lib_at, lib_at + 0x1000, "/usr/lib/libfake.so.1")],
        is64=is64,
        big_endian=big,
    )


def _write(tmp_path: Path, data: bytes, name: str = "core.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _found(result: ScanResult) -> set[str]:
    return {f.secret_id for f in result.findings}


@pytest.fixture(scope="module")
def pin_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "user.pin"
    path.write_bytes(PIN)
    return path


# --- the layouts a real core can have ---------------------------------------------------------


@pytest.mark.parametrize(
    ("is64", "big"), [(True, False), (True, True), (False, False), (False, True)]
)
def test_both_classes_and_byte_orders_are_read(
    is64: bool, big: bool, ec_key: ec.EllipticCurvePrivateKey, sc: Scanner, tmp_path: Path
) -> None:
    core = two_segment_core(ec_key, is64, big)
    result = sc.scan(_write(tmp_path, core.bytes()))
    assert result.is_core
    got = {(f.secret_id, f.offset - o) for f in result.findings for o in core.offsets}
    assert {("ec", 0x100), ("pin", 0x80)} <= got
    assert {f.mapping for f in result.findings} == {"anon", "/usr/lib/libfake.so.1"}


# --- truncated -------------------------------------------------------------------------------


def test_truncated_anywhere(
    ec_key: ec.EllipticCurvePrivateKey, sc: Scanner, tmp_path: Path
) -> None:
    """Cut at every 61st byte: in the ELF header, the program headers, the notes, the data.
    Whatever survives of a secret is found; the layout or the raw scan says what happened."""
    whole = two_segment_core(ec_key)
    data = whole.bytes()
    scalar_at, pin_at = whole.offsets[0] + 0x100, whole.offsets[1] + 0x80
    for cut in range(0, len(data), 61):
        part = data[:cut]
        try:
            layout = parse_core(part)
        except CoreFormatError:
            layout = None
        targets.elf(part)
        result = sc.scan(_write(tmp_path, part))
        assert ("ec" in _found(result)) == (cut >= scalar_at + 32), cut
        assert ("pin" in _found(result)) == (cut >= pin_at + len(PIN)), cut
        if layout is not None and cut < len(data):
            assert result.is_core
            assert any("file truncated" in n or "past the end" in n for n in result.notes), cut


def test_cut_inside_the_program_headers_keeps_those_read(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    core = two_segment_core(ec_key)
    cut = core.phoff + 2 * core.phentsize + 10  # the PT_NOTE and the heap's header, not the lib's
    layout = parse_core(core.bytes()[:cut])
    assert layout is not None
    assert [s.vaddr for s in layout.segments] == [HEAP]
    assert any("1 of 3 program headers lie past the end" in p for p in layout.problems)


# --- headers that lie ------------------------------------------------------------------------


def test_overlapping_segments_each_byte_one_address(
    ec_key: ec.EllipticCurvePrivateKey, sc: Scanner, tmp_path: Path
) -> None:
    """The library's header claims the heap's bytes: the first segment keeps them, the
    finding has one address, and memory is not counted twice."""
    core = two_segment_core(ec_key)
    core.phdr(2, offset=core.offsets[0])
    layout = parse_core(core.bytes())
    assert layout is not None
    assert layout.memory_bytes == 0x1000
    assert layout.address(core.offsets[0] + 0x100) == HEAP + 0x100
    assert any("claim the same file bytes" in p for p in layout.problems)
    result = sc.scan(_write(tmp_path, core.bytes()))
    [ec_finding] = [f for f in result.findings if f.secret_id == "ec"]
    assert ec_finding.address == HEAP + 0x100
    assert result.bytes_scanned <= result.size
    assert any("claim the same file bytes" in n for n in result.notes)


def test_segment_past_the_end_of_the_file(
    ec_key: ec.EllipticCurvePrivateKey, sc: Scanner, tmp_path: Path
) -> None:
    core = two_segment_core(ec_key)
    core.phdr(2, offset=1 << 40)
    result = sc.scan(_write(tmp_path, core.bytes()))
    assert result.is_core
    assert _found(result) == {"ec", "pin"}  # the PIN's bytes are still in the file
    [pin] = [f for f in result.findings if f.secret_id == "pin"]
    # No segment claims them any more: said, not guessed.
    assert (pin.address, pin.mapping) == (None, "[outside every segment]")
    assert any("4096 of its 4096 bytes are not in the file" in n for n in result.notes)


@pytest.mark.parametrize("field", ["filesz", "memsz"])
def test_terabyte_sizes_are_clipped_not_allocated(
    field: str, ec_key: ec.EllipticCurvePrivateKey, sc: Scanner, tmp_path: Path
) -> None:
    core = two_segment_core(ec_key)
    core.phdr(1, **{field: 1 << 42})
    core.phdr(2, **{field: (1 << 64) - 1})
    result = sc.scan(_write(tmp_path, core.bytes()))
    assert _found(result) == {"ec", "pin"}
    assert result.bytes_scanned <= result.size
    if field == "memsz":
        assert any("of mapped memory are not in the dump" in n for n in result.notes)


def test_two_to_the_32_program_headers_of_size_zero_is_refused_at_once() -> None:
    """PN_XNUM: the count is section 0's sh_info. With e_phentsize 0 the reader once walked
    2^32 headers at one offset (a hang and unbounded memory); now it refuses the header."""
    hdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        4,
        62,
        1,
        0,
        64,
        64,
        0,
        64,
        0,
        0xFFFF,
        64,
        1,
        0,
    )
    section0 = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0xFFFF_FFFF, 0, 0)
    began = time.monotonic()
    with pytest.raises(CoreFormatError, match="e_phentsize 0 is smaller than a program header"):
        parse_core(hdr + section0)
    assert time.monotonic() - began < 1


def test_more_program_headers_than_a_core_can_have(ec_key: ec.EllipticCurvePrivateKey) -> None:
    core = two_segment_core(ec_key)
    core.ehdr(phnum=0xFFFF, shoff=len(core.data))  # PN_XNUM: the count is in section 0
    core.data += struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 1 << 24, 0, 0)
    with pytest.raises(CoreFormatError, match="program headers claimed"):
        parse_core(core.bytes())


def test_many_note_headers_over_one_region_are_read_once(tmp_path: Path) -> None:
    """65534 PT_NOTE headers over one MiB of 12-byte notes: once 87k notes times 65534."""
    notes = struct.pack("<III", 0, 0, 1) * (1 << 16)
    phnum = 0xFFFE
    phoff = 64
    notes_at = phoff + phnum * 56
    hdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        4,
        62,
        1,
        0,
        phoff,
        0,
        0,
        64,
        56,
        phnum,
        0,
        0,
        0,
    )
    ph = struct.pack("<IIQQQQQQ", 4, 0, notes_at, 0, 0, len(notes), 0, 4)
    data = hdr + ph * phnum + notes
    began = time.monotonic()
    layout = parse_core(data)
    assert time.monotonic() - began < 10
    assert layout is not None
    assert len(layout.notes) == 1 << 16
    assert len(layout.problems) == MAX_PROBLEMS + 1  # 20 listed, the rest counted
    assert layout.problems[-1] == f"... and {phnum - 1 - MAX_PROBLEMS} more such problems"


@pytest.mark.parametrize("count", [2, 1 << 20, (1 << 64) - 1])
def test_nt_file_count_that_lies(
    count: int, ec_key: ec.EllipticCurvePrivateKey, sc: Scanner, tmp_path: Path
) -> None:
    """The note names one mapping but claims more: the mappings go unnamed, the core does not
    become unreadable (it once did: the whole file was then scanned without addresses)."""
    core = two_segment_core(ec_key).nt_file_count(count)
    layout = parse_core(core.bytes())
    assert layout is not None
    assert layout.files == []
    assert any(f"claims {count} entries" in p for p in layout.problems)
    result = sc.scan(_write(tmp_path, core.bytes()))
    assert {(f.secret_id, f.address) for f in result.findings} == {
        ("ec", HEAP + 0x100),
        ("pin", LIB + 0x80),
    }


def test_nt_file_of_a_million_empty_names_is_bounded() -> None:
    """Names are split at most count times: a note of NUL bytes is not a million names."""
    core = build([Load(HEAP, bytes(16))], [(HEAP, HEAP + 16, "x")])
    data = bytearray(core.bytes())
    # Grow the NT_FILE note (the last note) with 1 MiB of NULs: its size, the PT_NOTE's size.
    desc_size_at = core.nt_file_at - 8 - 12 + 4
    (old,) = struct.unpack_from("<I", data, desc_size_at)
    tail_at = core.nt_file_at + old
    data[tail_at:tail_at] = bytes(1 << 20)
    struct.pack_into("<I", data, desc_size_at, old + (1 << 20))
    core.data = data
    core.phdr(0, filesz=core.notes_size + (1 << 20))
    layout = parse_core(bytes(data))
    assert layout is not None
    assert [m.name for m in layout.files] == ["x"]


@pytest.mark.parametrize("ei_data", [0, 3, 255])
def test_unknown_byte_order_is_raw(
    ei_data: int, ec_key: ec.EllipticCurvePrivateKey, sc: Scanner, tmp_path: Path
) -> None:
    data = bytearray(two_segment_core(ec_key).bytes())
    data[5] = ei_data
    assert parse_core(bytes(data)) is None
    result = sc.scan(_write(tmp_path, bytes(data)))
    assert not result.is_core
    assert _found(result) == {"ec", "pin"}


# --- not cores at all ------------------------------------------------------------------------


def test_zero_length_file(sc: Scanner, tmp_path: Path, pin_file: Path) -> None:
    result = sc.scan(_write(tmp_path, b""))
    assert (result.size, result.findings, result.notes) == (0, [], ["empty file"])
    blind = Scanner([], public_keys=[ec.generate_private_key(ec.SECP256R1()).public_key()])
    assert blind.scan(tmp_path / "core.bin").blind is not None  # once None for an empty file
    code, err, _ = run_cli(tmp_path / "core.bin", "--secrets", pin_file)
    assert code == 0
    assert "note: empty file" in err


def test_non_elf_file_is_scanned_raw(sc: Scanner, tmp_path: Path) -> None:
    data = bytearray(random_bytes(8192, seed=3))
    data[4000 : 4000 + len(PIN)] = PIN
    result = sc.scan(_write(tmp_path, bytes(b"\x7fELG" + data)))
    assert not result.is_core
    assert [(f.secret_id, f.offset) for f in result.findings] == [("pin", 4004)]


def test_fifo_is_refused_without_blocking(tmp_path: Path, pin_file: Path, sc: Scanner) -> None:
    """A FIFO with no writer once held the scan forever at open(); a character device such as
    /dev/zero was reported clean as an 'empty file'."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ScanError, match="is a FIFO or pipe, not a regular file"):
        sc.scan(fifo)
    code, err, _ = run_cli(fifo, "--secrets", pin_file)
    assert code == 2
    assert "is a FIFO or pipe, not a regular file" in err
    assert "Traceback" not in err
    code, err, _ = run_cli("/dev/zero", "--secrets", pin_file)
    assert code == 2
    assert "is a character device" in err


def test_maps_snapshot_that_is_not_text(
    ec_key: ec.EllipticCurvePrivateKey, sc: Scanner, tmp_path: Path
) -> None:
    """A maps file of arbitrary bytes once raised UnicodeDecodeError; names are kept, with
    replacement characters where the path was not UTF-8."""
    core = _write(tmp_path, two_segment_core(ec_key).bytes())
    maps = tmp_path / "maps"
    maps.write_bytes(f"{HEAP:x}-{HEAP + 0x1000:x} rw-p 0 00:00 0 /tmp/\xff\xfe".encode("latin-1"))
    [f] = [f for f in sc.scan(core, maps=maps).findings if f.secret_id == "ec"]
    assert f.mapping == "/tmp/\ufffd\ufffd"
    with pytest.raises(ScanError, match="not a regular file"):
        sc.scan(core, maps="/dev/zero")


# --- a sparse 4 GiB hole, and memory -----------------------------------------------------------


def test_sparse_file_with_a_4_gib_hole(tmp_path: Path, pin_file: Path) -> None:
    """4 GiB of hole between two PINs: found at both ends, in well under a second of scanning,
    without reading the hole (the process's RSS stays far below 4 GiB)."""
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.write(PIN)
        f.truncate(4 << 30)
        f.seek((4 << 30) - len(PIN))
        f.write(PIN)
    assert os.stat(path).st_blocks * 512 < 1 << 20, "the file system made the hole real"
    began = time.monotonic()
    code, err, rss = run_cli(path, "--secrets", pin_file, "--json", tmp_path / "out.json")
    assert time.monotonic() - began < 30
    assert code == 1
    assert "2 findings" in err
    assert "bytes in holes" in err
    assert rss < RSS_BOUND_MIB, rss
    assert f'"offset": {(4 << 30) - len(PIN)}' in (tmp_path / "out.json").read_text()


def test_sparse_core_blind_mode_skips_the_hole(tmp_path: Path) -> None:
    """A core whose heap segment is mostly hole: the blind checks count the hole as covered
    without reading it."""
    key = ec.generate_private_key(ec.SECP256R1())
    core = build([Load(HEAP, bytes(random_bytes(0x1000, seed=5)))], [])
    path = tmp_path / "core.bin"
    path.write_bytes(core.bytes())
    size = 256 << 20
    with open(path, "r+b") as f:
        f.truncate(core.offsets[0] + size)
        f.seek(core.offsets[0] + size - 32)
        f.write(key.private_numbers().private_value.to_bytes(32, "big"))
    core.phdr(1, filesz=size, memsz=size)
    with open(path, "r+b") as f:
        f.write(bytes(core.data[: core.phoff + 2 * core.phentsize]))
    began = time.monotonic()
    result = Scanner([], public_keys=[key.public_key()], blind_budget_seconds=20).scan(path)
    assert time.monotonic() - began < 10
    assert result.blind is not None
    assert result.blind.complete
    assert [f.representation for f in result.findings] == ["verified-ec-scalar"]


def test_lying_headers_stay_within_the_memory_bound(
    ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path, pin_file: Path
) -> None:
    """Every lie at once (terabyte sizes, a count of 2^64-1 mappings, overlapping segments):
    exit 1 with both findings, a process under the bound."""
    core = two_segment_core(ec_key)
    core.phdr(1, filesz=1 << 40, memsz=1 << 44).phdr(2, offset=core.offsets[0] + 64)
    core.nt_file_count((1 << 64) - 1)
    path = _write(tmp_path, core.bytes())
    code, err, rss = run_cli(path, "--secrets", pin_file)
    assert code == 1
    assert "Traceback" not in err
    assert "claims 18446744073709551615 entries" in err
    assert rss < RSS_BOUND_MIB, rss


# --- blind mode against decoys -----------------------------------------------------------------


def test_json_nested_thousands_deep_around_a_jwk_member(tmp_path: Path) -> None:
    """Once a RecursionError out of the scan: json.raw_decode from a '{' before the member."""
    key = ec.generate_private_key(ec.SECP256R1())
    data = b"\0" * 100 + b'{"a":' + b"[" * 5000 + b'"d":"' + b"A" * 43 + b'"' + b"\0" * 100
    result = Scanner([], public_keys=[key.public_key()]).scan(_write(tmp_path, data))
    assert result.findings == []


def test_decoys_cannot_hold_the_scan_past_its_budget(tmp_path: Path) -> None:
    """Thousands of JWK members each inside deep JSON cost milliseconds each to examine: the
    budget stops the examination and the result says it is incomplete."""
    key = ec.generate_private_key(ec.SECP256R1())
    decoy = b'{"kty":"EC","x":' + b"[" * 900 + b'"d":"' + b"A" * 40 + b'"'
    path = _write(tmp_path, decoy * 4000)
    began = time.monotonic()
    result = Scanner([], public_keys=[key.public_key()], blind_budget_seconds=0.5).scan(path)
    assert time.monotonic() - began < 10
    assert result.blind is not None
    assert not result.blind.structural_complete
    assert not result.blind.complete
    assert any("private-key structures within the budget" in n for n in result.notes)


def test_rsa_jwk_too_large_to_recover_is_reported_not_loaded(tmp_path: Path) -> None:
    """Recovering p and q of a 16384-bit modulus costs seconds per candidate (minutes beyond):
    a JWK in a dump above 8192 bits is reported as an unloaded private key at once."""
    import base64

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).decode()

    big = (1 << 16383) + 12345
    jwk = f'{{"kty":"RSA","n":"{b64(big)}","e":"AQAB","d":"{b64(big // 3)}"}}'.encode()
    key = ec.generate_private_key(ec.SECP256R1())
    began = time.monotonic()
    result = Scanner([], public_keys=[key.public_key()]).scan(_write(tmp_path, jwk))
    assert time.monotonic() - began < 5
    [f] = result.findings
    assert f.representation == "jwk-private"
    assert "more than 8192" in f.detail


# --- properties --------------------------------------------------------------------------------

_FIELDS = st.sampled_from(["offset", "vaddr", "filesz", "memsz", "type", "align"])
_VALUES = st.one_of(
    st.integers(0, 1 << 16),
    st.sampled_from([0, 1, 4, 0xFFFF, 0xFFFF_FFFF, 1 << 40, (1 << 64) - 1]),
)


@pytest.fixture(scope="module")
def base_core() -> bytes:
    return two_segment_core(ec.generate_private_key(ec.SECP256R1())).bytes()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(st.tuples(st.integers(0, 2), _FIELDS, _VALUES), max_size=4),
    header=st.dictionaries(
        st.sampled_from(["phoff", "shoff", "phentsize", "phnum"]), _VALUES, max_size=2
    ),
    cut=st.one_of(st.none(), st.integers(0, 0x3000)),
)
def test_any_lie_in_the_headers(
    base_core: bytes,
    edits: list[tuple[int, str, int]],
    header: dict[str, int],
    cut: int | None,
) -> None:
    """Program and ELF header fields set to anything (within their width), the file cut
    anywhere: a layout whose memory is inside the file, or CoreFormatError."""
    core = Core(bytearray(base_core), True, "<", 64, 56, [], 0, 0, 0)
    for index, name, value in edits:
        width = 32 if name == "type" else 64
        core.phdr(index, **{name: value % (1 << width)})
    core.ehdr(**{k: v % (1 << (64 if k.endswith("off") else 16)) for k, v in header.items()})
    data = core.bytes()[:cut]
    targets.elf(data)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    flips=st.lists(st.tuples(st.integers(0, 0x400), st.integers(0, 255)), min_size=1, max_size=8)
)
def test_any_bytes_in_the_headers_scan(
    base_core: bytes, flips: list[tuple[int, int]], tmp_path: Path
) -> None:
    """Bytes of the ELF header, program headers and notes overwritten: the scan still finds
    the PIN, whose bytes are untouched, and says where it is only when it knows."""
    data = bytearray(base_core)
    for at, value in flips:
        data[at] = value
    path = tmp_path / "core.bin"
    path.write_bytes(bytes(data))
    result = targets.known_scanner().scan(path)
    assert result.size == len(data)
    sc = Scanner([secret_from_pin(PIN, "pin")])
    assert "pin" in _found(sc.scan(path))


def test_rusage_is_per_child() -> None:
    """run_cli's bound is the child's own peak: getrusage(RUSAGE_CHILDREN) of a fresh parent."""
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


# --- a dump full of one secret ---------------------------------------------------------------


def test_dump_full_of_one_secret_is_linear(tmp_path: Path) -> None:
    """400000 copies of a PIN once took hours (suppressing nested matches was quadratic) and
    3 GiB (4 million matches kept). Now linear; beyond the match bound, INCOMPLETE."""
    path = _write(tmp_path, (PIN + bytes(8)) * 10_000)
    began = time.monotonic()
    result = Scanner([secret_from_pin(PIN, "pin")]).scan(path)
    assert time.monotonic() - began < 20
    assert len(result.findings) == 10_000
    assert result.complete  # 10000 copies x 17 windows: within the bound


def test_scattered_fragments_stay_within_the_memory_bound(tmp_path: Path, pin_file: Path) -> None:
    """The worst case for memory: every match a different fragment at its own place, each its
    own finding, up to the match bound. The process stays under RSS_BOUND_MIB + 128."""
    from signer.scan._engine import MAX_HITS

    data = b"".join(PIN[k % 17 : k % 17 + 16] + b"\0" for k in range(MAX_HITS + 1000))
    path = _write(tmp_path, data)
    code, err, rss = run_cli(path, "--secrets", pin_file)
    assert code == 1
    assert "INCOMPLETE" in err
    assert rss < RSS_BOUND_MIB + 128, rss
