"""Runs until destroyed (shm int 1 = 1 once running)."""
import time

from tvmrt.eapp import *


def main(args):
    if args[10]:
        ints(args[10], 2)[1] = 1
    while True:
        time.sleep(0.01)
