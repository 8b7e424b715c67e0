"""A hostile enclave that changes the size of a segment it holds (tests/test_hostile.py).

The runtime closes a segment's fd as soon as it has mapped it; this eapp wraps the
runtime's mapping function before any grant arrives and keeps a dup of every fd it is
sent, so it holds the fd of each region it ever had.

As a server (name "resizer"), on a call with a region: req_arg 1 shrinks the segment
to nothing, 2 grows it to twice its size, both with ``ftruncate`` of the kept fd, and
returns (shm int64 [8]: the errno of the ftruncate, 0 if it worked).
As a normal enclave (the lender): lends a fresh region to "keeper" and, while the keeper
holds it (the host says so: [14] = 1), shrinks the segment ([0] = 1) or grows it
([0] = 2), and says it is done ([15] = 1): [10] the errno of the ftruncate (0: it
worked), [8] the call's code.
"""
import os
import threading
import time

from tvmrt import _memory, _runtime
from tvmrt.eapp import *

KEPT = {}           # vaddr -> dup of the last segment fd mapped there
_orig = _memory.map_fixed


def _keep(addr, length, fd, *a, **kw):
    KEPT[addr] = os.dup(fd)
    return _orig(addr, length, fd, *a, **kw)


_memory.map_fixed = _keep


def _resize(vaddr, size, how):
    try:
        os.ftruncate(KEPT[vaddr], 0 if how == 1 else 2 * size)
    except OSError as exc:
        return exc.errno
    return 0


def main(args):
    if _runtime.current.type == 1:               # the server
        a, vaddr, size = args[10], args[11], args[12]
        if vaddr and a in (1, 2):
            mem(args[13], 128).cast("q")[8] = _resize(vaddr, size, a)
        return CallArg()
    shm = mem(args[10], 128).cast("q")
    r = eapp_mmap(0, PAGE)

    def later():
        until = time.monotonic() + 20
        while shm[14] != 1 and time.monotonic() < until:
            time.sleep(0.005)                    # until the keeper holds the region
        shm[10] = _resize(r, PAGE, shm[0])
        shm[15] = 1
    t = threading.Thread(target=later)
    t.start()
    shm[8] = call_enclave(acquire_enclave("keeper"),
                          CallArg(req_vaddr=r, req_size=PAGE), timeout=30)
    t.join()
    return 0
