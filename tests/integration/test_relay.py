"""The local socket under a hostile local user: connections capped per uid and in all, idle ones
closed, and the log not amplified (issue 11: two processes as nobody holding 3,500 idle
connections each took the service to its descriptor limit; root's Sign timed out)."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    RunningService,
    ServiceFactory,
    UniqueName,
    as_user,
    log_lines,
    python_for_others,
    wait_until,
)

pytestmark = pytest.mark.integration

# Opens N connections; waits until the relay has closed as many as it must refuse (it closes
# them at once), checks the rest are open, prints both counts, and holds them until stdin ends.
HOG = r"""
import select, socket, sys
path, n, refuse = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    held.append(s)
closed = set()
poll = select.poll()
for s in held:
    poll.register(s, select.POLLIN | select.POLLHUP)
while len(closed) < refuse:
    events = poll.poll(30_000)
    if not events:
        break
    for fd, _ in events:
        s = next(x for x in held if x.fileno() == fd)
        if not s.recv(1, socket.MSG_PEEK):
            closed.add(fd)
            poll.unregister(fd)
still_open = [s for s in held if s.fileno() not in closed]
for s in still_open:
    s.setblocking(False)
    try:
        if s.recv(1, socket.MSG_PEEK) == b"":
            closed.add(s.fileno())
    except BlockingIOError:
        pass
print(n - len(closed), len(closed), flush=True)
sys.stdin.read()
"""


def closed_at_once(address: str) -> bool:
    """Whether a new connection from this process is closed by the relay without a word (the
    wait ends with EOF; an admitted connection would hold until the test's 30-s bound)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(address.removeprefix("unix:"))
        s.settimeout(30)
        try:
            return s.recv(1) == b""
        except ConnectionResetError:
            return True


@pytest.fixture
def relay_log() -> Iterator[list[str]]:
    with log_lines("signer.relay") as lines:
        yield lines


def open_to_others(svc: RunningService) -> None:
    sock = Path(svc.address.removeprefix("unix:"))
    os.chmod(sock, 0o666)
    os.chmod(sock.parent, 0o711)


def test_one_local_user_cannot_take_every_connection(
    service_factory: ServiceFactory, unique_name: UniqueName, relay_log: list[str]
) -> None:
    svc = service_factory(server={"max_connections_per_uid": 4, "max_connections": 6})
    open_to_others(svc)
    c = svc.client()
    name = unique_name()
    c.create_key(name, "ec-p256")  # root's channel: one connection
    nobody = pwd.getpwnam("nobody")
    hog = subprocess.Popen(
        [*python_for_others(), "-c", HOG, svc.address.removeprefix("unix:"), "10", "6"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **as_user(nobody),
    )
    try:
        assert hog.stdout is not None
        assert hog.stdout.readline().split() == ["4", "6"]  # held, refused
        # Root is not starved: its calls go on, and the total has room for one more.
        assert c.sign(name, message=b"still here").version == 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sixth:
            sixth.connect(svc.address.removeprefix("unix:"))
            assert closed_at_once(svc.address)  # the seventh in all
    finally:
        hog.communicate("", timeout=30)
    # Six refusals from nobody and one from root: one log line each, not seven.
    refusals = [line for line in relay_log if line == "local connection refused"]
    assert len(refusals) == 2
    assert c.sign(name, message=b"after").version == 1


def test_an_idle_connection_is_closed(
    service_factory: ServiceFactory, unique_name: UniqueName
) -> None:
    svc = service_factory(server={"idle_connection_seconds": 0.5})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(svc.address.removeprefix("unix:"))
        s.settimeout(30)
        while s.recv(4096):  # the server's HTTP/2 preface, then nothing: the caller says nothing
            pass  # ends with EOF from the relay (or the test's bound, and a failure)
    c = svc.client()  # a gRPC client reconnects when it calls again
    name = unique_name()
    c.create_key(name, "ec-p256")
    assert c.sign(name, message=b"m").version == 1


def test_connections_their_callers_close_are_released(service: RunningService) -> None:
    """Both ends of a relayed connection half-closed (the caller's EOF passed on, then the
    server's) used to stay open for good: a descriptor leak that a busy client turned into
    refusals. Each closed client's connection is gone before the next one opens."""
    relay = service.server.relay
    for _ in range(30):
        with service.client() as c:
            c.list_keys()
        assert wait_until(lambda: not relay._open, 10), f"{len(relay._open)} still open"
