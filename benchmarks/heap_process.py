"""A process that fills its memory the way a busy server's heap looks, then waits to be dumped.

``python -m benchmarks.heap_process RECORDS_MIB TEXT_MIB RANDOM_MIB``: about ``RECORDS_MIB`` of
Python records (dicts of an id, a user name, a URL path, a float score and a list of small
integers), ``TEXT_MIB`` of log-like text lines (bytes), and ``RANDOM_MIB`` of 1 MiB random blobs
(what compressed or encrypted payloads look like: high-entropy bytes). Every page is written.
It prints ``ready PID`` on stdout when done and sleeps until it is killed. Standard library
only, so its core holds the interpreter and its memory, and nothing of the benchmark.
"""

from __future__ import annotations

import os
import random
import sys
import time

MIB = 1 << 20
RECORD_BYTES = 600  # what one record costs in the heap, roughly (dict, strings, list, ints)
WORDS = b"GET POST /api/v1/items 200 404 user session latency_ms ok error grpc timeout".split()


def fill(records_mib: int, text_mib: int, random_mib: int, seed: int = 7) -> list[object]:
    """What the process holds: the records, the lines and the blobs (kept alive by the caller)."""
    rng = random.Random(seed)  # noqa: S311  (filler, not secrets)
    records = [
        {
            "id": i,
            "user": f"user{rng.randrange(10**6):06d}",
            "path": f"/api/v1/items/{rng.randrange(10**9)}",
            "score": rng.random(),
            "tags": [rng.randrange(1000) for _ in range(4)],
        }
        for i in range(records_mib * MIB // RECORD_BYTES)
    ]
    lines: list[bytes] = []
    size = 0
    while size < text_mib * MIB:
        line = b" ".join(rng.choices(WORDS, k=12)) + b" %d\n" % rng.randrange(10**9)
        lines.append(line)
        size += len(line) + 33  # the bytes object's header
    blobs = [rng.randbytes(MIB) for _ in range(random_mib)]
    return [records, lines, blobs]


def main(argv: list[str]) -> int:
    records_mib, text_mib, random_mib = (int(a) for a in argv)
    held = fill(records_mib, text_mib, random_mib)
    print(f"ready {os.getpid()}", flush=True)
    while held:
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
