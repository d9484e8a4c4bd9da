"""signer.gate._files: what the gate (root, for every crash on the host) trusts. A path is
trusted only if no one but root could change what it names: not_root_only, used by install for
everything the handler runs, reads and writes, and by private_dir for the handler's own
directories at each dump. Tests run as root under pytest's tmp_path (/tmp/pytest-of-root, root's,
0700, below the sticky /tmp); "another user" is uid 65534."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from signer.errors import GateError
from signer.gate._files import not_root_only, private_dir
from tests.unit.gate.kit import Gate, core

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def sticky_dir(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o1777)
    return path


@pytest.fixture
def users(tmp_path: Path) -> Path:
    """A directory another user owns (0755: root still passes through it)."""
    d = tmp_path / "users"
    d.mkdir(mode=0o755)
    os.chown(d, NOBODY, NOBODY)
    return d


# --- not_root_only -----------------------------------------------------------------------------


def test_a_root_only_path_is_trusted_missing_or_not(tmp_path: Path) -> None:
    assert tmp_path.stat().st_uid == 0  # what the other tests rely on
    (tmp_path / "a").mkdir(mode=0o755)
    (tmp_path / "a" / "f").write_text("x")
    assert not_root_only(tmp_path / "a" / "f") is None
    assert not_root_only(tmp_path / "a" / "missing" / "deeper") is None


def test_an_ancestor_of_another_user_or_group_writable_is_named(
    tmp_path: Path, users: Path
) -> None:
    (users / "d").mkdir()
    assert not_root_only(users / "d") == f"{users} belongs to uid {NOBODY}"
    g = tmp_path / "g"
    g.mkdir()
    g.chmod(0o775)
    (g / "d").mkdir(mode=0o700)
    assert not_root_only(g / "d") == f"{g} is writable by group or others (mode 775)"
    (g / "d" / "f").write_text("x")
    (g / "d" / "f").chmod(0o620)
    g.chmod(0o755)
    assert (
        not_root_only(g / "d" / "f") == f"{g / 'd' / 'f'} is writable by group or others (mode 620)"
    )


def test_sticky_is_fine_on_the_way_not_at_the_end_unless_asked(tmp_path: Path) -> None:
    tmp = sticky_dir(tmp_path / "tmp")
    (tmp / "mine").mkdir(mode=0o700)
    assert not_root_only(tmp / "mine") is None
    assert "writable by group or others (mode 1777)" in str(not_root_only(tmp))
    assert not_root_only(tmp, sticky=True) is None
    tmp.chmod(0o777)  # not sticky: others may rename root's entries
    assert not_root_only(tmp, sticky=True) is not None
    assert not_root_only(tmp / "mine") is not None


def test_a_missing_name_others_could_make_first_is_refused_unless_the_caller_makes_it(
    tmp_path: Path,
) -> None:
    tmp = sticky_dir(tmp_path / "tmp")
    why = not_root_only(tmp / "gate" / "q")
    assert why is not None
    assert f"{tmp / 'gate'} does not exist and {tmp}" in why
    assert not_root_only(tmp / "gate" / "q", make=True) is None


def test_a_link_to_a_user_owned_directory_is_followed_and_refused(
    tmp_path: Path, users: Path
) -> None:
    (tmp_path / "link").symlink_to(users)
    assert not_root_only(tmp_path / "link" / "q") == f"{users} belongs to uid {NOBODY}"
    rel = tmp_path / "sub"
    rel.mkdir()
    (rel / "up").symlink_to("../users")  # resolved after the link, as the kernel does
    assert not_root_only(rel / "up" / "q") == f"{users} belongs to uid {NOBODY}"


def test_a_link_its_owner_may_replace_is_refused_though_it_leads_somewhere_root_only(
    tmp_path: Path,
) -> None:
    """/tmp/link -> a root-only directory, the link another user's in the sticky /tmp: both the
    path as given and its realpath look root's, but the link's owner may point it elsewhere
    at any time."""
    tmp = sticky_dir(tmp_path / "tmp")
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o700)
    link = tmp / "link"
    link.symlink_to(safe)
    assert not_root_only(link / "q") is None
    os.lchown(link, NOBODY, NOBODY)
    assert not_root_only(link / "q") == f"{link} (a symbolic link) belongs to uid {NOBODY}"


def test_a_link_loop_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    assert "more than 40 symbolic links" in str(not_root_only(tmp_path / "a" / "x"))


# --- private_dir ---------------------------------------------------------------------------------


def test_private_dir_makes_it_0700_and_closes_up_a_readable_one(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "state" / "q")
    assert mode(made) == 0o700
    (tmp_path / "open").mkdir(mode=0o755)
    private_dir(tmp_path / "open")
    assert mode(tmp_path / "open") == 0o700


def test_private_dir_refuses_a_user_owned_ancestor_and_makes_nothing_there(users: Path) -> None:
    with pytest.raises(GateError) as err:
        private_dir(users / "q")
    assert str(users / "q") in err.value.message
    assert f"{users} belongs to uid {NOBODY}" in err.value.message
    assert not (users / "q").exists()


def test_private_dir_refuses_a_group_writable_ancestor_and_itself(tmp_path: Path) -> None:
    g = tmp_path / "g"
    g.mkdir()
    g.chmod(0o770)
    with pytest.raises(GateError, match=r"g is writable by group or others \(mode 770\)"):
        private_dir(g / "q")
    assert not (g / "q").exists()
    g.chmod(0o700)
    (g / "q").mkdir()
    (g / "q").chmod(0o730)  # writable by the group: already theirs to fill, not closed up
    with pytest.raises(GateError, match=r"q is writable by group or others \(mode 730\)"):
        private_dir(g / "q")


def test_private_dir_refuses_a_symlinked_ancestor_to_a_user_owned_directory(
    tmp_path: Path, users: Path
) -> None:
    (tmp_path / "var").symlink_to(users)
    with pytest.raises(GateError, match=f"{users} belongs to uid {NOBODY}"):
        private_dir(tmp_path / "var" / "quarantine")
    assert not (users / "quarantine").exists()


def test_private_dir_does_not_follow_a_link_at_the_end(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    (tmp_path / "q").symlink_to(target)
    with pytest.raises(GateError, match="q is a symbolic link"):
        private_dir(tmp_path / "q")
    assert mode(target) == 0o755  # not closed up through the link
    (tmp_path / "f").write_text("x")
    with pytest.raises(GateError, match="not a directory"):
        private_dir(tmp_path / "f")


def test_private_dir_in_a_sticky_directory_is_root_made_or_refused(tmp_path: Path) -> None:
    tmp = sticky_dir(tmp_path / "tmp")
    assert mode(private_dir(tmp / "gate")) == 0o700
    (tmp / "early").mkdir()
    os.chown(tmp / "early", NOBODY, NOBODY)  # another user made the name first
    with pytest.raises(GateError, match=f"belongs to uid {NOBODY}"):
        private_dir(tmp / "early")


# --- the handler -----------------------------------------------------------------------------


def test_a_quarantine_under_another_users_directory_drops_the_dump_and_says_where(
    tmp_path: Path,
) -> None:
    """The handler (python -m signer.gate handle, which calls signer.gate.handle) refuses to
    make its quarantine below a directory uid 65534 owns: nothing is written there, the dump is
    dropped:error and the log names the directory."""
    gate = Gate(tmp_path)
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, NOBODY, NOBODY)
    gate.quarantine = parent / "q"
    gate.configure(quarantine_dir=str(gate.quarantine))
    run = gate.run(core())
    assert run.rc != 0
    assert run.entry is None
    assert not gate.quarantine.exists()
    assert run.stdout.startswith("dropped:error: ")
    (line,) = [json.loads(x) for x in (gate.state / "gate.log").read_text().splitlines()]
    assert line["decision"] == "dropped:error"
    assert f"{parent} belongs to uid {NOBODY}" in line["reason"]
    assert str(gate.quarantine) in line["reason"]
