"""signer._internal.hsm's provisioning of a key, with a stand-in tool: the PIN goes to the
terminal's prompts only, never to an argument; what is wrong is refused before anything runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signer._internal import hsm
from signer._internal.token.pin import Pin
from signer.errors import InvalidArgument
from tests.unit.fakes import pem

FAKE_TOOL = """
import sys, termios
out = sys.argv[1]
answers = []
for prompt in ("Please enter user PIN: ", "Please reenter user PIN: "):
    sys.stdout.write(prompt)
    sys.stdout.flush()
    answers.append(sys.stdin.readline().rstrip("\\n"))
echo = bool(termios.tcgetattr(0)[3] & termios.ECHO)
with open(out, "w") as fh:
    fh.write(repr((answers, echo, sys.stdin.isatty())))
print("ERROR: pretend failure" if answers[0] != answers[1] else "done")
sys.exit(0 if answers[0] == answers[1] else 3)
"""


def test_pin_goes_to_the_terminal_prompts_only(tmp_path: Path) -> None:
    pin_file = tmp_path / "user.pin"
    pin_file.write_bytes(b"pin-on-a-terminal-1234\n")
    os.chmod(pin_file, 0o600)
    out = tmp_path / "out"
    argv = [sys.executable, "-c", FAKE_TOOL, str(out)]
    status, errors = hsm._run_on_terminal(argv, {"PATH": "/usr/bin:/bin"}, Pin(pin_file), 30)
    assert (status, errors) == (0, "")
    # Both prompts got the PIN, typed with echo off, on a terminal.
    assert out.read_text() == repr((["pin-on-a-terminal-1234"] * 2, False, True))


def test_import_command_has_no_pin() -> None:
    argv = hsm.import_command(Path("/d/key.p8"), "label", b"\x01\x02", "signer")
    assert argv == [
        "softhsm2-util",
        "--import",
        "/d/key.p8",
        "--token",
        "signer",
        "--label",
        "label",
        "--id",
        "0102",
    ]


def test_provision_key_validates_before_running_anything(tmp_path: Path) -> None:
    root = tmp_path / "hsm"
    (root / "tokens" / "t").mkdir(parents=True)
    (root / "softhsm2.conf").write_text("")
    (root / "user.pin").write_text("1234")
    key = pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(InvalidArgument, match="label must be"):
        hsm.provision_key(root, key, "", b"\x01")
    with pytest.raises(InvalidArgument, match="label must be"):
        hsm.provision_key(root, key, "two\nlines", b"\x01")
    with pytest.raises(InvalidArgument, match="key id must be 1 to 64 bytes"):
        hsm.provision_key(root, key, "l", b"")
    with pytest.raises(InvalidArgument, match="not a PEM private key"):
        hsm.provision_key(root, b"nope", "l", b"\x01")
    assert sorted(p.name for p in root.iterdir()) == ["softhsm2.conf", "tokens", "user.pin"]


def test_the_softhsm_configuration_is_softhsm_folders_with_the_token_directory_set(
    tmp_path: Path,
) -> None:
    """make run's token host and the token host's image read one file (softhsm/softhsm2.conf);
    make run's sets only its own token directory."""
    repo = Path(__file__).resolve().parents[2]
    template = (repo / "softhsm" / "softhsm2.conf").read_text()
    assert hsm.SOFTHSM_CONF_TEMPLATE.resolve() == (repo / "softhsm" / "softhsm2.conf")
    text = hsm.softhsm_conf(tmp_path / "tokens")
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert settings == [
        f"directories.tokendir = {tmp_path / 'tokens'}",
        "objectstore.backend = file",
        "log.level = ERROR",
        "slots.removable = false",
    ]
    assert "directories.tokendir = /var/lib/signer/hsm/tokens" in template  # the image's
    assert text.count("\n") == template.count("\n")
