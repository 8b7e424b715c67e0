"""Calls server "echo" shm[0] times with a 4 KiB loan; checks every answer.
Writes [done, bad] at shm ints 8, 9."""
from tvmrt.eapp import *


def main(args):
    shm = ints(args[10], 16)
    n = shm[0]
    h = acquire_enclave("echo")
    region = eapp_mmap(0, 0x1000)
    page = ints(region, 1)
    bad = 0
    for i in range(n):
        page[0] = i
        a = CallArg(req_arg=100 + i, req_vaddr=region, req_size=0x1000)
        rc = call_enclave(h, a)
        if rc != 0 or a.resp_val != 101 + i or ints(region, 1)[0] != i + 1 \
                or a.req_vaddr != region:
            bad += 1
    shm[8] = n
    shm[9] = bad
    return bad
