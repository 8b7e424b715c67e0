"""Server for the lifecycle tests: each call counts forever in int 0 of its shared
memory (args[13]); with a loaned region it first writes 7 into its int 0."""
import time

from tvmrt.eapp import *


def main(args):
    if args[11]:
        ints(args[11], 1)[0] = 7
    counter = ints(args[13], 1)
    while True:
        counter[0] += 1
        time.sleep(0.001)
