"""Suite-wide settings."""

from __future__ import annotations

import os

# grpc's fork handlers and the many subprocesses these tests start (fork + exec) do not mix: with fork support on,
# a mesh process started after an in-process grpc server can abort ("epoll_wait error: Bad file descriptor").
# Our processes never fork to run grpc, so the suite turns it off (children inherit the setting).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
