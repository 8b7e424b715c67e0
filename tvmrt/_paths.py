"""Where the monitor listens by default."""
from __future__ import annotations

import os

ENV_SOCKET = "TVMRT_SOCKET"


def default_socket_path() -> str:
    """``$TVMRT_SOCKET``, else ``$XDG_RUNTIME_DIR/tvmrt/monitor.sock``, else a per-user
    directory in /tmp (created 0700 by the monitor)."""
    env = os.environ.get(ENV_SOCKET)
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "tvmrt", "monitor.sock")
    return os.path.join("/tmp", f"tvmrt-{os.getuid()}", "monitor.sock")
