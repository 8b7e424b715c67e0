"""Normal enclave without a relay page: eapp_return_relay_page, then exit with its rc."""
from tvmrt.eapp import *


def main(args):
    return eapp_return_relay_page() + 10
