"""Server that calls itself: a cycle must fail at once, not deadlock."""
from tvmrt.eapp import *


def main(args):
    rc = call_enclave(acquire_enclave("cycler"), CallArg())
    return CallArg(resp_val=rc & ((1 << 64) - 1))
