"""call_enclave with a deadline on a call the server is already running (echo sleeps 0.5 s
on req_arg 3).  shm ints: [8] rc, [9] 1 once the loan is back, [10] its first int,
[11] rc of a call made after that."""
import time

from tvmrt.eapp import *
from tvmrt.errors import NotOwned


def main(args):
    shm = ints(args[10], args[11] // 4)
    h = acquire_enclave("echo")
    r = eapp_mmap(0, 0x1000)
    ints(r, 1)[0] = 1
    shm[8] = call_enclave(h, CallArg(req_arg=3, req_vaddr=r, req_size=0x1000), timeout=0.1)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            shm[10] = ints(r, 1)[0]
            shm[9] = 1
            break
        except NotOwned:
            time.sleep(0.01)
    a = CallArg(req_arg=8)
    shm[11] = call_enclave(h, a)
    shm[12] = a.resp_val
    return 0
