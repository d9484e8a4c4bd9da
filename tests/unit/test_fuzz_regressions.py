"""Every input the fuzzers kept, replayed through their targets (issue 12).

``fuzz/corpus/<target>/`` holds the seeds and the inputs that reached new coverage;
``fuzz/crashes/<target>/`` every input that once broke a target (kept after the fix as a
regression input); the seeds that hold a key as text are made by :mod:`fuzz.seeds` here, not
committed. Each must now meet the target's invariant (see :mod:`fuzz.targets`): no exception
but our own errors, and quickly. atheris is not needed for this.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fuzz.seeds import holds_key_text, seeds
from fuzz.targets import TARGETS

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
SECONDS_PER_INPUT = 5.0
"""Far above what any kept input takes (milliseconds); the fuzzers' own bound is 10 s."""


def _inputs() -> list[tuple[str, Path]]:
    out = []
    for kind in ("corpus", "crashes"):
        for directory in sorted((FUZZ / kind).glob("*")):
            if directory.is_dir():
                out += [(directory.name, p) for p in sorted(directory.iterdir()) if p.is_file()]
    return out


INPUTS = _inputs()
GENERATED = [(t, name, data) for t, made in seeds().items() for name, data in made.items()]


def test_every_target_has_seeds_and_every_directory_a_target() -> None:
    seeded = {target for target, p in INPUTS if p.parent.parent.name == "corpus"}
    assert seeded == set(TARGETS)
    assert {t for t, _ in INPUTS} <= set(TARGETS)


def test_corpus_stays_small_and_holds_no_key_text() -> None:
    """The committed corpus is replayed by every `make test`: a few hundred KiB at most; and no
    file in it looks like a leaked key (see fuzz.seeds)."""
    assert sum(p.stat().st_size for _, p in INPUTS) < 400 << 10
    assert [p for _, p in INPUTS if holds_key_text(p.read_bytes())] == []


def _replay(target: str, data: bytes) -> None:
    began = time.monotonic()
    TARGETS[target](data)
    assert time.monotonic() - began < SECONDS_PER_INPUT


@pytest.mark.parametrize(
    ("target", "path"), INPUTS, ids=[f"{p.parent.parent.name}/{t}/{p.name}" for t, p in INPUTS]
)
def test_replay(target: str, path: Path) -> None:
    _replay(target, path.read_bytes())


@pytest.mark.parametrize(
    ("target", "data"),
    [(t, d) for t, _, d in GENERATED],
    ids=[f"generated/{t}/{name}" for t, name, _ in GENERATED],
)
def test_replay_generated_seeds(target: str, data: bytes) -> None:
    _replay(target, data)
