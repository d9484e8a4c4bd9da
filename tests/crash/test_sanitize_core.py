"""``signer sanitize`` on a real kernel core: a Python process holding a key (its PEM text, the
loaded key, its numbers) and a PIN crashes with SIGSEGV in a native call, with a second thread
waiting; the kernel writes its core (``ulimit -c``, core_pattern as the host has it). The
sanitised copy, normal and strict, re-scans clean and gdb still shows both threads and the
crashing frame (``strlen`` called by ctypes' ``string_at``, under libpython frames)."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from signer.cli.main import EXIT_OK, main
from signer.harness.collectors import KernelCollector
from signer.scan import Scanner, load_secrets, sanitize

pytestmark = pytest.mark.crash

CHILD = r"""
import ctypes, sys, threading
from cryptography.hazmat.primitives import serialization
pem = open(sys.argv[1], "rb").read()
key = serialization.load_pem_private_key(pem, None)
pin = open(sys.argv[2]).read().strip()  # a str, as a service reading its config holds it
held = [pem, pem.decode(), key, key.private_numbers(), pin]
waiting = threading.Event()
def wait_forever():
    waiting.set()
    threading.Event().wait()
threading.Thread(target=wait_forever, name="waiter", daemon=True).start()
waiting.wait()
ctypes.string_at(0)  # SIGSEGV in strlen
"""


def _unlimited_cores() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(core, key file, PIN file) of the crashed child."""
    if shutil.which("gdb") is None:
        pytest.fail("this test needs gdb: run 'make test', which installs it")
    work = tmp_path_factory.mktemp("crash")
    key = work / "service.pem"
    key.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pin = work / "user.pin"
    pin.write_text(os.urandom(16).hex() + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    since = time.time()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(key), str(pin)],
        cwd=work,
        env=env,
        preexec_fn=_unlimited_cores,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -11, child.stderr
    collector = KernelCollector.detect()
    core = collector.fetch(0, work, since, work / "crash.core", timeout=30)
    return core, key, pin


@pytest.fixture(scope="module")
def scanner(crashed: tuple[Path, Path, Path]) -> Scanner:
    _, key, pin = crashed
    return Scanner(load_secrets([key, pin]))


def _backtrace(core: Path) -> str:
    r = subprocess.run(
        [
            "gdb",
            "-batch",
            "-nx",
            "-iex",
            "set debuginfod enabled off",
            "-iex",
            "set auto-load python-scripts off",
            "-ex",
            "thread apply all bt",
            os.path.realpath(sys.executable),
            str(core),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def _frames(bt: str) -> dict[str, list[str]]:
    """Function names of each thread's frames, innermost first."""
    threads: dict[str, list[str]] = {}
    current = ""
    for line in bt.splitlines():
        if m := re.match(r"Thread (\d+) ", line):
            current = m.group(1)
            threads[current] = []
        elif (m := re.match(r"#\d+\s+(?:0x[0-9a-f]+ in )?(\S+)", line)) and current:
            threads[current].append(m.group(1))
    return threads


def test_original_holds_the_key(crashed: tuple[Path, Path, Path], scanner: Scanner) -> None:
    core, _, _ = crashed
    found = {(f.secret_id, f.representation) for f in scanner.scan(core).findings}
    assert ("service.pem", "pem") in found
    assert any(sid == "user.pin" for sid, _ in found)


@pytest.mark.parametrize("strict", [False, True], ids=["normal", "strict"])
def test_sanitised_core_rescans_clean_and_gdb_still_backtraces(
    crashed: tuple[Path, Path, Path], scanner: Scanner, tmp_path: Path, strict: bool
) -> None:
    core, _, _ = crashed
    safe = tmp_path / "core.safe"
    done = sanitize(core, safe, scanner, strict=strict)
    assert done.verified
    assert done.objects
    assert scanner.scan(safe).clean
    assert safe.stat().st_size == core.stat().st_size

    before, after = _frames(_backtrace(core)), _frames(_backtrace(safe))
    assert set(after) == set(before) == {"1", "2"}  # both threads, from the notes
    crashing = after["1"]  # the thread that faulted comes first in the notes
    assert "strlen" in crashing[0], crashing
    assert "string_at" in crashing[1:3], crashing
    assert any(f.startswith("_PyEval") for f in crashing), crashing  # libpython's frames
    assert "??" not in crashing[:3]
    if not strict:
        assert after == before  # only key material changed
    else:
        assert done.output_disk_bytes < done.source_disk_bytes
        assert any(k.why == "link_map" for k in done.kept)


def test_cli_sanitize(crashed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    core, key, pin = crashed
    safe = tmp_path / "safe"
    argv = ["sanitize", str(core), "--out", str(safe), "--secrets", str(key), str(pin)]
    assert main([*argv, "--strict"]) == EXIT_OK
    assert main(["scan", str(safe), "--secrets", str(key), str(pin)]) == EXIT_OK
