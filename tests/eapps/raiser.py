from tvmrt.eapp import *


def main(args):
    raise ValueError("boom from the eapp")
