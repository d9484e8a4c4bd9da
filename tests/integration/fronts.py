"""The production shape for tests: the service on a Unix socket, the mTLS front (real nginx,
its key in the TLS token) before it, and a development CA for both sides (the ``pki`` and
``deployment`` fixtures of tests/integration/conftest.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signer._internal import config as config_mod
from signer._internal.front import Front
from signer._internal.front import front_config as make_front_config
from signer._internal.pki import DevCA
from signer.client import ClientTLS, SignerClient
from tests.conftest import FakeClock, RunningService, ServiceFactory, TokenHostHandle, free_port

# The client certificate every deployment's policy lets do everything.
CLIENT = "payments"


def dev_pki(token_host: TokenHostHandle, root: Path) -> DevCA:
    ca = DevCA.ensure(root)
    ca.issue_server(token_host.paths.tls_public_key.read_bytes(), ["localhost", "127.0.0.1"])
    ca.issue_client(CLIENT, "acme")
    return ca


def front_config(
    token_host: TokenHostHandle, pki: DevCA, upstream: Path, workdir: Path
) -> config_mod.FrontConfig:
    return make_front_config(
        token_host.paths,
        pki,
        listen=f"127.0.0.1:{free_port()}",
        upstream=upstream,
        workdir=workdir,
    )


@dataclass
class Deployment:
    service: RunningService
    front: Front
    pki: DevCA

    @property
    def address(self) -> str:
        return self.front.cfg.front.listen

    def client(self, name: str = CLIENT) -> SignerClient:
        cert, key = self.pki.client_files(name)
        return SignerClient(self.address, tls=ClientTLS(self.pki.cert, cert, key), timeout=10)


@contextlib.contextmanager
def deploy(
    service_factory: ServiceFactory,
    token_host: TokenHostHandle,
    pki: DevCA,
    tmp_path: Path,
    front: dict[str, Any] | None = None,
    clock: FakeClock | None = None,
    **sections: dict[str, Any],
) -> Iterator[Deployment]:
    """A service (``sections`` as for ``service_factory``) and its front (``front``: settings
    over the defaults), stopped on exit."""
    socket = tmp_path / "run" / "front.sock"
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[[grant]]\ncallers = ["x509:O=acme,CN={CLIENT}"]\noperations = ["*"]\nscopes = ["*"]\n'
    )
    server = {"front_socket": str(socket), "policy_file": str(policy)} | sections.pop("server", {})
    svc = service_factory(None, clock, server=server, **sections)
    front_cfg = dataclasses.replace(
        front_config(token_host, pki, socket, tmp_path / "front"), **(front or {})
    )
    proxy = Front(dataclasses.replace(svc.server.cfg, front=front_cfg))
    proxy.start()
    try:
        yield Deployment(svc, proxy, pki)
    finally:
        proxy.stop()
