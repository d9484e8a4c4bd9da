"""``signer run``: a token host and the service together, for a laptop or a demo.

Creates ``DIR/hsm`` (the token) and ``DIR/signer.toml`` on first use, starts the token host, runs
the service in the foreground and makes sure a demo key exists. Ctrl-C stops both, service first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from signer import config as config_mod
from signer import hsm
from signer.errors import NotFound
from signer.server import Server, harden_process

log = logging.getLogger(__name__)

DEMO_KEY = "demo"
DEMO_ALGORITHM = "ec-p256"


def write_config(root: Path, listen: str) -> Path:
    """The service's configuration for a token host in ``root/hsm``; kept if it exists."""
    path = root / "signer.toml"
    if not path.exists():
        paths = hsm.HsmPaths((root / "hsm").absolute())
        path.write_text(
            "# Written by 'signer run'. SIGNER_<SECTION>_<NAME> environment variables override.\n"
            "[server]\n"
            f'listen = "{listen}"\n\n'
            "[token]\n"
            f'module = "{config_mod.P11KIT_CLIENT_MODULE}"\n'
            f'server_address = "{paths.server_address}"\n'
            f'uri = "pkcs11:token={hsm.DEFAULT_LABEL}"\n'
            f'pin_file = "{paths.user_pin}"\n\n'
            "[store]\n"
            f'path = "{(root / "signer.db").absolute()}"\n'
        )
    return path


async def _run(root: Path, listen: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    hsm_dir = root / "hsm"
    if not hsm.HsmPaths(hsm_dir.absolute()).initialised():
        hsm.init(hsm_dir)
        print(f"created a SoftHSM2 token in {hsm_dir} (PINs in owner-only files there)", flush=True)
    cfg = config_mod.load(write_config(root, listen))
    harden_process(cfg)
    host = hsm.TokenHost(hsm_dir)
    host.start()
    server = Server(cfg)
    try:
        await server.start()
        if not server.token.available:
            raise SystemExit("the token host did not answer; see the log above")
        try:
            await server.run_blocking(lambda: server.signer.get_key(DEMO_KEY))
        except NotFound:
            await server.run_blocking(
                lambda: server.signer.create_key(DEMO_KEY, DEMO_ALGORITHM, scope="demo")
            )
        print(
            f"signer listening on {cfg.server.listen}, token host on {host.paths.socket}\n"
            f"  try: {sys.argv[0]} sign {DEMO_KEY} --in README.md --out /tmp/sig.der\n"
            "  Ctrl-C stops both.",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping", flush=True)
    finally:
        await server.stop()
        host.stop()


def run(root: str | Path, listen: str = "127.0.0.1:50051") -> int:
    asyncio.run(_run(Path(root), listen))
    return 0
