"""Server for the asyn tests.  shm ints: [0] number of deliveries, then per delivery
(from [1]) req_arg, the region's first int, its size, the caller id, and whether the
region is still this server's after a 2nd look (it must be: given for good).
req_arg 100: sleeps 0.5 s first (busy); 101: exits the process at once;
102: sleeps 0.5 s, then exits."""
import os
import time

from tvmrt.eapp import *


def main(args):
    a0, vaddr, size = args[10], args[11], args[12]
    if a0 in (100, 102):
        time.sleep(0.5)
    if a0 in (101, 102):
        os._exit(0)
    log = ints(args[13], 64)
    n = log[0]
    base = 1 + 5 * n
    log[base] = a0
    log[base + 1] = ints(vaddr, 1)[0] if vaddr else -1
    log[base + 2] = size
    log[base + 3] = get_caller_id()
    log[0] = n + 1
    return CallArg(resp_val=a0)
