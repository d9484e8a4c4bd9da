"""signer._internal.token._pool: the key-handle cache of a token session is bounded, least
recently used first out."""

from __future__ import annotations

from signer._internal.token._pool import _Handles


def test_the_handle_cache_keeps_its_most_recently_used() -> None:
    """The soak: the administrative connection's sessions kept a handle for every key they
    ever made (0.5 MiB a minute under lifecycle churn). Now at most ``most`` per session."""
    cache = _Handles(3)
    for i in range(5):
        cache[bytes([i])] = i
    assert list(cache) == [b"\x02", b"\x03", b"\x04"]
    assert cache.get(b"\x02") == 2  # used: now the most recent
    cache[b"\x05"] = 5
    assert list(cache) == [b"\x04", b"\x02", b"\x05"]
    assert cache.get(b"\x00") is None
