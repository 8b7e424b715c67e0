"""Caller of ``tvmrt stress`` (and the chaos tests).

shm ints: [0] calls to make, [1] seed, [2] most pages per region, [3] server number
(server "chaos" for 0, else "chaos-N"), [5] calls done so far (progress).  Each call loans
a region of a random size (1..[2] pages) filled with a byte per page, with a 5 s deadline.
Outcomes are counted into shm ints: [8] correct, [9] corrupted data or a region not back
in our hands, [10] server gone (PeerDied, NoSuchServer, UnknownHandle, BadState of a
finished server), [11] deadline (Timeout), [12] other errors (the code in [13])."""
import random
import time

from tvmrt import errors as E
from tvmrt.eapp import *

GONE = {E.PeerDied.code, E.NoSuchServer.code, E.UnknownHandle.code, E.EnclaveFault.code,
        E.BadState.code}


def main(args):
    shm = ints(args[10], 16)
    n, seed, max_pages = shm[0], shm[1], shm[2]
    server = "chaos" if shm[3] == 0 else f"chaos-{shm[3]}"
    rnd = random.Random(seed)
    h = -1
    i = waited = 0
    while i < n:
        shm[5] = i
        if h < 0:
            h = acquire_enclave(server)
            if h < 0:
                # the server is being re-created: wait for it (up to 10 s per call)
                waited += 1
                if waited >= 1000:
                    shm[10] += 1
                    i += 1
                    waited = 0
                time.sleep(0.01)
                continue
            waited = 0
        i += 1
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
    shm[5] = n
    return 0
