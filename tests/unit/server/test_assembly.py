"""signer._internal.server's assembly: a SIGHUP's reload keeps the old policy for a broken
file (every one of tests/unit/test_hostile_config.py's), which is a ConfigError and only that;
each reload is counted by its result."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from signer._internal import config, policy
from signer._internal.metrics import Exported
from signer._internal.server import Server
from tests.unit.test_hostile_config import BROKEN_POLICIES, GOOD, write


def _reloading_server(path: Path, old: policy.Policy) -> SimpleNamespace:
    """What Server.reload_policy reads of its server: the real method, a server without a
    token. ``_load_policy`` is the real one too."""
    fake = SimpleNamespace(
        policy_from_file=True,
        cfg=config.Config(config.ServerConfig(policy_file=str(path))),
        policy=old,
        metrics=Exported(),
    )
    # A stand-in for the server, with only what the methods read: not a Server, on purpose.
    fake._load_policy = lambda: Server._load_policy(fake)  # type: ignore[arg-type]
    return fake


@pytest.mark.parametrize(("text", "fragment"), BROKEN_POLICIES)
def test_reload_of_a_broken_policy_keeps_the_old_one(
    tmp_path: Path, text: str | bytes, fragment: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every broken file is a ConfigError, the one exception reload_policy catches: before,
    a non-UTF-8 byte, deep nesting or a long integer escaped it as another exception."""
    path = write(tmp_path, GOOD)
    old = policy.load(path)
    server = _reloading_server(path, old)
    write(tmp_path, text)
    with caplog.at_level(logging.ERROR):
        assert Server.reload_policy(server) is False  # type: ignore[arg-type]  # the stand-in
    assert server.policy is old
    assert any("previous one stays" in r.getMessage() for r in caplog.records)
    reloads = "signer_policy_reloads_total"
    assert server.metrics.value(reloads, result="refused") == 1
    assert server.metrics.value(reloads, result="ok") == 0
    write(tmp_path, GOOD.replace("sign", "read"))
    assert Server.reload_policy(server) is True  # type: ignore[arg-type]  # the stand-in
    assert server.policy is not old
    assert server.metrics.value(reloads, result="ok") == 1
