"""A hostile enclave that floods ``eapp_mmap`` (tests/test_hostile.py): it asks for
regions until the monitor refuses, then holds them all until it is destroyed.
shm int64s: [0] 0: one page each, 1: 4 GiB each (the largest region).  Results: [8] the
regions it got, [9] the code of the refusal, [10] 1 once it holds them and waits,
[11] 1 if every region it got was mapped and zeroed (first and last byte checked)."""
import time

from tvmrt.eapp import *


def main(args):
    shm = mem(args[10], 128).cast("q")
    size = PAGE if shm[0] == 0 else 4 << 30
    got = []
    while len(got) < 100000:
        r = eapp_mmap(0, size)
        if not r:
            break
        got.append(r)
    shm[8] = len(got)
    shm[9] = last_error().code if last_error() is not None else 0
    shm[11] = int(all(mem(r, size)[0] == 0 and mem(r, size)[size - 1] == 0 for r in got))
    shm[10] = 1
    while True:
        time.sleep(0.05)
