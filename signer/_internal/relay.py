"""The Unix socket local callers connect to, with their kernel-verified identity passed on.

gRPC Python tells a servicer nothing about a Unix-socket peer (``context.peer()`` is just
``unix:``; grpc/grpc#28755). So the public socket is served here: each connection's SO_PEERCRED
(uid, gid, pid, from the kernel) is read, and the connection is relayed to the gRPC server's own
socket, which sits in a directory only this process can enter, from a client socket *bound to a
name that encodes those credentials*. The gRPC server sees that name as the peer address, and
:meth:`PeerRelay.credentials` reads it back. Nobody else can bind a name in that directory or
connect to the socket in it, so the name is as trustworthy as SO_PEERCRED itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import re
import socket
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from signer._internal import logs

log = logging.getLogger("signer.relay")  # named for the component: signer._internal.logs

_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PEER = re.compile(r"unix:(?P<dir>.+)/p-(?P<uid>\d+)-(?P<gid>\d+)-(?P<pid>\d+)-\d+")


@contextlib.contextmanager
def created_with_mode(mode: int) -> Iterator[None]:
    """Sockets bound inside get ``mode`` from the start (umask), rather than a chmod after a
    window in which anyone could connect."""
    previous = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(previous)


@dataclass(frozen=True)
class Limits:
    """What local callers may hold open. Each relayed connection costs the service three file
    descriptors (caller, upstream, and the gRPC server's end); two processes of one user holding
    3,500 idle connections each once took the service to its descriptor limit (issue 11)."""

    per_uid: int = 64
    total: int = 1024
    idle_seconds: float = 300.0


class PeerRelay:
    """Listens on ``public`` (created with ``mode``) and relays to the gRPC server's socket
    :attr:`internal`, in a private (0700) directory under $TMPDIR: short, because a Unix
    socket's path is limited to 107 bytes and the bound names live there too.

    A connection over ``limits`` (its uid's share, or the total) is closed as soon as it is
    accepted, and one with no traffic either way for ``limits.idle_seconds`` is closed (a gRPC
    client reconnects when it next calls); both are logged at most once a minute per uid."""

    def __init__(self, public: Path, mode: int, limits: Limits | None = None) -> None:
        self.public = public
        self.mode = mode
        self.limits = limits or Limits()
        public.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.private = Path(tempfile.mkdtemp(prefix="signer-relay-"))  # 0700
        self.internal = self.private / "grpc.sock"
        self._server: asyncio.AbstractServer | None = None
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: set[_Caller] = set()
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._sweeper: asyncio.Task[None] | None = None
        self._said = logs.Every(60.0)

    @property
    def address(self) -> str:
        """What the gRPC server listens on."""
        return f"unix:{self.internal}"

    def credentials(self, peer: str) -> tuple[int, int, int] | None:
        """(uid, gid, pid) of the caller behind a gRPC peer address this relay made, else None."""
        m = _PEER.fullmatch(peer)
        if m is None or m["dir"] != str(self.private):
            return None
        return int(m["uid"]), int(m["gid"]), int(m["pid"])

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.public.unlink()  # left behind by a process that was killed
        loop = asyncio.get_running_loop()
        with created_with_mode(self.mode):
            self._server = await loop.create_unix_server(
                lambda: _Caller(self), path=str(self.public)
            )
        self._sweeper = loop.create_task(self._sweep_idle())

    def _admit(self, caller: _Caller) -> bool:
        """Counts a new connection in, or says no (the caller then closes it)."""
        uid = caller.uid
        if self._per_uid[uid] >= self.limits.per_uid:
            why = f"uid {uid} holds {self._per_uid[uid]} connections, its most"
        elif len(self._open) >= self.limits.total:
            why = f"{len(self._open)} connections are open, the most in all"
        else:
            self._per_uid[uid] += 1
            self._open.add(caller)
            return True
        if (n := self._said.due(f"refused:{uid}")) is not None:
            log.warning(
                "local connection refused",
                extra={"uid": uid, "reason": why, "refused_since_last_said": n},
            )
        return False

    def _gone(self, caller: _Caller) -> None:
        if caller in self._open:
            self._open.discard(caller)
            self._per_uid[caller.uid] -= 1
            if not self._per_uid[caller.uid]:
                del self._per_uid[caller.uid]

    async def _sweep_idle(self) -> None:
        idle = self.limits.idle_seconds
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(idle / 4, 0.05))
            cutoff = loop.time() - idle
            for caller in [c for c in self._open if c.last_active < cutoff]:
                if (n := self._said.due(f"idle:{caller.uid}")) is not None:
                    log.info(
                        "idle local connection closed",
                        extra={"uid": caller.uid, "seconds": idle, "closed_since_last_said": n},
                    )
                caller.cut()

    def close(self) -> None:
        """Accepts no new connections; open ones go on (in-flight calls drain)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.public.unlink()

    async def stop(self) -> None:
        """Closes, cuts the connections still open, and removes the private directory."""
        self.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for caller in list(self._open):
            caller.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for leftover in self.private.iterdir():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        with contextlib.suppress(OSError):
            self.private.rmdir()

    def _upstream_socket(self, pid: int, uid: int, gid: int) -> socket.socket:
        """A socket bound to the name carrying the peer's SO_PEERCRED, not yet connected."""
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = self.private / f"p-{uid}-{gid}-{pid}-{next(self._ids)}"
        try:
            upstream.bind(str(name))
        except OSError:
            upstream.close()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                name.unlink()  # the socket keeps its name; the directory stays clean
        upstream.setblocking(False)
        return upstream


# The byte pump is two asyncio protocols wired to each other: data a side receives is written
# to the other side's transport from the event loop's read callback, with no task or coroutine
# per chunk (streams cost about twice the CPU per call). Flow control: a side whose write
# buffer fills pauses reading on the other.


class _Side(asyncio.Protocol):
    transport: asyncio.Transport
    out: asyncio.Transport | None = None  # the other side's transport, once both are up
    peer: _Side | None = None
    caller: _Caller | None = None  # whose activity this side's data counts as
    ended = False  # this side sent EOF (it will send nothing more)
    # What came before link(): CPython before 3.11.3 (Debian 12's python3 is 3.11.2) starts
    # reading an accepted socket even though connection_made paused it, so data (and EOF) can
    # arrive before there is anywhere to send them. Kept here, sent on at link().
    early = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()  # until both sides are up: see link()

    def link(self, other: _Side) -> None:
        self.out, other.out = other.transport, self.transport
        self.peer, other.peer = other, self
        other.caller = self.caller
        # Reading resumes first: writing what came early may fill the other side's buffer,
        # whose pause_writing then pauses this side again; resumed after, that pause was lost.
        # No data is read before this returns, so the bytes keep their order.
        for side in (self, other):
            if not side.ended:
                side.transport.resume_reading()
        for side in (self, other):
            if side.early:
                assert side.out is not None
                side.out.write(side.early)
                side.early = b""
        for side in (self, other):
            if side.ended:
                side.send_eof()

    def data_received(self, data: bytes) -> None:
        if self.out is None:  # before link(): see ``early``
            # The transport believes it is paused already, so pause_reading() alone would do
            # nothing there: resumed and paused again, its reader is really removed, and what
            # is kept here is one read (at most 256 KiB), not all the caller sends meanwhile.
            self.transport.resume_reading()
            self.transport.pause_reading()
            self.early += data
            return
        self.out.write(data)
        if self.caller is not None:
            self.caller.last_active = self.caller.loop.time()

    def eof_received(self) -> bool:
        self.ended = True
        return self.send_eof()

    def send_eof(self) -> bool:
        """This side's EOF passed on (once linked); whether to keep its transport open."""
        if self.out is not None:
            if self.peer is not None and self.peer.ended:
                # Both ends have said all they will: close both, or the two sockets would sit
                # half-closed each way for good (a descriptor leak found under issue 11).
                self.out.close()
                return False
            if self.out.can_write_eof():
                self.out.write_eof()
            else:
                self.out.close()
        return True  # our write side stays open until the other side is done too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.out is not None:
            self.out.close()

    def pause_writing(self) -> None:
        if self.out is not None:
            self.out.pause_reading()

    def resume_writing(self) -> None:
        if self.out is not None:
            self.out.resume_reading()

    def cut(self) -> None:
        self.transport.abort()
        if self.out is not None:
            self.out.abort()


class _Caller(_Side):
    """The caller's end, which connects the upstream end."""

    def __init__(self, relay: PeerRelay) -> None:
        self._relay = relay
        self.caller = self
        self.uid = -1
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = self.transport.get_extra_info("socket")
        self._creds = _CREDS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
        )
        self.uid = self._creds[1]
        if not self._relay._admit(self):
            self.transport.abort()
            return
        task = self.loop.create_task(self._connect())
        self._relay._tasks.add(task)
        task.add_done_callback(self._relay._tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._relay._gone(self)

    async def _connect(self) -> None:
        loop = self.loop
        try:
            upstream = self._relay._upstream_socket(*self._creds)
            try:
                await loop.sock_connect(upstream, str(self._relay.internal))
                side = _Side()
                await loop.create_unix_connection(lambda: side, sock=upstream)
            except BaseException:
                upstream.close()
                raise
        except OSError as exc:
            if (n := self._relay._said.due("upstream")) is not None:
                log.warning(
                    "relay could not reach the gRPC server",
                    extra={"error": str(exc), "failed_since_last_said": n},
                )
            self.transport.close()
            return
        if self.transport.is_closing():
            side.transport.close()
            return
        self.link(side)
