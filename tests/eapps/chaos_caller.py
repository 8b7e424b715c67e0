"""Caller under chaos: shm ints [0] = calls to make, [1] = seed.  Each call loans a region
of a random size (1..max pages, [2]) filled with a byte per page, to server "chaos", with
a 5 s deadline.  Outcomes are counted into shm ints: [8] correct, [9] corrupted data or a
region not back in our hands, [10] server gone (PeerDied, NoSuchServer, UnknownHandle,
BadState of a finished server), [11] deadline (Timeout), [12] other errors (the code in [13])."""
import random
import time

from tvmrt import errors as E
from tvmrt.eapp import *

GONE = {E.PeerDied.code, E.NoSuchServer.code, E.UnknownHandle.code, E.EnclaveFault.code,
        E.BadState.code}


def main(args):
    shm = ints(args[10], 16)
    n, seed, max_pages = shm[0], shm[1], shm[2]
    rnd = random.Random(seed)
    h = -1
    for i in range(n):
        if h < 0:
            h = acquire_enclave("chaos")
            if h < 0:
                shm[10] += 1
                time.sleep(0.01)          # the server is being re-created
                continue
        size = rnd.randint(1, max_pages) * PAGE
        region = eapp_mmap(0, size)
        if not region:
            shm[12] += 1
            shm[13] = last_error().code
            continue
        v = i & 0xFF
        pages = mem(region, size)[::PAGE]
        pages[:] = bytes((v,)) * len(pages)
        arg = CallArg(req_arg=i, req_vaddr=region, req_size=size)
        rc = call_enclave(h, arg, timeout=5)
        try:
            back = bytes(mem(region, size)[::PAGE])        # the region is ours again
        except E.NotOwned:
            shm[9] += 1
            continue
        if rc == 0:
            if arg.resp_val == i + 1 and back.count((v + 1) & 0xFF) == len(back):
                shm[8] += 1
            else:
                shm[9] += 1
        elif rc in GONE:
            shm[10] += 1
            h = -1
        elif rc == E.Timeout.code:
            shm[11] += 1
        else:
            shm[12] += 1
            shm[13] = rc
        if eapp_unmap(region, size) != 0 and rc == 0:
            shm[9] += 1
    return 0
