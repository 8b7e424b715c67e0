"""Server whose handler forks a process that sleeps (60 s at most); its pid goes to shm
int [2] (args[13]).  req_arg 1: return resp_val 1; req_arg 2: the server process exits."""
import os
import time

from tvmrt.eapp import *


def main(args):
    shm = ints(args[13], 4)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, b"x")             # regions are not inherited by a fork
            end = time.monotonic() + 60
            while time.monotonic() < end:
                time.sleep(0.05)
        finally:
            os._exit(0)
    os.read(r, 1)
    os.close(r)
    os.close(w)
    shm[2] = pid
    if args[10] == 2:
        os._exit(3)
    return CallArg(resp_val=1)
