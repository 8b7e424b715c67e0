"""Calls server "holder" lending a fresh region whose int 0 is its shm int64 [3]
(tests/test_hostile.py).  shm int64s: [0] timeout in ms (0: none), [1] 1: nonblocking.
Results: [11] 1 just before the call, [8] the call's return code, then -- waiting up
to 60 s for the region to come back, however the call ended -- [9] 1 once it is back
and [10] its int 0 then."""
import time

from tvmrt.eapp import *
from tvmrt.errors import NotOwned


def main(args):
    shm = mem(args[10], 128).cast("q")
    h = acquire_enclave("holder")
    r = eapp_mmap(0, PAGE)
    ints(r, 1)[0] = shm[3]
    shm[11] = 1
    arg = CallArg(req_arg=1, req_vaddr=r, req_size=PAGE)
    shm[8] = call_enclave(h, arg, nonblocking=bool(shm[1]),
                          timeout=shm[0] / 1000 if shm[0] else None)
    until = time.monotonic() + 60
    while time.monotonic() < until:
        try:
            shm[10] = ints(r, 1)[0]
            shm[9] = 1
            break
        except NotOwned:
            acquire_enclave("holder")      # any request: a grant rides on its reply
            time.sleep(0.01)
    return 0
