"""Replicas behind the mTLS front (issue 16, items 2 and 5): N ``signer serve`` processes on one
token host and one PostgreSQL database, the front with every replica as an nginx upstream
(signer._internal.front, README "Replicas").

What each test proves is in its docstring. Callers are threads of this process; the order of
events is forced by events and polling with deadlines, never by sleeping.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from signer.errors import FailedPrecondition, SignerError, Unavailable
from tests.conftest import UniqueName
from tests.integration.replicas import ReplicaFactory, ReplicaSet, pg_ctl, poll

pytestmark = pytest.mark.integration


def sha(message: bytes) -> str:
    return hashlib.sha256(message).hexdigest()


@dataclass
class Outcome:
    message: bytes
    started: float
    ended: float
    error: SignerError | None  # None: answered OK


@dataclass
class Load:
    """``callers`` threads signing unique messages through the front, one call at a time each,
    until stopped; every call's outcome kept."""

    rs: ReplicaSet
    key: str
    callers: int
    outcomes: list[list[Outcome]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.outcomes = [[] for _ in range(self.callers)]
        for i in range(self.callers):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, i: int) -> None:
        with self.rs.client(timeout=20) as c:
            n = 0
            while not self.stopping.is_set():
                n += 1
                message = f"{self.key} caller {i} call {n} {time.time_ns()}".encode()
                started = time.monotonic()
                error: SignerError | None = None
                try:
                    c.sign(self.key, message=message)
                except SignerError as exc:
                    error = exc
                self.outcomes[i].append(Outcome(message, started, time.monotonic(), error))

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a caller did not finish"

    def each(self, pred: Callable[[list[Outcome]], bool]) -> Callable[[], bool]:
        return lambda: all(pred(list(o)) for o in self.outcomes)

    @property
    def all(self) -> list[Outcome]:
        return [o for per in self.outcomes for o in per]


def assert_every_ok_recorded(rs: ReplicaSet, outcomes: list[Outcome]) -> None:
    """Every call answered OK has an OK Sign record of its message's digest in some chain."""
    recorded = {
        r["payload_sha256"]
        for r in rs.records()
        if r["operation"] == "Sign" and r["status"] == "OK"
    }
    missing = [o.message for o in outcomes if o.error is None and sha(o.message) not in recorded]
    assert not missing, f"{len(missing)} calls answered OK have no record: {missing[:3]}"


def assert_chains_verify(rs: ReplicaSet) -> None:
    for r in rs.replicas:
        done = r.verify()
        assert done.returncode == 0, f"{r.name}: {done.stdout}{done.stderr}"
        assert f"(chain {r.name}) is whole" in done.stdout, done.stdout


def test_calls_through_the_front_are_spread_and_every_chain_verifies(
    replica_set: ReplicaFactory, unique_name: UniqueName
) -> None:
    """The front sends calls to every replica (each replica's chain holds some of them), each
    call is recorded once in the chain of the replica that answered it, and every replica's
    chain passes ``signer audit-log verify`` with signed checkpoints that name the others."""
    rs = replica_set(3, audit={"checkpoint_every": 5})
    name = unique_name()
    messages = [f"spread {i}".encode() for i in range(30)]
    with rs.client() as c:
        c.create_key(name, "ec-p256")
        for m in messages:
            assert c.verify(name, c.sign(name, message=m).signature, message=m)
    signs = [r for r in rs.records() if r["operation"] == "Sign" and r["key"] == name]
    by_chain = Counter(r["chain"] for r in signs)
    assert set(by_chain) == {"r1", "r2", "r3"}, by_chain
    assert min(by_chain.values()) >= 5, by_chain  # round robin: 10 each
    assert Counter(r["payload_sha256"] for r in signs) == Counter(sha(m) for m in messages)
    assert all(r["caller"].startswith("x509:O=acme,CN=payments ") for r in signs)
    assert_chains_verify(rs)
    conf = (rs.front.workdir / "nginx.conf").read_text()
    for r in rs.replicas:
        assert f"server unix:{r.front_socket} max_fails=1 fail_timeout=5s;" in conf
    assert "grpc_next_upstream error timeout;" in conf  # a connect failure: the next replica
    assert "non_idempotent" not in conf  # never resent once a replica had it
    for r in rs.replicas:
        assert "signed checkpoints" in r.verify().stdout
        assert " 0 signed checkpoints" not in r.verify().stdout


def test_a_key_disabled_through_one_replica_is_refused_at_once_by_every_other(
    replica_set: ReplicaFactory, unique_name: UniqueName
) -> None:
    """Key state is the database's, not a replica's cache: once a Disable through r1 has
    answered OK, the very next Sign on r2's and r3's own sockets (each of which had just signed
    with the key) is refused; an Enable through r3 is honoured by r1 and r2 as at once."""
    rs = replica_set(3)
    name = unique_name()
    r1, r2, r3 = (r.client() for r in rs.replicas)
    try:
        r1.create_key(name, "ec-p256")
        for c in (r1, r2, r3):
            c.sign(name, message=b"before")
        r1.disable(name, 1)
        for c in (r2, r3):
            with pytest.raises(FailedPrecondition, match="disabled"):
                c.sign(name, message=b"after disable")
        r3.enable(name, 1)
        for c in (r1, r2):
            c.sign(name, message=b"after enable")
    finally:
        for c in (r1, r2, r3):
            c.close()


def test_a_replica_killed_under_load_fails_at_most_its_calls_in_flight(
    replica_set: ReplicaFactory, unique_name: UniqueName
) -> None:
    """SIGKILL of one of three replicas while six callers sign through the front: at most the
    calls in flight on it fail (one per caller at most, each UNAVAILABLE at once, none waiting
    for its deadline), every caller's next call succeeds (the front routes around it: a call
    started after the kill fails only if it was already on its way to the dead replica), and
    every call answered OK, before or after, has its record in some replica's chain, each of
    which verifies."""
    rs = replica_set(3)
    name = unique_name()
    with rs.client() as c:
        c.create_key(name, "ec-p256")
    load = Load(rs, name, callers=6)
    load.start()
    try:
        assert poll(load.each(lambda o: sum(x.error is None for x in o) >= 10), 30) is not None
        victim = rs.replicas[0]
        killed = time.monotonic()
        victim.kill()
        after = load.each(lambda o: sum(x.started > killed and x.error is None for x in o) >= 20)
        assert poll(after, 30) is not None
    finally:
        load.stop()
    outcomes = load.all
    failed = [o for o in outcomes if o.error is not None]
    assert all(isinstance(o.error, Unavailable) for o in failed), failed
    assert len(failed) <= load.callers, failed
    # Only calls in flight at the kill may fail; a call started later is routed around r1.
    late = [o for o in failed if o.started > killed]
    assert all(o.started - killed < 1.0 for o in late), late
    # Time to route around: the longest any caller waited, from the kill, for its next OK.
    gaps = [
        min(o.ended for o in per if o.error is None and o.ended > killed) - killed
        for per in load.outcomes
    ]
    print(f"replica killed: {len(failed)} calls failed; every caller OK again {max(gaps):.3f} s on")
    # A call in flight on the dead replica fails at once, it does not wait for its deadline.
    slow = [(o.ended - o.started, o.error) for o in failed if o.ended - o.started > 2.0]
    assert not slow, slow
    assert max(gaps) < 2.0, gaps
    assert_every_ok_recorded(rs, outcomes)
    chains = Counter(r["chain"] for r in rs.records() if r["key"] == name)
    assert set(chains) == {"r1", "r2", "r3"}, chains
    assert_chains_verify(rs)


def test_postgresql_stopped_and_started_under_load_fails_closed_and_recovers(
    replica_set: ReplicaFactory, unique_name: UniqueName
) -> None:
    """PostgreSQL stopped under load from four callers through the front of two replicas:
    every call that fails is UNAVAILABLE, no call made wholly while it was down is answered OK
    (no signature without its record), and once it is started again calls succeed by
    themselves within 10 s (measured: well under one); every OK has its record and both
    chains verify."""
    rs = replica_set(2)
    name = unique_name()
    with rs.client() as c:
        c.create_key(name, "ec-p256")
    load = Load(rs, name, callers=4)
    load.start()
    try:
        assert poll(load.each(lambda o: sum(x.error is None for x in o) >= 5), 30) is not None
        pg_ctl(rs.cluster, "stop")
        stopped = time.monotonic()
        failing = load.each(
            lambda o: sum(x.started > stopped and x.error is not None for x in o) >= 2
        )
        assert poll(failing, 30) is not None
        starting = time.monotonic()
        pg_ctl(rs.cluster, "start")
        started = time.monotonic()
        recovered = load.each(
            lambda o: sum(x.started > started and x.error is None for x in o) >= 5
        )
        assert poll(recovered, 30) is not None
    finally:
        load.stop()
        if not (rs.cluster.data / "postmaster.pid").exists():
            pg_ctl(rs.cluster, "start")  # the session's other tests need it
    outcomes = load.all
    failed = [o for o in outcomes if o.error is not None]
    assert failed
    assert all(isinstance(o.error, Unavailable) for o in failed), failed
    during = [o for o in outcomes if o.started > stopped and o.ended < starting]
    assert during
    assert all(o.error is not None for o in during), "OK while PostgreSQL was down"
    first_ok = min(o.ended for o in outcomes if o.error is None and o.started > starting)
    recovery = first_ok - started
    assert recovery < 10.0, recovery
    print(f"PostgreSQL outage: first OK {recovery:.2f} s after it was started again")
    assert_every_ok_recorded(rs, outcomes)
    assert_chains_verify(rs)
