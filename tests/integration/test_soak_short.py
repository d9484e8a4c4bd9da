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

The restart sometimes meets a defect of the service (KNOWN_HANG, below): the service never
serves again. The test then checks every invariant that defect leaves standing (no wrong
signature or answer, no OK answer without its record, the log whole) and is an expected
failure naming it, rather than a red ``make test`` for everyone until it is fixed; ``make
soak`` fails on it.
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

# Found by the soak (issue 12), in code this test does not own: when the token host is stopped
# in the middle of an answer, p11-kit-client.so (0.24) leaves the other threads waiting on that
# connection blocked for good (rpc_socket_read never resets its read code nor broadcasts its
# condition on the error path); signer/token/_client.py's _try_connect then waits for the dead
# connection's sessions to come back before reconnecting (_drain), which the stuck lane never
# does: the service never serves again, and SIGTERM does not stop it.
KNOWN_HANG = "the service does not reconnect: a lane is stuck in p11-kit-client.so"

SECONDS = 51  # the restart comes at 24 s, and the service has about 15 s more after it
RESTART_EVERY = 24


def test_a_short_soak_keeps_every_invariant(token_host: TokenHostHandle, tmp_path: Path) -> None:
    # token_host: only so that missing tools fail (or skip) this test the way they do others.
    out = tmp_path / "soak.json"
    argv = [
        sys.executable, "-m", "tests.soak",
        "--minutes", str(SECONDS / 60), "--restart-every", str(RESTART_EVERY / 60),
        "--rss-max-growth-mib", "48",
        "--work", str(tmp_path / "work"), "--json", str(out),
    ]  # fmt: skip
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

    hang = r.get("hang")
    if hang and hang["threads_in_p11_kit_client"]:
        # A known defect of the service, not of this test: see KNOWN_HANG. Everything but its
        # consequences (the stuck call's deadline, no service after the restart, no clean
        # stop) was checked above; once it is fixed this branch is never taken.
        assert {k.split()[-1] for k in r["unexpected"]} <= {"DEADLINE_EXCEEDED"}, r["unexpected"]
        pytest.xfail(f"{KNOWN_HANG} ({hang['threads_in_p11_kit_client']} threads; {hang})")

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
