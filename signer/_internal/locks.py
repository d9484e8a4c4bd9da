"""Per-name locks within one process: the SQLite key store's :meth:`locked` (one process owns
the file); the PostgreSQL store's lock is the database's, across replicas."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class NamedLocks:
    """A lock per name, there only while someone holds or waits for it: names that do not exist
    cannot grow the map (a caller could send any number of them)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(name, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[name]

    def __len__(self) -> int:
        """How many names have a lock now (held or waited for)."""
        with self._guard:
            return len(self._locks)
