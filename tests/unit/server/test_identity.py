"""signer._internal.server._identity: local callers' user names are looked up once per uid
for a while, not on every call."""

from __future__ import annotations

import os
import pwd

from signer._internal.server._identity import UserNames


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_name_is_looked_up_once_then_again_after_its_time() -> None:
    looked: list[int] = []
    names = {1000: "alice"}

    def lookup(uid: int) -> str | None:
        looked.append(uid)
        return names.get(uid)

    clock = _Clock()
    user_of = UserNames(seconds=10.0, lookup=lookup, clock=clock)
    assert [user_of(1000) for _ in range(5)] == ["alice"] * 5
    assert looked == [1000]
    names[1000] = "alice2"  # renamed: seen once the entry's time is up, not before
    clock.now += 9.9
    assert user_of(1000) == "alice"
    clock.now += 0.2
    assert user_of(1000) == "alice2"
    assert looked == [1000, 1000]


def test_a_uid_without_a_name_is_remembered_as_such() -> None:
    looked: list[int] = []

    def lookup(uid: int) -> str | None:
        looked.append(uid)
        return None

    user_of = UserNames(lookup=lookup, clock=_Clock())
    assert user_of(4242) is None
    assert user_of(4242) is None
    assert looked == [4242]


def test_the_cache_is_bounded() -> None:
    user_of = UserNames(most=4, lookup=str, clock=_Clock())
    for uid in range(100):
        assert user_of(uid) == str(uid)
    assert len(user_of._known) <= 4


def test_the_default_lookup_is_the_password_database() -> None:
    uid = os.getuid()
    assert UserNames()(uid) == pwd.getpwuid(uid).pw_name
    assert UserNames()(2**31 - 7) is None  # no such user
