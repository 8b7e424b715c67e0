"""Server of ``tvmrt bench --throughput`` / ``--scale``: returns at once, or after
``req_arg`` microseconds of work (a busy loop: what instances can share out)."""
import time

from tvmrt.eapp import *


def main(args):
    us = args[10]
    if us:
        end = time.perf_counter() + us / 1e6
        while time.perf_counter() < end:
            pass
    return CallArg(resp_val=1)
