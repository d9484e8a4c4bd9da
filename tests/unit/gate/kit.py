"""What the handler's tests share: ELF cores with planted bytes, a gate configuration in a
temporary directory, and the handler run as the kernel runs it (``python -m signer.gate handle``,
the core on a pipe from another process), with its peak memory."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fuzz.elfcore import Load, build

T = 1_700_000_000

# Starts the handler from a small process and writes its peak RSS (children included) to the
# file named first. Not wait4 from pytest itself: exec records the pre-exec memory's high-water
# mark in the new program's maxrss, so a handler forked straight from a pytest that has grown
# to 1.4 GiB over a full run reported 1.4 GiB (seen in make test).
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""
WORDS = [b"signer", b"PyObject", b"grpc", b"libcrypto.so.3", b"/usr/lib/python3", b"payload"]


def memory(size: int, seed: int = 1) -> bytearray:
    """Bytes shaped like a heap (text, pointers, small integers, zero runs): the blind checks
    have few candidates in it, as in a process's memory."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(3)
        if kind == 0:
            out += bytes(rng.randrange(8, 128))
        elif kind == 1:
            out += (0x7F0000000000 + rng.randrange(1 << 32) * 16).to_bytes(8, "little")
        else:
            out += b" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 6))) + b"\0"
    return out[:size]


def core(*planted: bytes, size: int = 1 << 20, seed: int = 1, auxv: bytes | None = None) -> bytes:
    """A valid ELF core of one ``size``-byte mapping, ``planted`` bytes spread through it;
    ``auxv``: its NT_AUXV note (a process's /proc/PID/auxv: the core is then that process's)."""
    mem = memory(size, seed)
    for i, data in enumerate(planted):
        at = (i + 1) * size // (len(planted) + 2)
        mem[at : at + len(data)] = data
    return build([Load(0x7F0000000000, bytes(mem))], auxv=auxv).bytes()


def ec_scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


def pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    maxrss_kib: int
    entry: Path | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def decision(self) -> str:
        return str(self.meta["decision"])

    def report(self) -> dict[str, Any]:
        assert self.entry is not None
        doc: dict[str, Any] = json.loads((self.entry / "report.json").read_text())
        return doc


class Gate:
    """A gate under ``root``: config ``gate.toml``, state ``state/``, quarantine ``q/``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "gate.toml"
        self.state = root / "state"
        self.quarantine = root / "q"

    def configure(self, detect: dict[str, Any] | None = None, **gate: Any) -> Path:
        values: dict[str, Any] = {
            "state_dir": str(self.state),
            "quarantine_dir": str(self.quarantine),
            "min_free_bytes": 0,
        }
        values.update(gate)
        lines = ["[gate]", *(f"{k} = {toml_value(v)}" for k, v in values.items()), "[detect]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in (detect or {}).items()]
        self.config.write_text("\n".join(lines) + "\n")
        return self.config

    def previous(self, pattern: str) -> None:
        """state.json as install writes it, naming the pattern the gate replaced."""
        self.state.mkdir(mode=0o700, exist_ok=True)
        (self.state / "state.json").write_text(
            json.dumps({"installed": True, "previous_pattern": pattern, "gate_pattern": "|gate"})
        )

    def run(
        self,
        data: bytes | None = None,
        *,
        feeder: list[str] | None = None,
        pid: int = 4242,
        uid: int = 0,
        gid: int = 0,
        core_limit: int = 2**64 - 1,
        dump_mode: int = 1,
        exe: str = "/usr/bin/victim",
        command: list[str] | None = None,
        kernel: list[str] | None = None,
    ) -> Run:
        """The handler with ``data`` (or what ``feeder`` writes) on a pipe, started by
        :data:`_LAUNCHER` for its peak RSS (its children's included); ``kernel``: the
        arguments after ``--config``, instead of those made of the others."""
        if data is not None:
            src = self.root / "input.core"
            src.write_bytes(data)
            feeder = ["cat", str(src)]
        assert feeder is not None
        argv = command or [sys.executable, "-m", "signer.gate", "handle"]
        argv += ["--config", str(self.config)]
        if kernel is not None:
            argv += kernel
        else:
            argv += ["--", str(pid), str(pid), str(uid), str(gid), "11"]
            argv += [str(T), str(core_limit), str(dump_mode), "host", exe.replace("/", "!")]
        out, err = self.root / "stdout", self.root / "stderr"
        rss = self.root / "maxrss"
        began = time.monotonic()
        with open(out, "wb") as o, open(err, "wb") as e:
            feed = subprocess.Popen(feeder, stdout=subprocess.PIPE)
            assert feed.stdout is not None
            handler = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(rss), *argv],
                stdin=feed.stdout,
                stdout=o,
                stderr=e,
            )
            feed.stdout.close()
            handler.wait()
            feed.wait(60)
        seconds = time.monotonic() - began
        maxrss_kib = int(rss.read_text())
        entries = sorted(self.quarantine.iterdir()) if self.quarantine.exists() else []
        assert len(entries) <= 1, entries
        entry = entries[0] if entries else None
        meta = json.loads((entry / "meta.json").read_text()) if entry else {}
        return Run(
            handler.returncode,
            out.read_text(),
            err.read_text(),
            seconds,
            maxrss_kib,
            entry,
            meta,
        )
