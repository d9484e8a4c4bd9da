"""Fixtures for tests that talk to the token host directly, besides the service."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pkcs11
import pytest

from signer import hsm
from signer.config import P11KIT_CLIENT_MODULE


@pytest.fixture
def own_session(token_host, monkeypatch) -> Iterator[Any]:
    """A logged-in session of the test's own through p11-kit-client.so, independent of the service.

    A fresh ``_pkcs11.lib`` object is a fresh p11-kit client instance (its own connection, its
    own p11-kit-remote), so it neither shares nor disturbs the connection of a service running in
    this process.
    """
    monkeypatch.setenv("P11_KIT_SERVER_ADDRESS", token_host.paths.server_address)
    lib = pkcs11._pkcs11.lib(P11KIT_CLIENT_MODULE)
    try:
        token = lib.get_token(token_label=hsm.DEFAULT_LABEL)
        pin = token_host.paths.user_pin.read_bytes().strip().decode("ascii")
        session = token.open(user_pin=pin, rw=True)
        try:
            yield session
        finally:
            session.close()
    finally:
        lib.finalize()
