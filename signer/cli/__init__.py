"""The ``signer`` command (:mod:`signer.cli.main`).

Before anything imports gRPC: its fork handlers are off in the command's processes. grpcio
runs them at every fork by default, and in a child forked only to exec (nginx, pg_ctl, the
token host) they can abort it while the parent's gRPC threads run (grpc/grpc#13873, #43055;
seen here as nginx dying with SIGABRT, "epoll_wait error: Bad file descriptor", at start). The
service forks only to exec, so it needs none of what they do.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
