"""Calls "cheat" lending a fresh region (tests/test_strict.py).

shm ints: [0] req_arg for the server; [1] 1: this caller cheats itself: it keeps a
mapping of its region (from a dup of the segment fd it was sent) while it lends it.
Results: [8] call_enclave's return code, [9] resp_val, [10] and [11] the region's
first two ints 0.5 s after the call (-1 if the region is not ours).
"""
import mmap
import os
import time

from tvmrt import _memory
from tvmrt.eapp import *

KEPT = []
MAPS = []
_orig = _memory.map_fixed


def _keep(addr, length, fd, *a, **kw):
    KEPT.append((addr, os.dup(fd)))
    return _orig(addr, length, fd, *a, **kw)


_memory.map_fixed = _keep


def main(args):
    shm = ints(args[10], args[11] // 4)
    r = eapp_mmap(0, 0x1000)
    ints(r, 2)[0] = 10
    if shm[1] == 1:
        MAPS.append(mmap.mmap([f for v, f in KEPT if v == r][-1], 0x1000))
    shm[8] = call_enclave(acquire_enclave("cheat"),
                          arg := CallArg(req_arg=shm[0], req_vaddr=r, req_size=0x1000))
    shm[9] = arg.resp_val
    time.sleep(0.5)
    try:
        v = ints(r, 2)
        shm[10], shm[11] = v[0], v[1]
    except Exception:
        shm[10] = shm[11] = -1
    return 0
