"""Drives cycle_server.py (tests/test_hostile.py).  shm int64s: [8..12] the cycle
refusals seen (ping calls itself; ping -> pong -> ping; pong -> ping -> pong; an
instance of self2 calls self2; ping asyn-calls itself), [13..15] the return codes of
the outer calls of the first three, [16..18] 1 when a plain call to ping, pong, self2
afterwards returned 0."""
from tvmrt.eapp import *


def _signed(v):
    return v - (1 << 64) if v >= 1 << 63 else v


def _call(name, req):
    arg = CallArg(req_arg=req)
    rc = call_enclave(acquire_enclave(name), arg, timeout=20)
    return rc, _signed(arg.resp_val)


def main(args):
    shm = mem(args[10], 256).cast("q")
    shm[13], shm[8] = _call("ping", 1)
    shm[14], shm[9] = _call("ping", 2)
    rc, inner = _call("pong", 2)
    shm[15], shm[10] = rc, inner
    _rc, shm[11] = _call("self2", 1)
    _rc, shm[12] = _call("ping", 4)
    for i, name in enumerate(("ping", "pong", "self2")):
        shm[16 + i] = int(_call(name, 0) == (0, 0))
    return 0
