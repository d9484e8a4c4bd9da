"""A PostgreSQL connection cut exactly where a test wants it: at COMMIT, or made half-open.

:class:`CommitCutter` listens on a socket of its own and relays every connection to the test
cluster's socket, byte for byte. Armed (:meth:`CommitCutter.cut`), the next client message that
carries ``COMMIT`` ends its connection: with ``landed=True`` after the server has answered it
(the transaction is committed, the client never hears so), with ``landed=False`` before the
server sees it (the server rolls back when the connection goes). Either way the client's COMMIT
fails on a broken connection: the one case whose outcome it cannot know. Later connections are
relayed untouched. Real sockets and a real server; only the timing is the test's.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

_SOCKET = ".s.PGSQL.5432"


class CommitCutter:
    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        self._server = str(Path(query["host"]) / _SOCKET)
        self._dir = Path(tempfile.mkdtemp(prefix="pgcut-"))
        query["host"] = str(self._dir)
        # (urlunsplit drops the '//' of an empty host: "postgresql:/db".)
        self.dsn = (
            f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query, quote_via=quote)}"
        )
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self._dir / _SOCKET))
        self._listener.listen(16)
        self._armed: bool | None = None  # None: relay; else cut the next COMMIT, landed or not
        self._lock = threading.Lock()
        self.cuts = 0
        self._open: list[socket.socket] = []
        self._links: list[_Link] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, landed: bool) -> None:
        with self._lock:
            self._armed = landed

    def strand(self) -> None:
        """Every connection open now made half-open: gone for its client, while the server
        sees a peer that says nothing (a network cut: the server's session, and its locks,
        live on until a keepalive gives up)."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.stranded = True
            _close(link.client)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self._server)
            self._open += [client, server]
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._upstream, args=(link,), daemon=True).start()
            threading.Thread(target=link.downstream, daemon=True).start()

    def _upstream(self, link: _Link) -> None:
        # A socket the other direction closed (the server ended the session) ends this one:
        # OSError, as EOF does.
        with contextlib.suppress(OSError):
            while data := _recv(link.client):
                with self._lock:
                    armed = self._armed if link.commits(data) else None
                    if armed is not None:
                        self._armed = None
                if armed is None:
                    link.server.sendall(data)
                    continue
                if armed:
                    link.held.set()  # the server's answer is not passed on from here
                    link.server.sendall(data)
                    link.answered.wait(5)  # ReadyForQuery: committed
                self.cuts += 1
                break
        _close(link.client)
        if not link.stranded:
            _close(link.server)

    def close(self) -> None:
        self._listener.close()
        for s in list(self._open):
            _close(s)
        with contextlib.suppress(OSError):
            os.unlink(self._dir / _SOCKET)
            os.rmdir(self._dir)


class _Link:
    """One relayed connection; the server's bytes go on to the client until ``held``."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.held = threading.Event()
        self.answered = threading.Event()  # held, and the server said ReadyForQuery since
        self.stranded = False  # its server side is left open (CommitCutter.strand)
        self._prepared: set[bytes] = set()  # names of statements this client prepared as COMMIT

    def commits(self, data: bytes) -> bool:
        """Whether the client's bytes carry a COMMIT: its text, or, once psycopg has prepared
        it (after prepare_threshold uses), a Bind of the statement a Parse named for it."""
        unnamed = False
        for name in _PARSED_COMMIT.findall(data):
            if name:
                self._prepared.add(name)  # prepared now, executed by a Bind (maybe later)
            else:
                unnamed = True  # parsed, bound and executed at once
        if unnamed or _QUERIED_COMMIT.search(data):
            return True
        return any(_bound(name).search(data) for name in self._prepared)

    def downstream(self) -> None:
        seen = b""
        while data := _recv(self.server):
            if self.held.is_set():
                seen = seen[-8:] + data
                if b"Z\x00\x00\x00\x05" in seen:
                    self.answered.set()
                continue
            try:
                self.client.sendall(data)
            except OSError:
                break
        _close(self.server, self.client)


# A Parse message (type, length, statement name, query) of COMMIT; and a Bind of a statement by
# name (type, length, unnamed portal, statement name).
_PARSED_COMMIT = re.compile(rb"P.{4}([^\x00]*)\x00COMMIT\x00", re.DOTALL)
_QUERIED_COMMIT = re.compile(rb"Q.{4}COMMIT\x00", re.DOTALL)  # a simple Query


def _bound(name: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"B.{4}\x00" + re.escape(name) + rb"\x00", re.DOTALL)


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


@contextlib.contextmanager
def commit_cutter(dsn: str) -> Iterator[CommitCutter]:
    cutter = CommitCutter(dsn)
    try:
        yield cutter
    finally:
        cutter.close()
