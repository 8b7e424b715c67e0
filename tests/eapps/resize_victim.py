"""The innocent caller of a resizing server (tests/test_hostile.py): lends a region
(int 0 = 5) to "resizer" with req_arg shm int64 [0].  [8] the call's code, [9] what
touching the region afterwards gave: 1 NotOwned (it is gone), 2 its int 0 was readable
(then [10] is that int).  A SIGBUS would end this enclave instead."""
from tvmrt.eapp import *
from tvmrt.errors import NotOwned


def main(args):
    shm = mem(args[10], 128).cast("q")
    r = eapp_mmap(0, PAGE)
    ints(r, 1)[0] = 5
    shm[8] = call_enclave(acquire_enclave("resizer"),
                          CallArg(req_arg=shm[0], req_vaddr=r, req_size=PAGE), timeout=30)
    try:
        shm[10] = ints(r, 1)[0]
        shm[9] = 2
    except NotOwned:
        shm[9] = 1
    return 0
