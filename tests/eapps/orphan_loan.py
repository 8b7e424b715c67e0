"""Lends a region to "lend-on", which dies while "echo" holds the region on loan from it.
shm ints: [8] rc of the call, [9] 1 once the region is usable again (checked view),
[10] its first int read through a raw pointer (mode 1: without any API call first)."""
import ctypes
import time

from tvmrt.eapp import *
from tvmrt.errors import NotOwned


def main(args):
    shm = ints(args[10], args[11] // 4)
    r = eapp_mmap(0, 0x1000)
    ints(r, 1)[0] = 10
    shm[8] = call_enclave(acquire_enclave("lend-on"), CallArg(req_vaddr=r, req_size=0x1000))
    mode = shm[0]
    end = time.monotonic() + 10
    if mode == 0:                       # the checked API sees it come back
        while time.monotonic() < end:
            try:
                mem(r, 4)
                shm[9] = 1
                break
            except NotOwned:
                time.sleep(0.01)
    else:                               # nobody asks: raw access once echo has returned
        time.sleep(1.5)                 # echo sleeps 0.5 s, then returns the region
        shm[9] = 1
    shm[10] = ctypes.c_int.from_address(r).value
    return 0
