"""Caller of ``tvmrt bench --throughput`` / ``--scale``: null calls to one server.

shm u64s: [0] calls to make, [1] server number (server ``tput-<n>``), [2] go flag (the
host sets it to 1 when every caller is ready: they start together), written here:
[3] CLOCK_MONOTONIC ns at the first call, [4] at the end, [5] status (0 ok, else the
negative code), [6] ready (1 once the handle is acquired); [7] microseconds of work asked of the
server per call (its ``req_arg``)."""
import time

from tvmrt.eapp import *


def main(args):
    shm = mem(args[10], 64).cast("Q")
    n, k = shm[0], shm[1]
    h = acquire_enclave(f"tput-{k}")
    if h < 0:
        shm[5] = h & ((1 << 64) - 1)
        shm[6] = 1
        return 1
    arg = CallArg(req_arg=shm[7])
    shm[6] = 1
    while not shm[2]:
        time.sleep(0.0005)
    t0 = time.monotonic_ns()
    for _ in range(n):
        rc = call_enclave(h, arg)
        if rc:
            shm[5] = rc & ((1 << 64) - 1)
            break
    shm[3], shm[4] = t0, time.monotonic_ns()
    return 0
