"""Blind mode's math checks in several processes (issue 18): the blocks are dealt out to forked
workers, and the result is the one process's result; a worker that dies, fails or does not
report in time leaves its share not covered (the scan says incomplete, never clean), and a
worker dumps no core."""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signer.cli._tools import _workers
from signer.errors import ConfigError, ScanError
from signer.gate import load_config
from signer.scan import Scanner, _blind
from signer.scan._result import Finding, ScanResult

from .conftest import memory_like

MIB = 1 << 20


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scanner forks workers only from a process of one thread; pytest's process may hold
    threads other tests left (gRPC's, pools'). The workers here run only numpy and libcrypto,
    which take no lock those threads hold, so these tests let them fork all the same."""
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(_blind, "_cpus", lambda: 4)  # a worker per CPU: fork on one CPU too


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "rsa": rsa.generate_private_key(65537, 2048),
    }


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any]) -> tuple[Path, list[int]]:
    """8 MiB of heap-like memory (room for two workers) with a P-256 scalar in each of its
    eight blocks and an RSA prime in the last one."""
    mem = memory_like(8 * MIB, seed=5)
    d = keys["ec"].private_numbers().private_value.to_bytes(32, "big")
    offsets = [k * MIB + 8 * (1000 + 37 * k) for k in range(8)]
    for at in offsets:
        mem[at : at + 32] = d
    p = keys["rsa"].private_numbers().p.to_bytes(128, "big")
    offsets.append(7 * MIB + 4096)
    mem[offsets[-1] : offsets[-1] + 128] = p
    path = tmp_path_factory.mktemp("workers") / "heap.bin"
    path.write_bytes(bytes(mem))
    return path, offsets


def scan(keys: dict[str, Any], path: Path, workers: int, budget: float = 120) -> ScanResult:
    public = {name: k.public_key() for name, k in keys.items()}
    sc = Scanner([], public_keys=public, blind_budget_seconds=budget, blind_workers=workers)
    return sc.scan(path)


def found(result: ScanResult) -> list[tuple[str, int]]:
    return sorted((f.secret_id, f.offset) for f in result.findings)


@pytest.mark.usefixtures("one_thread")
def test_several_workers_find_what_one_finds(
    keys: dict[str, Any], dump: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, offsets = dump
    one = scan(keys, path, 1)

    def signed(original: Any, args: Sequence[Any]) -> Any:
        findings, shares = original(*args)
        return [*findings, Finding("pid", "-", "-", 0, 0, detail=str(os.getpid()))], shares

    _in_worker(monkeypatch, signed)
    two = scan(keys, path, 2)
    pids = [f.detail for f in two.findings if f.secret_id == "pid"]
    assert len(pids) == 1
    assert pids != [str(os.getpid())]  # share 1 was a child's
    want = sorted([("ec", at) for at in offsets[:-1]] + [("rsa", offsets[-1])])
    assert found(one) == want
    assert [f for f in found(two) if f[0] != "pid"] == want  # blocks 1, 3, 5, 7: the child's
    assert one.blind is not None
    assert two.blind is not None
    assert two.blind.complete
    per_check = [(c.name, c.bytes_covered, c.candidates) for c in two.blind.checks]
    assert per_check == [(c.name, c.bytes_covered, c.candidates) for c in one.blind.checks]


def test_small_dumps_are_not_split(keys: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(bytes(memory_like(7 * MIB)))

    def no_fork(*_: object) -> Any:
        raise AssertionError("forked for 7 MiB: less than 4 MiB for each of two")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_blind, "_in_processes", no_fork)
        assert scan(keys, path, 4).blind is not None


def test_a_process_of_several_threads_does_not_fork(
    keys: dict[str, Any], dump: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, offsets = dump

    def no_fork(*_: object) -> Any:
        raise AssertionError("forked beside another thread")

    monkeypatch.setattr(_blind, "_in_processes", no_fork)
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert len(found(scan(keys, path, 2))) == len(offsets)
    finally:
        release.set()
        other.join()


def _in_worker(monkeypatch: pytest.MonkeyPatch, act: Callable[[Any, Sequence[Any]], Any]) -> None:
    """Replaces what worker 1 (a child) does with ``act(original, args)``; share 0 (this
    process) runs as before."""
    original = _blind._run_share

    def share(*args: Any) -> Any:
        if args[1] == 1 and os.getpid() != parent:  # (work, k, n)
            return act(original, args)
        return original(*args)

    parent = os.getpid()
    monkeypatch.setattr(_blind, "_run_share", share)


@pytest.mark.usefixtures("one_thread")
def test_a_worker_that_dies_leaves_its_share_not_covered(
    keys: dict[str, Any], dump: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, offsets = dump
    _in_worker(monkeypatch, lambda *_: os._exit(3))
    result = scan(keys, path, 2)
    assert result.blind is not None
    assert not result.blind.complete
    assert all(c.bytes_covered < c.bytes_total for c in result.blind.checks)
    assert any("did not cover all memory" in n for n in result.notes)
    assert any("worker 1 of 2: ended without a whole reply (it died)" in n for n in result.notes)
    # Share 0 (even blocks) still reported what it found.
    assert found(result) == [("ec", at) for at in offsets[0:8:2]]


@pytest.mark.usefixtures("one_thread")
def test_a_worker_that_does_not_report_in_time_is_killed(
    keys: dict[str, Any], dump: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = dump
    r, w = os.pipe()  # never written: the worker blocks until it is killed
    _in_worker(monkeypatch, lambda *_: os.read(r, 1))
    before = children()
    try:
        result = scan(keys, path, 2, budget=3)  # the worker's grace: 1 s (a tenth, at least 1)
    finally:
        os.close(r)
        os.close(w)
    assert result.blind is not None
    assert not result.blind.complete
    assert result.blind.lost == (
        "blind-mode worker 1 of 2: no reply by the deadline, killed: its share is not covered",
    )
    assert children() == before  # killed and reaped: no child left behind


def children() -> set[int]:
    """This process's children (any of its threads'), from /proc."""
    out: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        out |= {int(pid) for pid in (task / "children").read_text().split()}
    return out


@pytest.mark.usefixtures("one_thread")
def test_a_worker_that_fails_fails_the_scan(
    keys: dict[str, Any], dump: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = dump

    def fail(*_: object) -> Any:
        raise ScanError("libcrypto could not allocate an EC point")

    _in_worker(monkeypatch, fail)
    with pytest.raises(ScanError, match="a blind-mode worker failed: ScanError: libcrypto"):
        scan(keys, path, 2)


@pytest.mark.usefixtures("one_thread")
def test_a_worker_dumps_no_core(
    keys: dict[str, Any], dump: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It holds the dump's memory: not dumpable, and RLIMIT_CORE 1, which a pipe handler (the
    dump gate itself) also honours, where 0 stops file cores only (reported back as a
    finding's detail)."""
    path, _ = dump

    def report(original: Any, args: Sequence[Any]) -> Any:
        findings, shares = original(*args)
        soft = resource.getrlimit(resource.RLIMIT_CORE)[0]
        dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
        return [
            *findings,
            Finding("rlimit", "core", "-", 0, 0, detail=f"{soft} {dumpable}"),
        ], shares

    _in_worker(monkeypatch, report)
    result = scan(keys, path, 2)
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    soft = 1 if hard == resource.RLIM_INFINITY else min(1, hard)
    assert [f.detail for f in result.findings if f.secret_id == "rlimit"] == [f"{soft} 0"]


@pytest.mark.usefixtures("one_thread")
def test_a_workers_foreign_exception_is_named_not_quoted(
    keys: dict[str, Any], dump: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception not our own might quote the memory scanned: only its type crosses."""
    path, _ = dump

    def fail(*_: object) -> Any:
        raise ValueError("0123456789abcdef-from-the-dump")

    _in_worker(monkeypatch, fail)
    with pytest.raises(ScanError) as err:
        scan(keys, path, 2)
    assert "ValueError (message withheld)" in str(err.value)
    assert "from-the-dump" not in str(err.value)


@pytest.mark.usefixtures("one_thread")
def test_when_this_process_fails_the_workers_are_killed_and_reaped(
    keys: dict[str, Any], dump: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = dump
    r, w = os.pipe()
    said, say = os.pipe()
    parent = os.getpid()
    workers: list[int] = []

    def share(*args: Any) -> Any:
        if os.getpid() != parent:
            os.write(say, str(os.getpid()).encode())  # one write under PIPE_BUF: whole
            os.read(r, 1)  # the worker waits for ever
        else:
            workers.append(int(os.read(said, 32)))  # the worker is there: now this one fails
            assert workers[0] in children()
        raise ScanError("share 0 failed")

    monkeypatch.setattr(_blind, "_run_share", share)
    before = children()
    try:
        with pytest.raises(ScanError, match="share 0 failed"):
            scan(keys, path, 2)
    finally:
        for fd in (r, w, said, say):
            os.close(fd)
    assert len(workers) == 1
    assert workers[0] not in children()  # killed and reaped
    assert children() == before


@pytest.mark.usefixtures("one_thread")
def test_likely_offsets_in_workers(keys: dict[str, Any], dump: tuple[Path, list[int]]) -> None:
    path, offsets = dump
    public = {name: k.public_key() for name, k in keys.items()}
    sc = Scanner([], public_keys=public, blind_offsets="likely", blind_workers=2)
    result = sc.scan(path)
    assert result.blind is not None
    assert (result.blind.workers, result.blind.complete) == (2, True)
    assert found(result) == sorted([("ec", at) for at in offsets[:-1]] + [("rsa", offsets[-1])])


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, 65])
def test_blind_workers_must_be_a_positive_integer(keys: dict[str, Any], bad: Any) -> None:
    with pytest.raises(ScanError, match="blind_workers must be a positive integer up to 64"):
        Scanner([], public_keys=[keys["ec"].public_key()], blind_workers=bad)


def test_the_workers_bound_is_the_same_everywhere(tmp_path: Path) -> None:
    """The CLI and the gate's configuration say 64 without importing the scanner (numpy)."""
    assert _workers(str(_blind.MAX_WORKERS)) == _blind.MAX_WORKERS
    with pytest.raises(argparse.ArgumentTypeError):
        _workers(str(_blind.MAX_WORKERS + 1))
    toml = tmp_path / "gate.toml"
    toml.write_text(f"[detect]\nblind_workers = {_blind.MAX_WORKERS}\n")
    assert load_config(toml).blind_workers == _blind.MAX_WORKERS
    toml.write_text(f"[detect]\nblind_workers = {_blind.MAX_WORKERS + 1}\n")
    with pytest.raises(ConfigError):
        load_config(toml)
