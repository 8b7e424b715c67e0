"""The innocent borrower of tests/test_hostile.py's lender attacks: on a call with a
region it fills the region with 0xA5, says so (its shm int64 0 = 1), holds it while
the hostile lender tries to touch it -- until the host says the attack is over (shm
int64 2 = 1; at most 20 s) --, then checks every byte: shm int64 1 (and resp_val) = 1
if the region is exactly as it left it, 2 if someone changed it."""
import time

from tvmrt.eapp import *


def main(args):
    shm = mem(args[13], 64).cast("q")
    region = mem(args[11], args[12])
    region[:] = b"\xa5" * len(region)
    shm[0] = 1
    until = time.monotonic() + 20
    while shm[2] != 1 and time.monotonic() < until:
        time.sleep(0.005)
    shm[1] = 1 if bytes(region) == b"\xa5" * len(region) else 2
    return CallArg(resp_val=shm[1])
