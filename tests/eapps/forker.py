"""Forks a process that outlives main unless the zygote kills it (tests/test_process_groups).

shm ints: [0] = mode (bits below), [1] = 1 once the descendant runs, [2] = its pid,
[3] = set to 1 by the host to let a holding main return.
    1  double fork: the intermediate process exits, the grandchild is orphaned
    2  the descendant calls setsid (leaves the enclave's session and group)
    4  hold: main returns only once [3] is 1 (or after 30 s)
    8  the descendant calls setpgid(0, 0) (leaves the group, stays in the session)
The enclave's regions are not inherited by a fork: the pid comes back through pipes.
The descendant sleeps for 60 s at most, so a failing test does not leave it forever.
"""
import os
import select
import time

from tvmrt.eapp import *

ORPHAN, SETSID, HOLD, SETPGID = 1, 2, 4, 8


def _descendant(w, mode):
    try:
        if mode & SETSID:
            os.setsid()
        if mode & SETPGID:
            os.setpgid(0, 0)
        os.write(w, os.getpid().to_bytes(4, "little"))
        end = time.monotonic() + 60
        while time.monotonic() < end:
            time.sleep(0.05)
    finally:
        os._exit(0)


def _read_pid(r) -> int:
    ready, _, _ = select.select([r], [], [], 10)
    data = os.read(r, 4) if ready else b""
    return int.from_bytes(data, "little") if len(data) == 4 else 0


def main(args):
    shm = ints(args[10], 4)
    mode = shm[0]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if not mode & ORPHAN:
            _descendant(w, mode)
        try:
            r2, w2 = os.pipe()
            if os.fork() == 0:
                _descendant(w2, mode)
            # leave (orphan the grandchild) once it runs and its pid is passed on
            os.write(w, _read_pid(r2).to_bytes(4, "little"))
        finally:
            os._exit(0)
    shm[2] = _read_pid(r)
    shm[1] = 1
    if mode & ORPHAN:
        os.waitpid(pid, 0)
    if mode & HOLD:
        end = time.monotonic() + 30
        while shm[3] != 1 and time.monotonic() < end:
            time.sleep(0.001)
    return 0
