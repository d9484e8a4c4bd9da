"""signer._internal.token._logins: the login guard tries a wrong PIN again only when its file
changes, and only so often."""

from __future__ import annotations

from pathlib import Path

from signer._internal.token._logins import EXPIRED, INCORRECT, LOCKED, LoginGuard


class File:
    """Stands for the PIN file: its stamp changes when an operator writes it."""

    def __init__(self) -> None:
        self.version = 0

    def write(self) -> None:
        self.version += 1

    def stamp(self) -> int:
        return self.version


def guard(limit: int = 2) -> tuple[LoginGuard, File]:
    f = File()
    return LoginGuard(limit, "/etc/signer/user.pin", f.stamp), f


def test_a_first_login_may_always_be_tried() -> None:
    g, _ = guard()
    assert g.may_try()
    assert g.refusal is None


def test_after_a_refused_pin_no_retry_until_the_file_changes() -> None:
    g, f = guard(limit=3)
    g.failed(INCORRECT)
    assert g.failures == 1
    assert [g.may_try() for _ in range(100)] == [False] * 100  # no storm, however often asked
    assert g.refusal is not None
    assert "/etc/signer/user.pin" in g.refusal
    assert "2 more time(s)" in g.refusal
    f.write()
    assert g.may_try()


def test_the_bound_holds_even_when_the_file_keeps_changing() -> None:
    g, f = guard(limit=2)
    g.failed(INCORRECT)
    f.write()
    assert g.may_try()
    g.failed(INCORRECT)
    f.write()
    assert not g.may_try()
    assert g.refusal is not None
    assert "stopped trying" in g.refusal
    assert "restart" in g.refusal


def test_a_locked_pin_is_never_retried() -> None:
    g, f = guard(limit=5)
    g.failed(LOCKED)
    f.write()
    assert not g.may_try()
    assert g.refusal is not None
    assert "CKR_PIN_LOCKED" in g.refusal


def test_an_expired_pin_says_so_and_waits_for_a_new_file() -> None:
    g, f = guard()
    g.failed(EXPIRED)
    assert g.refusal is not None
    assert "expired" in g.refusal
    assert not g.may_try()
    f.write()
    assert g.may_try()


def test_success_resets_the_count() -> None:
    g, f = guard(limit=2)
    g.failed(INCORRECT)
    f.write()
    g.succeeded()
    assert g.failures == 0
    assert g.refusal is None
    assert g.may_try()
    g.failed(INCORRECT)  # a fresh run of failures gets the whole budget again
    f.write()
    assert g.may_try()


def test_reconnects_back_off_to_their_cap(tmp_path: Path) -> None:
    """A lost token is looked for at the health interval, then half as often after each failed
    attempt, up to ``token.reconnect_max_seconds``; connected, at the interval again."""
    from signer._internal.config import TokenConfig
    from signer._internal.token import Pin, Token

    cfg = TokenConfig(health_interval_seconds=0.5, reconnect_max_seconds=4.0)
    token = Token(cfg, Pin(tmp_path / "pin"))
    waits = []
    for failures in range(7):
        token._connect_failures = failures
        waits.append(token._next_check())
    assert waits == [0.5, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
