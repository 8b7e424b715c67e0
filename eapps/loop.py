"""Penglai's demo/test-stop eapp ``loop``: runs forever.  Here it also counts: int 0 of
its shared memory (if it has one) goes up by one each ~1 ms, so a host sees whether it
runs (test-stop: stopped, the count freezes; resumed, it goes on)."""
import time

from tvmrt.eapp import *


def main(args):
    counter = ints(args[10], 1) if args[10] else [0]
    while True:
        counter[0] += 1
        time.sleep(0.001)
