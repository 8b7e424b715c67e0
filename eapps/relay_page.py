"""Penglai's demo/relay-page: print the relay page, hand it back to the host, print it
again after the host's rerun (the host's write is visible at the same address)."""
from tvmrt.eapp import *


def main(args):
    relay_page = args[13]
    eapp_print("relay_page 1 %x\n", ints(relay_page, 1)[0])
    eapp_return_relay_page()
    eapp_print("relay_page 2 %x\n", ints(relay_page, 1)[0])
    EAPP_RETURN(0)
