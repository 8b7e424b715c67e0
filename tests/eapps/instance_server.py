"""Server with instances: resp_val = this instance's eid; req_arg 1 -> sleeps 0.3 s first
(so that concurrent callers need several instances); req_arg 2 -> the process dies
(os._exit) in the middle of the call; adds 1 to the first int of a loaned region."""
import os
import time

from tvmrt.eapp import *


def main(args):
    a0, vaddr = args[10], args[11]
    if a0 == 1:
        time.sleep(0.3)
    if vaddr:
        ints(vaddr, 1)[0] += 1
    if a0 == 2:
        os._exit(9)
    return CallArg(resp_val=get_enclave_id())
