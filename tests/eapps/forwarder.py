"""Lends its relay page (the host's schrodinger region) to "lend-on", which dies while
"echo" holds the page; then this enclave dies too, with the page still out."""
import os

from tvmrt.eapp import *


def main(args):
    call_enclave(acquire_enclave("lend-on"), CallArg(req_vaddr=args[13], req_size=args[14]))
    os._exit(5)
