"""Caller of "pool": shm ints [0] = req_arg; writes [1] = rc, [2] = resp_val (the eid of
the instance that served), [3] = the loaned int after the call, [4] = 1 if the region was
ours again after the call."""
from tvmrt.eapp import *


def main(args):
    shm = ints(args[10], 8)
    h = acquire_enclave("pool")
    region = eapp_mmap(0, PAGE)
    ints(region, 1)[0] = 41
    arg = CallArg(req_arg=shm[0], req_vaddr=region, req_size=PAGE)
    rc = call_enclave(h, arg, timeout=20)
    shm[1] = rc
    shm[2] = arg.resp_val
    try:
        shm[3] = ints(region, 1)[0]
        shm[4] = 1
    except Exception:
        shm[4] = 0
    return 0
