"""The Unix socket local callers connect to, with their kernel-verified identity passed on.

gRPC Python tells a servicer nothing about a Unix-socket peer (``context.peer()`` is just
``unix:``; grpc/grpc#28755). So the public socket is served here: each connection's SO_PEERCRED
(uid, gid, pid, from the kernel) is read, and the connection is relayed to the gRPC server's own
socket, which sits in a directory only this process can enter, from a client socket *bound to a
name that encodes those credentials*. The gRPC server sees that name as the peer address, and
:func:`peer_credentials` reads it back. Nobody else can bind a name in that directory or connect
to the socket in it, so the name is as trustworthy as SO_PEERCRED itself
(:meth:`PeerRelay.credentials` reads it back).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PEER = re.compile(r"unix:(?P<dir>.+)/p-(?P<uid>\d+)-(?P<gid>\d+)-(?P<pid>\d+)-\d+")
_CHUNK = 256 * 1024


@contextlib.contextmanager
def created_with_mode(mode: int) -> Iterator[None]:
    """Sockets bound inside get ``mode`` from the start (umask), rather than a chmod after a
    window in which anyone could connect."""
    previous = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(previous)


class PeerRelay:
    """Listens on ``public`` (created with ``mode``) and relays to the gRPC server's socket
    :attr:`internal`, in a private (0700) directory under $TMPDIR: short, because a Unix
    socket's path is limited to 107 bytes and the bound names live there too."""

    def __init__(self, public: Path, mode: int) -> None:
        self.public = public
        self.mode = mode
        public.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.private = Path(tempfile.mkdtemp(prefix="signer-relay-"))  # 0700
        self.internal = self.private / "grpc.sock"
        self._server: asyncio.AbstractServer | None = None
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()

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
        with created_with_mode(self.mode):
            self._server = await asyncio.start_unix_server(
                self._accept, path=str(self.public), limit=_CHUNK
            )

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
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for leftover in self.private.iterdir():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        with contextlib.suppress(OSError):
            self.private.rmdir()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            sock: socket.socket = writer.get_extra_info("socket")
            pid, uid, gid = _CREDS.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
            )
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            name = self.private / f"p-{uid}-{gid}-{pid}-{next(self._ids)}"
            try:
                upstream.bind(str(name))
                upstream.setblocking(False)
                await asyncio.get_running_loop().sock_connect(upstream, str(self.internal))
            except OSError as exc:
                upstream.close()
                log.warning("relay could not reach the gRPC server", extra={"error": str(exc)})
                return
            finally:
                with contextlib.suppress(FileNotFoundError):
                    name.unlink()  # the socket keeps its name; the directory stays clean
            up_reader, up_writer = await asyncio.open_unix_connection(sock=upstream, limit=_CHUNK)
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
