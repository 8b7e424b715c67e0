"""Two threads call the echo server at once, each with its own loaned region.
shm ints: [8 + 4*i ..] = rc, resp_val, first int of the loan after the call, 1 if the
loan is readable again -- for thread i in 0, 1."""
import threading

from tvmrt.eapp import *


def main(args):
    shm = ints(args[10], args[11] // 4)
    h = acquire_enclave("echo")
    regions = [eapp_mmap(0, 0x1000), eapp_mmap(0, 0x1000)]
    go = threading.Barrier(2)

    def worker(i):
        r = regions[i]
        ints(r, 1)[0] = 100 * (i + 1)
        go.wait()
        for k in range(200):
            a = CallArg(req_arg=1000 * (i + 1) + 10 + k, req_vaddr=r, req_size=0x1000)
            rc = call_enclave(h, a)
            if rc != 0 or a.resp_val != a.req_arg + 1:
                shm[8 + 4 * i] = rc if rc else -999
                shm[9 + 4 * i] = a.resp_val
                return
        shm[8 + 4 * i] = 0
        shm[9 + 4 * i] = a.resp_val
        shm[10 + 4 * i] = ints(r, 1)[0]
        shm[11 + 4 * i] = 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return 0
