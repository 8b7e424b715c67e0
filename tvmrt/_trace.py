"""Debug-only stamps of the create path (``tools/create_budget.py``).

With ``TVMRT_TRACE_CREATE=<file>`` in the environment of the process that imports this
module (a private monitor inherits its host's), :func:`mark` appends one line
``<step> <pid> <CLOCK_MONOTONIC ns>`` per call to that file; the monitor, the zygote
and every enclave use the same clock, so the steps of one create line up.  Without
the variable :data:`FD` is None and every caller tests it before calling: nothing
else runs, and nothing is opened.  Enclaves keep the fd (opened before their sandbox,
which checks access at open only).
"""
from __future__ import annotations

import os
import time

#: the trace file (O_APPEND: one write per line keeps lines whole), or None: off.
#: Set once at import; :func:`reopen` is for a tool that sets the variable later.
FD: int | None = None


def reopen() -> None:
    global FD
    path = os.environ.get("TVMRT_TRACE_CREATE")
    if FD is None and path:
        FD = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)


def mark(step: str) -> None:
    if FD is not None:
        os.write(FD, f"{step} {os.getpid()} {time.monotonic_ns()}\n".encode())


def traced_message(message):
    """The monitor core's ``message`` with the create and ready stamps (debug only: the
    daemon puts it in place of the method when :data:`FD` is set)."""
    def traced(peer, msg, nfds, now):
        op = msg.get("op")
        if op == "create":
            mark("m_create")
        elif op == "ready":
            mark("m_ready")
        return message(peer, msg, nfds, now)
    return traced


reopen()
