"""Calls the server "forker-srv" with req_arg = shm int [0]; puts call_enclave's code in
shm int [1] and resp_val in [2]."""
from tvmrt.eapp import *


def main(args):
    shm = ints(args[10], 4)
    arg = CallArg(req_arg=shm[0])
    shm[1] = call_enclave(acquire_enclave("forker-srv"), arg)
    shm[2] = arg.resp_val
    return 0
