"""Calls "cheat" twice lending the same region (tests/test_hostile.py): first with
req_arg shm int64 [0] (a cheat that keeps the segment's fd and maps it after the
return), then -- once the cheat's late write shows in int 1, or after 10 s --
honestly (req_arg 10) -- "cheat" again, or "honest" (an
echo_server) if shm int64 [1] is 1.  Results: [8] the first call's code,
[9] and [10] the region's ints 0 and 1 between the calls, [11] the second call's code,
[12] and [13] ints 0 and 1 once the region is back after it (-1: not back in 10 s)."""
import time

from tvmrt.eapp import *
from tvmrt.errors import NotOwned


def main(args):
    shm = mem(args[10], 128).cast("q")
    h = acquire_enclave("cheat")
    r = eapp_mmap(0, PAGE)
    ints(r, 2)[0] = 10
    shm[8] = call_enclave(h, CallArg(req_arg=shm[0], req_vaddr=r, req_size=PAGE),
                          timeout=20)
    until = time.monotonic() + 10
    while ints(r, 2)[1] == 0 and time.monotonic() < until:
        time.sleep(0.005)
    v = ints(r, 2)
    shm[9], shm[10] = v[0], v[1]
    del v
    h2 = acquire_enclave("honest") if shm[1] == 1 else h
    shm[11] = call_enclave(h2, CallArg(req_arg=10, req_vaddr=r, req_size=PAGE), timeout=20)
    shm[12] = shm[13] = -1
    until = time.monotonic() + 10
    while time.monotonic() < until:
        try:
            v = ints(r, 2)
            shm[12], shm[13] = v[0], v[1]
            break
        except NotOwned:
            acquire_enclave("cheat")       # any request: a grant rides on its reply
            time.sleep(0.01)
    return 0
