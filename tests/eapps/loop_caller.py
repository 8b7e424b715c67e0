"""Caller for the lifecycle tests: lends a 4 KiB region (int 0 = 40) to "loop-server"
and waits for its return (which never comes unless the server dies or is destroyed).
shm ints: [1] = 1 just before the call; after it, [2] = its result (0 or a negative
code) and [3] = int 0 of the loaned region (back here whatever happened)."""
from tvmrt.eapp import *


def main(args):
    shm = ints(args[10], 4)
    h = acquire_enclave("loop-server")
    region = eapp_mmap(0, 0x1000)
    ints(region, 1)[0] = 40
    shm[1] = 1
    shm[2] = call_enclave(h, CallArg(req_arg=1, req_vaddr=region, req_size=0x1000))
    shm[3] = ints(region, 1)[0]
    return 0
