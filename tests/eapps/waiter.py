"""Says it runs (shm int 1 = 1), then waits until the host sets shm int 0 to 1."""
import time

from tvmrt.eapp import *


def main(args):
    shm = ints(args[10], 4)
    shm[1] = 1
    end = time.monotonic() + 20
    while shm[0] != 1 and time.monotonic() < end:
        time.sleep(0.001)
    if args[13]:
        ints(args[13], 1)[0] = 4242
    return 7
