"""What the tests ask of a token that the service never does (issue 13: it does not ship)."""

from __future__ import annotations

from signer._internal.token import Token
from signer._internal.token._objects import search


def count_objects(token: Token) -> int:
    """How many objects the logged-in user can see, token and session objects alike: one
    search on a session borrowed from the token's pool, its errors mapped as the service's."""
    with token._session() as slot:
        return len(search(slot.session, {}))
