"""The soak (tests/soak, ``make soak``: 30 minutes), short: under a minute of every RPC from
fourteen callers, the token host restarted once, then the same invariants: every signature
verified and none wrong, every OK answer with its audit record and the log whole, no status a
call should never get (INTERNAL, a hang, ...), every RPC answered OK, the service serving again
after the restart and stopping cleanly.

The driver runs as its own process: it points SOFTHSM2_CONF at a token host of its own and
starts threads and a service, none of which this test session should share. Its own token
host, never the session's (which it could not restart under the other tests).

RSS: under a minute, the second half of the run is still warm-up (arenas and caches growing
to their working size, the restart's reconnection), so only ballooning is told apart here
(48 MiB); whether RSS stays flat is for the 30-minute soak to say.

The restart once met a hang of p11-kit-client.so (0.24): when the token host dies in the middle
of an answer, other threads waiting on that connection stay blocked for good, and the service
waited for their sessions before reconnecting, so it never served again. The service now gives
such a connection up after 5 s and replaces the stuck lanes (signer/_internal/token/_pool.py,
SessionPool._abandon_dead), so this test expects it to serve again after every restart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TokenHostHandle
from tests.soak.ledger import METHODS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECONDS = 51  # the restart comes at 24 s, and the service has about 15 s more after it
RESTART_EVERY = 24


def test_a_short_soak_keeps_every_invariant(token_host: TokenHostHandle, tmp_path: Path) -> None:
    # token_host: only so that missing tools fail (or skip) this test the way they do others.
    out = tmp_path / "soak.json"
    argv = [
        sys.executable,
        "-m",
        "tests.soak",
        "--minutes",
        str(SECONDS / 60),
        "--restart-every",
        str(RESTART_EVERY / 60),
        "--rss-max-growth-mib",
        "48",
        "--work",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=280)
    shown = f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert out.exists(), shown
    r = json.loads(out.read_text())

    # What must hold whatever else happened: no wrong answer, no OK answer unrecorded.
    assert r["signatures_verified"] > 1000, shown
    assert r["wrong_signatures"] == 0, r["wrong_samples"]
    assert r["verify_answers"].get("wrong", 0) == 0, r["defect_samples"]
    assert r["defects"] == {}, r["defect_samples"]
    audit = r["audit"]
    assert audit["whole"], audit["verify_output"]
    assert audit["lost_records"] == 0, audit
    assert audit["ok_answers_checked"] == sum(c["ok"] for c in r["calls"].values())

    assert r["unverified_signatures"] == 0, shown
    assert r["unexpected"] == {}, r["unexpected_samples"]
    assert "INTERNAL" not in r["errors_by_status"], r["unexpected_samples"]
    assert [m for m in METHODS if not r["calls"][m]["ok"]] == [], shown

    assert len(r["restarts"]) == 1, r["restarts"]
    assert r["restarts"][0]["serving_at"] is not None, r["restarts"]
    assert r["service_exit"] == 0, shown

    assert r["rss"]["flat"], r["rss"]
    assert r["passed"], r["failures"]
    assert proc.returncode == 0, shown
