"""The tests. As in :mod:`signer.cli`, before anything imports gRPC: its fork handlers off, so
that a fixture forking to exec (pg_ctl as postgres, nginx) while gRPC calls are in flight is
not aborted by them in the child."""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
