"""Normal enclave for the rerun tests.  The relay page's ints: [0] host's value,
[1] the enclave's mark.  Writes 7 into [1], hands the page back, and after the rerun
records what it sees: [2] = [0] + 1 (the host's edit), [3] = 1 if the page is at the
same address, [4] = the return code of eapp_return_relay_page.  shm int[0] (if any)
set to 2 makes it hand the page back twice (the second time it adds 100 to [2])."""
from tvmrt.eapp import *


def main(args):
    relay, size = args[13], args[14]
    twice = args[10] and ints(args[10], 1)[0] == 2
    page = ints(relay, 8)
    page[1] = 7
    rc = eapp_return_relay_page()
    page = ints(relay, 8)
    page[2] = page[0] + 1
    page[3] = 1 if (args[13], args[14]) == (relay, size) else 0
    page[4] = rc
    if twice:
        page[1] = 8
        rc2 = eapp_return_relay_page()
        ints(relay, 8)[2] += 100 + rc2
    return 5
