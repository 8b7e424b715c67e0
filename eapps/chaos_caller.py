"""Caller of ``tvmrt stress`` (and the chaos tests).

shm ints: [0] calls to make, [1] seed, [2] most pages per region, [3] server number
(server "chaos" for 0, else "chaos-N"), [5] calls done so far (progress), [6] calls that
went three servers deep, [7] bytes loaned, in KiB.  Each call loans a region of a random
size -- log-uniform from 1 page to [2] pages, so that small and large ones both come --
filled with a byte per page and checksummed (CRC-32 of the whole region); every third
call goes three servers deep (``eapps/chaos_server.py``: each level checks and changes the
region).  Deadline 10 s.  Outcomes are counted into shm ints: [8] correct, [9] corrupted
data or a region lost (not back within 30 s of its call's end), [10] server gone
(PeerDied, NoSuchServer, UnknownHandle, BadState of a finished server, or a server gone
further down), [11] deadline (Timeout), [12] other errors (the code in [13]).

A call that fails may end before its region is back (a server further down still holds
it: it comes back when that one returns or dies, as an unsolicited grant): the caller
then waits for it, reading the monitor's messages with a cheap request.
"""
import math
import random
import time
import zlib

from tvmrt import errors as E
from tvmrt.eapp import *

GONE = {E.PeerDied.code, E.NoSuchServer.code, E.UnknownHandle.code, E.EnclaveFault.code,
        E.BadState.code}
DEEP = 1 << 24
GONE_DOWN = 0xFE


def _await(region, size, server):
    """The region back in our hands (True), waiting up to 30 s for it."""
    until = time.monotonic() + 30
    while True:
        try:
            mem(region, size)
            return True
        except E.NotOwned:
            if time.monotonic() > until:
                return False
        acquire_enclave(server)        # any request: the grant is read with its reply
        time.sleep(0.005)


def main(args):
    shm = ints(args[10], 16)
    n, seed, max_pages = shm[0], shm[1], shm[2]
    server = "chaos" if shm[3] == 0 else f"chaos-{shm[3]}"
    rnd = random.Random(seed)
    top = math.log2(max(1, max_pages))
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
        pages = min(max_pages, int(2 ** rnd.uniform(0, top) + 0.5))
        size = pages * PAGE
        region = eapp_mmap(0, size)
        if not region:
            shm[12] += 1
            shm[13] = last_error().code
            continue
        v = i & 0xFF
        deep = i % 3 == 0
        view = mem(region, size)
        view[::PAGE] = bytes((v,)) * pages
        crc = zlib.crc32(view)
        del view
        arg = CallArg(req_arg=crc << 32 | (DEEP if deep else 0) | (i & 0xFFFFFF),
                      req_vaddr=region, req_size=size)
        rc = call_enclave(h, arg, timeout=10)
        shm[7] += size >> 10
        if not _await(region, size, server):
            shm[9] += 1                       # lost: it never came back
            continue
        back = mem(region, size)
        hops = arg.resp_val & 0xFF
        if rc == 0 and hops == GONE_DOWN:
            shm[10] += 1
        elif rc == 0:
            want = 3 if deep else 1
            if (hops == want and zlib.crc32(back) == arg.resp_val >> 32
                    and bytes(back[::PAGE]).count((v + want) & 0xFF) == pages):
                shm[8] += 1
                shm[6] += deep
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
        del back
        if eapp_unmap(region, size) != 0 and rc == 0:
            shm[9] += 1
    shm[5] = n
    return 0
