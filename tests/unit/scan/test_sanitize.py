"""The sanitiser on ELF cores built here: every planted key, in each representation, is
overwritten as its whole object and nothing else changes; headers and notes stay; the re-scan
proves the copy; strict mode keeps stacks (pointer words only) and code and zeroes the rest."""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fuzz.elfcore import Load, build
from signer.cli.main import EXIT_ERROR, EXIT_OK, main
from signer.errors import ScanError
from signer.scan import (
    SanitizeResult,
    Scanner,
    load_public_keys,
    load_secrets,
    sanitize,
    secret_from_pin,
)
from signer.scan._elf import parse_core
from signer.scan._patterns import colon_hex, cpython_digits, le64
from signer.scan._sanitize import FILLER

from .conftest import PIN, Keys, memory_like, random_bytes

HEAP, CODE, STACK = 0x555500000000, 0x7F0000000000, 0x7FFC00000000
LIB = "/usr/lib/x86_64-linux-gnu/libfake.so.1"
SP = STACK + 0x8000
RSP_AT = 112 + 19 * 8  # x86-64 NT_PRSTATUS: pr_reg at 112, rsp is register 19
PlantCore = Callable[[list[tuple[int, bytes]]], tuple[Path, int]]


def _pkcs8(key: object, enc: serialization.Encoding = serialization.Encoding.DER) -> bytes:
    out: bytes = key.private_bytes(  # type: ignore[attr-defined]
        enc, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return out


def _b64url(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


@dataclass
class Planted:
    """An object planted in a segment: its bytes, where the object the sanitiser must
    overwrite lies in them, and the rule that delimits it."""

    where: int  # offset in the segment
    data: bytes
    obj: tuple[int, int]  # [start, end) in data
    rule: str


def _plants(keys: Keys) -> dict[str, list[Planted]]:
    rsa_n = keys.rsa2048.private_numbers()
    p384_d = keys.p384.private_numbers().private_value.to_bytes(48, "big")
    sec1_no_public = (
        bytes([0x30, 0x3E, 2, 1, 1, 4, 0x30]) + p384_d + bytes.fromhex("a00706052b81040022")
    )
    pem = _pkcs8(keys.p256, serialization.Encoding.PEM)
    d_b64 = base64.b64encode(rsa_n.d.to_bytes(256, "big"))
    p521 = keys.p521.private_numbers()
    jwk = json.dumps(
        {
            "kty": "EC",
            "crv": "P-521",
            "x": _b64url(p521.public_numbers.x, 66),
            "y": _b64url(p521.public_numbers.y, 66),
            "d": _b64url(p521.private_value, 66),
        }
    ).encode()
    seed_hex = keys.ed25519.private_bytes_raw().hex().encode()
    p_limbs = le64(rsa_n.p.to_bytes(128, "big"))
    utf16 = ("pin: " + PIN.decode()).encode("utf-16-le")
    digits = cpython_digits(keys.p256.private_numbers().private_value)
    q_text = colon_hex(b"\0" + rsa_n.q.to_bytes(128, "big"), 15)[0]  # openssl pkey -text
    nul = b"\0" * 16

    def around(before: bytes, obj: bytes, after: bytes) -> tuple[bytes, tuple[int, int]]:
        data = nul + before + obj + after + nul
        return data, (16 + len(before), 16 + len(before) + len(obj))

    heap: list[Planted] = []
    at = 0x100
    for before, obj, after, rule, plant in (
        (b"", _pkcs8(keys.rsa2048), b"", "der", None),
        (b"", sec1_no_public, b"", "der", None),
        (b"", pem.rstrip(b"\n"), b"\n", "pem", None),
        (b"token:", d_b64, b";", "base64", None),
        (b'{"keys": [', jwk, b"]}", "jwk-object", None),
        (b"seed ", seed_hex, b"\n", "hex", None),
        # A fragment: the top 28 bytes of the limbs are gone; the whole window is overwritten.
        (b"", p_limbs, b"", "window", p_limbs[:100] + b"\x11" * 28),
        (b"\0\0", utf16, b"\0\0", "utf16", None),
        (b"PIN=", PIN, b"\n", "window", None),
        (b"prime2:\n    ", q_text, b"\nexponent1:\n    00:", "colon-hex", None),
        (b"d = ", str(rsa_n.d).encode(), b"\n", "decimal", None),
        (b"", digits, b"", "window", None),
    ):
        data, obj_at = around(before, obj, after)
        if plant is not None:
            data = data.replace(obj, plant)
        heap.append(Planted(at, data, obj_at, rule))
        at += len(data) + 0x200
    ed = _pkcs8(keys.ed25519)
    stack = [Planted(SP - STACK + 0x100, nul + ed + nul, (16, 16 + len(ed)), "der")]
    return {"heap": heap, "stack": stack}


@dataclass
class SynthCore:
    path: Path
    data: bytes
    offsets: dict[str, int]  # file offset of each segment
    plants: dict[str, list[Planted]]


def _segment(size: int, seed: int, plants: list[Planted]) -> bytearray:
    buf = memory_like(size, seed)
    for p in plants:
        buf[p.where : p.where + len(p.data)] = p.data
    return buf


def _build_core(
    path: Path, keys: Keys, prstatus: bytes | None = None, stack: bytearray | None = None
) -> SynthCore:
    plants = _plants(keys)
    regs = bytearray(336) if prstatus is None else bytearray(prstatus)
    struct.pack_into("<Q", regs, RSP_AT, SP)
    core = build(
        [
            Load(HEAP, bytes(_segment(256 << 10, 3, plants["heap"]))),
            Load(CODE, bytes(random_bytes(64 << 10, 4))),
            Load(
                STACK, bytes(stack if stack is not None else _segment(64 << 10, 5, plants["stack"]))
            ),
        ],
        [(CODE, CODE + (64 << 10), LIB)],
        prstatus=bytes(regs),
    )
    core.phdr(2, flags=5)  # the library's code: r-x
    path.write_bytes(core.bytes())
    names = ("heap", "code", "stack")
    return SynthCore(path, core.bytes(), dict(zip(names, core.offsets, strict=True)), plants)


def _filled(data: bytes, start: int, end: int, address: int) -> bytes:
    """``data`` with [start, end) as the sanitiser fills it: FILLER aligned to ``address``."""
    pattern = FILLER * ((end - start) // 8 + 2)
    skew = address % 8
    return data[:start] + pattern[skew : skew + end - start] + data[end:]


def _expected(core: SynthCore) -> tuple[bytes, set[tuple[int, int, str]]]:
    out = core.data
    objects = set()
    for seg, vaddr in (("heap", HEAP), ("stack", STACK)):
        for p in core.plants[seg]:
            start = core.offsets[seg] + p.where + p.obj[0]
            end = core.offsets[seg] + p.where + p.obj[1]
            out = _filled(out, start, end, vaddr + p.where + p.obj[0])
            objects.add((start, end - start, p.rule))
    return out, objects


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> SynthCore:
    return _build_core(tmp_path_factory.mktemp("synth") / "core", keys)


@pytest.fixture(scope="module")
def sanitised(
    synth: SynthCore, scanner: Scanner, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SanitizeResult, bytes]:
    out = tmp_path_factory.mktemp("safe") / "core.safe"
    done = sanitize(synth.path, out, scanner)
    return done, out.read_bytes()


def test_every_planted_representation_is_found(synth: SynthCore, scanner: Scanner) -> None:
    """The test's premise: the scan finds something in every planted object."""
    result = scanner.scan(synth.path)
    _, objects = _expected(synth)
    for start, length, rule in objects:
        inside = [f for f in result.findings if start <= f.offset < start + length]
        assert inside, (start, rule)


def test_whole_objects_overwritten_and_nothing_else(
    synth: SynthCore, sanitised: tuple[SanitizeResult, bytes]
) -> None:
    done, copy = sanitised
    expected, objects = _expected(synth)
    assert {(o.offset, o.length, o.rule) for o in done.objects} == objects
    assert len(copy) == len(synth.data) == done.size
    assert copy == expected  # every byte outside the objects unchanged, every object filler
    assert done.verified
    assert done.findings_overwritten >= len(objects)
    assert done.bytes_overwritten == sum(length for _, length, _ in objects)


def test_headers_notes_and_addresses_unchanged(
    synth: SynthCore, sanitised: tuple[SanitizeResult, bytes]
) -> None:
    done, copy = sanitised
    before, after = parse_core(synth.data), parse_core(copy)
    assert before is not None
    assert after is not None
    assert after.segments == before.segments
    assert after.notes == before.notes
    assert after.files == before.files
    first_load = min(synth.offsets.values())
    assert copy[:first_load] == synth.data[:first_load]
    heap_obj = next(o for o in done.objects if o.rule == "pem")
    assert heap_obj.address == HEAP + heap_obj.offset - synth.offsets["heap"]


def test_the_copy_rescans_clean(
    sanitised: tuple[SanitizeResult, bytes], scanner: Scanner, tmp_path: Path
) -> None:
    done, copy = sanitised
    assert scanner.scan(done.output).clean
    assert b"REDACTEDREDACTED" in copy


def test_blind_findings_overwritten(keys: Keys, plant_core: PlantCore, tmp_path: Path) -> None:
    """Blind mode alone (public keys only): a PEM block and a JWK, whole."""
    pub = tmp_path / "pub.pem"
    pub.write_bytes(
        b"".join(
            k.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            for k in (keys.rsa2048, keys.p256)
        )
    )
    blind = Scanner(public_keys=load_public_keys([pub]), blind_budget_seconds=30)
    pem = _pkcs8(keys.rsa2048, serialization.Encoding.PEM)
    n = keys.p256.private_numbers()
    jwk = json.dumps(
        {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url(n.public_numbers.x, 32),
            "y": _b64url(n.public_numbers.y, 32),
            "d": _b64url(n.private_value, 32),
        }
    ).encode()
    path, heap = plant_core([(0x1000, pem), (0x3000, b"[" + jwk + b"]")])
    done = sanitize(path, tmp_path / "safe", blind)
    got = {(o.offset - heap, o.length) for o in done.objects}
    assert got == {(0x1000, len(pem.rstrip(b"\n"))), (0x3001, len(jwk))}


@pytest.fixture
def plant_core(tmp_path: Path) -> PlantCore:
    """``plant_core([(offset, data), ...])``: a core whose one heap segment (NUL bytes) holds
    ``data`` at each offset; returns the file and the segment's file offset."""

    def make(items: list[tuple[int, bytes]]) -> tuple[Path, int]:
        buf = bytearray(64 << 10)
        for at, data in items:
            buf[at : at + len(data)] = data
        regs = bytearray(336)
        struct.pack_into("<Q", regs, RSP_AT, HEAP + 0x8000)
        core = build([Load(HEAP, bytes(buf))], prstatus=bytes(regs))
        path = tmp_path / f"core-{len(list(tmp_path.iterdir()))}"
        path.write_bytes(core.bytes())
        return path, core.offsets[0]

    return make


def test_wrapped_base64_is_one_object(keys: Keys, plant_core: PlantCore, scanner: Scanner) -> None:
    """base64 in 76-column lines (the ``base64`` command): the whole block, not the lines found;
    lines of words around it are not joined."""
    der = _pkcs8(keys.rsa2048)
    text = base64.encodebytes(der).rstrip(b"\n")  # 76-character lines
    before, after = b"here it is, the key\nkey:\n", b"\nand then some words\n"
    path, heap = plant_core([(0x1000, before + text + after)])
    done = sanitize(path, path.with_name("safe"), scanner)
    start = 0x1000 + len(before)
    # (lines without '+' or '/' are base64url too: both rules, one object)
    assert [(o.offset - heap, o.length) for o in done.objects] == [(start, len(text))]
    assert "base64" in done.objects[0].rule.split("+")


def test_strict_keeps_stacks_code_and_zeroes_the_rest(
    keys: Keys, scanner: Scanner, tmp_path: Path
) -> None:
    filler = int.from_bytes(FILLER, "little")
    live = SP - 128 - STACK
    words = [CODE + 0x123, 42, HEAP + 0x40, 0x9C3A_77E1_0B5D_F2A4, STACK + 0x9000, 0]
    stack = random_bytes(64 << 10, 6)
    n = (len(stack) - live) // 8
    struct.pack_into(f"<{n}Q", stack, live, *(words * n)[:n])
    core = _build_core(tmp_path / "core", keys, stack=stack)
    done = sanitize(core.path, tmp_path / "safe", scanner, strict=True)
    copy = (tmp_path / "safe").read_bytes()

    assert len(copy) == len(core.data)
    first_load = min(core.offsets.values())
    assert copy[:first_load] == core.data[:first_load]  # headers and notes
    code = core.offsets["code"]
    assert copy[code : code + (64 << 10)] == core.data[code : code + (64 << 10)]
    s = core.offsets["stack"]
    assert copy[s : s + live] == bytes(live)  # below the red zone: dead, zero
    got = struct.unpack_from(f"<{n}Q", copy, s + live)
    kept = [w if w in (CODE + 0x123, 42, STACK + 0x9000, 0) else filler for w in words]
    assert list(got) == (kept * n)[:n]
    assert done.words_defaced == sum(1 for i in range(n) if words[i % 6] not in kept)
    # The heap is gone: zero, but for the filler over the objects the scan found there.
    h = core.offsets["heap"]
    heap = bytearray(256 << 10)
    for p in core.plants["heap"]:
        a, b = p.where + p.obj[0], p.where + p.obj[1]
        heap[a:b] = _filled(bytes(heap), a, b, HEAP + a)[a:b]
    assert copy[h : h + len(heap)] == bytes(heap)
    assert {k.why for k in done.kept} == {f"file-backed, not writable: {LIB}", "stack of LWP 0"}
    assert done.bytes_zeroed == (256 << 10) + live
    assert done.output_disk_bytes < done.source_disk_bytes
    assert any("AT_PHDR" in note for note in done.notes)  # no auxv in this core: said
    assert scanner.scan(tmp_path / "safe").clean


def test_a_finding_in_the_thread_registers_is_refused(
    keys: Keys, scanner: Scanner, tmp_path: Path
) -> None:
    regs = bytearray(336)
    regs[200 : 200 + len(PIN)] = PIN
    core = _build_core(tmp_path / "core", keys, prstatus=bytes(regs))
    safe = tmp_path / "safe"
    safe.write_bytes(b"an older copy")
    with pytest.raises(ScanError, match=r"NT_PRSTATUS.*does not rewrite"):
        sanitize(core.path, safe, scanner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["core"]  # no copy, no stale one


def test_a_finding_in_vector_registers_is_overwritten_in_place(
    keys: Keys, scanner: Scanner, tmp_path: Path
) -> None:
    """memcpy moves keys through xmm/ymm registers: NT_X86_XSTATE's data may hold one. The
    finding's bytes are overwritten; the note's header and every other byte stay."""
    regs = bytearray(336)
    regs[200 : 200 + len(PIN)] = PIN
    core = _build_core(tmp_path / "core", keys, prstatus=bytes(regs))
    data = bytearray(core.data)
    notes_at = 64 + 4 * 56  # after the ELF header and four program headers
    struct.pack_into("<I", data, notes_at + 8, 0x202)  # the first note becomes NT_X86_XSTATE
    core.path.write_bytes(bytes(data))
    done = sanitize(core.path, tmp_path / "safe", scanner)
    copy = (tmp_path / "safe").read_bytes()
    pin_at = notes_at + 20 + 200
    assert (pin_at, len(PIN), "register-note") in {
        (o.offset, o.length, o.rule) for o in done.objects
    }
    assert copy[pin_at : pin_at + len(PIN)] == (FILLER * 8)[pin_at % 8 :][: len(PIN)]
    assert copy[:pin_at] == bytes(data[:pin_at])


def test_a_copy_the_rescan_rejects_is_deleted(
    synth: SynthCore, scanner: Scanner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from signer.scan import _sanitize

    monkeypatch.setattr(_sanitize, "_fill", lambda fd, objects, phases: 0)  # overwrite nothing
    with pytest.raises(ScanError, match="re-scan of the copy still finds"):
        sanitize(synth.path, tmp_path / "safe", scanner)
    assert list(tmp_path.iterdir()) == []


def test_an_incomplete_scan_proves_nothing(keys: Keys, synth: SynthCore, tmp_path: Path) -> None:
    blind = Scanner(
        public_keys=[keys.rsa2048.public_key(), keys.p256.public_key()], blind_budget_seconds=0
    )
    with pytest.raises(ScanError, match="blind mode within its budget"):
        sanitize(synth.path, tmp_path / "safe", blind)
    assert list(tmp_path.iterdir()) == []


def test_any_file_is_sanitised_as_bytes(scanner: Scanner, tmp_path: Path) -> None:
    data = random_bytes(8192, 7)
    data[1000 : 1000 + 6 + len(PIN)] = b"\0PIN=\0" + PIN  # the PIN alone is the object
    path = tmp_path / "dump.bin"
    path.write_bytes(bytes(data))
    done = sanitize(path, tmp_path / "safe", scanner)
    assert [(o.offset, o.length) for o in done.objects] == [(1006, len(PIN))]
    assert "not an ELF core: sanitised as raw bytes" in done.notes
    with pytest.raises(ScanError, match="not an ELF core"):
        sanitize(path, tmp_path / "strict", scanner, strict=True)


def test_a_sparse_core_stays_sparse(keys: Keys, scanner: Scanner, tmp_path: Path) -> None:
    """Cores are gigabytes, most of it holes: the copy is streamed extent by extent."""
    size = 256 << 20
    regs = bytearray(336)
    struct.pack_into("<Q", regs, RSP_AT, STACK + 0x100)
    head = build(
        [Load(STACK, bytes(0x1000)), Load(HEAP, b"\0" * 16 + PIN + b"\0" * 16)],
        prstatus=bytes(regs),
    )
    struct.pack_into("<Q", head.data, head.phoff + 2 * head.phentsize + 8, size - 4096)
    path = tmp_path / "core"
    with open(path, "wb") as f:
        f.write(head.bytes()[: head.offsets[1]])
        f.seek(size - 4096)
        f.write(b"\0" * 16 + PIN + b"\0" * 16)
        f.truncate(size)
    done = sanitize(path, tmp_path / "safe", scanner)
    assert done.size == size == os.path.getsize(tmp_path / "safe")
    assert [(o.offset, o.length) for o in done.objects] == [(size - 4096 + 16, len(PIN))]
    assert done.output_disk_bytes < 1 << 20


def test_a_zstd_core_is_sanitised_to_the_decompressed_core(
    synth: SynthCore, sanitised: tuple[SanitizeResult, bytes], scanner: Scanner, tmp_path: Path
) -> None:
    import zstandard

    packed = tmp_path / "core.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(synth.data))
    done = sanitize(packed, tmp_path / "safe", scanner)
    assert (tmp_path / "safe").read_bytes() == sanitised[1]
    assert any("zstd-compressed core" in note for note in done.notes)


def test_cli(
    keys: Keys, synth: SynthCore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "rsa.pem"
    key.write_bytes(_pkcs8(keys.rsa2048, serialization.Encoding.PEM))
    pin = tmp_path / "user.pin"
    pin.write_bytes(PIN + b"\n")
    safe = tmp_path / "safe"
    argv = ["sanitize", str(synth.path), "--out", str(safe), "--secrets", str(key), str(pin)]
    assert main([*argv, "--json"]) == EXIT_OK
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["verified"] is True
    assert doc["size"] == len(synth.data)
    assert "re-scan clean" in out.err
    assert Scanner([secret_from_pin(PIN, "p")]).scan(safe).clean

    assert (
        main(["sanitize", str(tmp_path / "missing"), "--out", str(safe), "--secrets", str(pin)])
        == EXIT_ERROR
    )
    assert "error:" in capsys.readouterr().err
    assert not safe.exists()


def test_keys_in_files_as_tools_write_them(
    keys: Keys, plant_core: PlantCore, tmp_path: Path
) -> None:
    """A PEM inside a JSON string (a cloud service-account key), with CRLF line ends, as a
    UTF-16 string; an OpenSSH key as ssh-keygen's file and as its binary blob: each whole."""
    pem = _pkcs8(keys.rsa2048, serialization.Encoding.PEM)
    ossh = keys.ed25519.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    (tmp_path / "rsa.pem").write_bytes(pem)
    (tmp_path / "id_ed25519").write_bytes(ossh)
    scanner = Scanner(load_secrets([tmp_path / "rsa.pem", tmp_path / "id_ed25519"]))
    blob = base64.b64decode(b"".join(ossh.splitlines()[1:-1]))
    account = json.dumps({"type": "service_account", "private_key": pem.decode()}).encode()
    in_json = account[account.index(b"-----BEGIN") : account.index(b'\\n"')]
    crlf = pem.replace(b"\n", b"\r\n").rstrip(b"\r\n")
    utf16 = pem.decode().encode("utf-16-le")
    objects = [
        (0x1000, account, account.index(in_json), len(in_json)),
        (0x3000, b"\0" + crlf + b"\r\n\0", 1, len(crlf)),
        (0x4000, b"\0\0" + utf16 + b"\0\0", 2, len(utf16)),
        (0x8000, b"\0" + ossh + b"\0", 1, len(ossh.rstrip(b"\n"))),
        (0x9000, b"\0" + blob + b"\0", 1, len(blob)),
    ]
    path, heap = plant_core([(at, data) for at, data, _, _ in objects])
    done = sanitize(path, tmp_path / "safe", scanner)
    got = [(o.offset - heap, o.length) for o in done.objects]
    assert got == [(at + rel, length) for at, _, rel, length in objects]
    assert [o.rule for o in done.objects] == ["pem", "pem", "utf16", "pem", "openssh-key-v1"]
