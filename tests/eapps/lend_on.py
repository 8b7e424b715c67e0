"""Server "lend-on": passes the loaned region on to "echo" (which sleeps 0.5 s on
req_arg 3) from a thread, and dies while echo holds it."""
import os
import threading
import time

from tvmrt.eapp import *


def main(args):
    vaddr, size = args[11], args[12]
    h = acquire_enclave("echo")
    threading.Thread(target=call_enclave,
                     args=(h, CallArg(req_arg=3, req_vaddr=vaddr, req_size=size)),
                     daemon=True).start()
    time.sleep(0.1)           # echo has the region now, sleeping
    os._exit(3)
