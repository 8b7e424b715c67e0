"""A hostile server that holds every call forever (tests/test_hostile.py): it writes 7
into int 0 of the loaned region, says so (its shm int64 0 = 1), and never returns."""
import time

from tvmrt.eapp import *


def main(args):
    if args[11]:
        ints(args[11], 1)[0] = 7
    mem(args[13], 8).cast("q")[0] = 1
    while True:
        time.sleep(0.05)
