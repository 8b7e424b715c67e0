"""Calls server "echo" with req_arg 3 (it sleeps 0.5 s) and raises if the call failed
(``check``): with the monitor killed meanwhile, the raise must not print a traceback."""
from tvmrt.eapp import *


def main(args):
    h = check(acquire_enclave("echo"))
    check(call_enclave(h, CallArg(req_arg=3)))
    return 0
