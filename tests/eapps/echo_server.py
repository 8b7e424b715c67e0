"""Server: resp_val = req_arg + 1; adds 1 to the first int of a loaned region.
req_arg 1 -> raises; req_arg 2 -> the process exits; req_arg 3 -> sleeps 0.5 s;
req_arg 4 -> returns a resp region of its own (16 KiB of 5s);
req_arg 5 -> returns a resp_vaddr it does not own."""
import os
import time

from tvmrt.eapp import *


def main(args):
    a0, vaddr = args[10], args[11]
    if a0 == 1:
        raise RuntimeError("server refuses req_arg 1")
    if a0 == 2:
        os._exit(3)
    if a0 == 3:
        time.sleep(0.5)
    if vaddr:
        ints(vaddr, 1)[0] += 1
    ret = CallArg(resp_val=a0 + 1)
    if a0 == 4:
        ret.resp_vaddr = eapp_mmap(0, 0x4000)
        ret.resp_size = 0x4000
        r = ints(ret.resp_vaddr, 0x1000)
        for i in range(0x1000):
            r[i] = 5
    if a0 == 5:
        ret.resp_vaddr = 0x2000_0000_0000 - 0x1000
        ret.resp_size = 0x1000
    return ret
