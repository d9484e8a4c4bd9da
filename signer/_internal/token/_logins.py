"""How many times the service may try the PIN: an HSM punishes retries.

Real HSMs count failed logins and lock the user after a few (three to ten is common; the
security officer must then unlock it, and some models zeroise). A service that retried a wrong
PIN at every health tick would lock its own token within seconds of someone rotating the PIN
without telling it, and the outage would outlive the fix. So:

* after a refused attempt the service does not try again with the same PIN file: it tries once
  more only when that file changes (an operator wrote the new PIN), and only while fewer than
  ``token.max_failed_logins`` logins in a row have failed;
* past that bound, or when the token says the PIN is locked, it stops trying altogether until
  it is restarted;
* meanwhile every call is refused FAILED_PRECONDITION with the reason (it is not a fault that
  waiting would cure, which UNAVAILABLE would suggest), and health says NOT_SERVING.

A successful login resets the count, as a token's own counter is reset.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

# What the token may answer at C_Login, and what it means for the next attempt.
INCORRECT = "incorrect"  # wrong PIN (or one the token cannot take): retry only with a new file
EXPIRED = "expired"  # the token wants a new PIN set: likewise
LOCKED = "locked"  # the token refuses the user until its security officer acts: never retry


class LoginGuard:
    """Counts failed logins in a row and says whether another may be tried; thread-safe.

    ``stamp()`` identifies the PIN file's current contents (its inode, size and times), or
    None when it cannot be read: a new stamp is an operator's change."""

    def __init__(self, limit: int, pin_file: str, stamp: Callable[[], Hashable | None]) -> None:
        self._limit = limit
        self._pin_file = pin_file
        self._stamp = stamp
        self._lock = threading.Lock()
        self._failures = 0
        self._failed_stamp: Hashable | None = None
        self._locked = False
        self._refusal: str | None = None

    @property
    def failures(self) -> int:
        """Failed logins in a row."""
        return self._failures

    @property
    def refusal(self) -> str | None:
        """Why calls are refused FAILED_PRECONDITION, or None while logins are not the problem."""
        return self._refusal

    def may_try(self) -> bool:
        """Whether a login may be attempted now."""
        with self._lock:
            if self._failures == 0:
                return True
            if self._locked or self._failures >= self._limit:
                return False
            return self._stamp() != self._failed_stamp

    def failed(self, kind: str) -> None:
        """A login was refused; ``kind`` is INCORRECT, EXPIRED or LOCKED."""
        with self._lock:
            self._failures += 1
            self._failed_stamp = self._stamp()
            self._locked = self._locked or kind == LOCKED
            n, left = self._failures, self._limit - self._failures
            if kind == LOCKED:
                self._refusal = (
                    "the token has locked its user PIN (CKR_PIN_LOCKED): its security officer "
                    "must unlock it; then restart the service"
                )
            elif left <= 0:
                self._refusal = (
                    f"the token refused the PIN in {self._pin_file} ({n} failed logins in a "
                    "row); the service has stopped trying, since an HSM locks its user after a "
                    "few: correct the file, then restart the service"
                )
            else:
                what = "has expired" if kind == EXPIRED else "was refused"
                self._refusal = (
                    f"the PIN in {self._pin_file} {what} ({n} failed login(s) in a row); the "
                    f"service will try again only when that file changes, at most {left} more "
                    "time(s)"
                )

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._failed_stamp = None
            self._locked = False
            self._refusal = None
