"""Penglai's demo/hello-world."""
from tvmrt.eapp import *


def main(args):
    eapp_print("hello world!\n")
    return 0
