"""The soak (issue 12): every RPC from many callers for a long time, the token host restarted
every few minutes; zero wrong signatures, zero lost audit records, RSS flat.

``make soak`` runs it for 30 minutes (``python -m tests.soak``, see tests/soak/soak.py);
tests/integration/test_soak_short.py runs it for under a minute in ``make test``.
"""
