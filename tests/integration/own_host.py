"""A token host of a test's own, for tests that freeze it or compare a store with everything in
it (the session's token host is shared by every test: its objects are other stores' keys, and
freezing it would stall them). Import the fixture into a test module to use it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from signer._internal import hsm
from tests.conftest import TokenHostHandle, wait_until


@pytest.fixture
def own_host(
    token_host: TokenHostHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TokenHostHandle]:
    # Depending on token_host makes sure the tools are there (and says so when they are not).
    root = tmp_path_factory.mktemp("hsm-own")
    # hsm.init points SOFTHSM2_CONF at the new token, and every token connection made here
    # points P11_KIT_SERVER_ADDRESS at it, process-wide: both are put back afterwards.
    saved = {k: os.environ.get(k) for k in ("SOFTHSM2_CONF", "P11_KIT_SERVER_ADDRESS")}
    host = hsm.TokenHost(root)
    try:
        hsm.init(root, tls=False)
        host.start()
        # start() returns once the socket exists, which may be before the server listens on it
        # (a client then sees no token: seen here once in about twenty starts).
        assert wait_until(lambda: _accepts(host.paths.socket), 10), "the token host is not up"
        yield TokenHostHandle(host, root)
    finally:
        if host.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.pid, signal.SIGCONT)  # a test that failed while it was frozen
        host.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def freeze(handle: TokenHostHandle) -> None:
    """Stops the token host (SIGSTOP to its process group, p11-kit-remote children included):
    a call that reaches it waits there, for real, until it is thawed."""
    assert handle.host.pid is not None
    os.killpg(handle.host.pid, signal.SIGSTOP)


def thaw(handle: TokenHostHandle) -> None:
    assert handle.host.pid is not None
    os.killpg(handle.host.pid, signal.SIGCONT)


@contextlib.contextmanager
def frozen(handle: TokenHostHandle) -> Iterator[None]:
    """The token host frozen while inside (:func:`freeze`)."""
    freeze(handle)
    try:
        yield
    finally:
        thaw(handle)
