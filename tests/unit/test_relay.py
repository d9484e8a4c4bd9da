"""signer._internal.relay's peer names: the credentials a relayed connection's bound name
carries, and read back only from a name this relay made (the relaying itself, under hostile
local users, is tests/integration/test_relay.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from signer._internal.relay import PeerRelay, _Side, created_with_mode


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[PeerRelay]:
    """A relay that is never started: its private directory exists, nothing listens."""
    r = PeerRelay(tmp_path / "run" / "signer.sock", 0o660)
    yield r
    shutil.rmtree(r.private, ignore_errors=True)


def test_a_bound_name_carries_the_credentials_back(relay: PeerRelay) -> None:
    """The name the relay binds its upstream end to is what gRPC reports as the peer."""
    upstream = relay._upstream_socket(pid=4242, uid=1000, gid=100)
    try:
        peer = "unix:" + upstream.getsockname()
    finally:
        upstream.close()
    assert relay.credentials(peer) == (1000, 100, 4242)
    assert os.listdir(relay.private) == []  # the name is unlinked once bound


def test_each_connection_gets_a_name_of_its_own(relay: PeerRelay) -> None:
    first, second = (relay._upstream_socket(7, 0, 0) for _ in range(2))
    try:
        assert first.getsockname() != second.getsockname()
        assert relay.credentials("unix:" + first.getsockname()) == (0, 0, 7)
        assert relay.credentials("unix:" + second.getsockname()) == (0, 0, 7)
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(
    "name",
    [
        "p-1000-100-4242-0",
        "p-0-0-1-99999",
        "p-4294967295-4294967295-4194304-12",  # the largest uid, gid and pid Linux hands out
    ],
)
def test_names_in_the_private_directory_are_read(relay: PeerRelay, name: str) -> None:
    uid, gid, pid = (int(n) for n in name.split("-")[1:4])
    assert relay.credentials(f"unix:{relay.private}/{name}") == (uid, gid, pid)


@pytest.mark.parametrize(
    "peer",
    [
        "",
        "unix:",
        "unix:{private}",
        "unix:{private}/",
        "unix:{private}/grpc.sock",  # the server's own socket
        "unix:{private}/p-1000-100-4242",  # no connection number
        "unix:{private}/p-1000-100-4242-",
        "unix:{private}/p-1000-100-4242-0-1",
        "unix:{private}/p--1-100-4242-0",  # a negative uid
        "unix:{private}/p-1000-100-4242-0 ",
        "unix:{private}/p-1000-100-4242-0\n",
        "unix:{private}/p-1e3-100-4242-0",
        "unix:{private}/p-x-100-4242-0",
        "unix:{private}/q-1000-100-4242-0",
        "unix:{private}/sub/p-1000-100-4242-0",  # deeper than the private directory
        "unix:{private}/../p-1000-100-4242-0",
        "unix:{private}x/p-1000-100-4242-0",  # a directory whose name begins like it
        "unix:/tmp/p-1000-100-4242-0",  # someone else's name of the same shape
        "unix:/elsewhere{private}/p-1000-100-4242-0",
        "unix-abstract:{private}/p-1000-100-4242-0",
        " unix:{private}/p-1000-100-4242-0",
        "{private}/p-1000-100-4242-0",  # no scheme
        "ipv4:127.0.0.1:50051",
        "ipv6:[::1]:50051",
    ],
)
def test_any_other_peer_has_no_credentials(relay: PeerRelay, peer: str) -> None:
    """A peer the relay did not make (TCP, another directory, a malformed name) is nobody's:
    the caller is then unauthenticated, not somebody."""
    assert relay.credentials(peer.format(private=relay.private)) is None


def test_another_relays_names_are_not_this_ones(tmp_path: Path) -> None:
    one = PeerRelay(tmp_path / "one.sock", 0o660)
    other = PeerRelay(tmp_path / "other.sock", 0o660)
    try:
        upstream = other._upstream_socket(1, 2, 3)
        peer = "unix:" + upstream.getsockname()
        upstream.close()
        assert other.credentials(peer) == (2, 3, 1)
        assert one.credentials(peer) is None
    finally:
        shutil.rmtree(one.private, ignore_errors=True)
        shutil.rmtree(other.private, ignore_errors=True)


def test_the_private_directory_is_the_owners_alone(relay: PeerRelay) -> None:
    """Nobody else may bind a name in it: that is what makes a name as good as SO_PEERCRED."""
    assert stat.S_IMODE(relay.private.stat().st_mode) == 0o700
    assert relay.private.stat().st_uid == os.getuid()
    assert relay.address == f"unix:{relay.private}/grpc.sock"
    assert len(str(relay.private / "p-4294967295-4294967295-4194304-999999")) <= 107


def test_sockets_are_created_with_their_mode_and_the_umask_is_put_back(tmp_path: Path) -> None:
    before = os.umask(0o022)
    try:
        with created_with_mode(0o660), socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp_path / "s.sock"))
        assert stat.S_IMODE((tmp_path / "s.sock").stat().st_mode) == 0o660
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


@pytest.fixture
def python_3_11_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio as in CPython before 3.11.3 (Debian 12's python3): a new socket transport starts
    reading after connection_made even if the protocol paused it there (its _add_reader did
    not look whether the transport was paused)."""

    def add_reader(self: Any, fd: int, callback: Callable[..., None], *args: Any) -> None:
        self._loop._add_reader(fd, callback, *args)

    monkeypatch.setattr("asyncio.selector_events._SelectorTransport._add_reader", add_reader)


def test_what_arrives_before_both_sides_are_up_is_kept_bounded_and_passed_on(
    python_3_11_2: None,
) -> None:
    """Data and EOF reach a side before it has anywhere to send them (an AttributeError that
    failed every local call in the service's container). What is kept is one read, however
    much the caller sends meanwhile; at link() it goes on in order, the EOF after it, and the
    flow control its write starts holds (the other end reads nothing yet: reading stays paused)."""
    sent = bytes(range(256)) * 4096  # 1 MiB, more than one read (256 KiB) and any buffer

    async def main() -> tuple[int, bool, bytes, bytes]:
        loop = asyncio.get_running_loop()
        caller_end, caller_relay = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        service_end, service_relay = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (caller_end, service_end):
            end.setblocking(False)
        service_relay.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fills at once
        caller_t, caller = await loop.connect_accepted_socket(_Side, caller_relay)
        service_t, service = await loop.connect_accepted_socket(_Side, service_relay)
        service_t.set_write_buffer_limits(high=1024)
        writer = asyncio.ensure_future(loop.sock_sendall(caller_end, sent))
        try:
            assert nothing_readable(service_end)  # nothing passes before link
            await wait_for_state(lambda: bool(caller.early))
            for _ in range(50):  # turns of the loop: a reader still there would read on
                await asyncio.sleep(0)
            kept = len(caller.early)
            service.data_received(b"SETTINGS")  # the server speaks first in HTTP/2
            caller.link(service)
            paused = not caller_t.is_reading()  # the early write filled the service's side
            got = await read_exactly(loop, service_end, len(sent))
            await writer
            caller_end.shutdown(socket.SHUT_WR)
            got += await read_to_eof(loop, service_end)
            return kept, paused, got, await loop.sock_recv(caller_end, 100)
        finally:
            writer.cancel()
            for t in (caller_t, service_t):
                t.close()
            for end in (caller_end, service_end):
                end.close()
            await asyncio.sleep(0)  # the transports' close callbacks run

    kept, paused, to_service, to_caller = asyncio.run(main())
    assert 0 < kept <= 256 * 1024, kept
    assert paused
    assert to_service == sent
    assert to_caller == b"SETTINGS"


def nothing_readable(end: socket.socket) -> bool:
    try:
        return end.recv(100) == b""  # EOF: nothing either
    except BlockingIOError:
        return True


async def wait_for_state(predicate: Callable[[], bool]) -> None:
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the state never came")


async def read_exactly(loop: asyncio.AbstractEventLoop, end: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(end, n - len(out)), 10)
        assert chunk, "EOF before all the data"
        out += chunk
    return out


async def read_to_eof(loop: asyncio.AbstractEventLoop, end: socket.socket) -> bytes:
    out = b""
    while chunk := await asyncio.wait_for(loop.sock_recv(end, 65536), 10):
        out += chunk
    return out
