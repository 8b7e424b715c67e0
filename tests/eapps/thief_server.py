"""A hostile server that hands back regions that are not its own (tests/test_hostile.py).
shm int64s: [0] another enclave's region address, [1] its size, [2] an address nobody
owns.  req_arg 1: return [0] as its response region; 2: return [2]; 3: with a loaned
region, try to free it (``eapp_unmap``: [8] the code) and to give it away for good
(``asyn_enclave_call`` to "pair": [9] the code), then add 1 to its
int 0 and return normally; anything else: return nothing."""
from tvmrt.eapp import *


def main(args):
    a, vaddr, size = args[10], args[11], args[12]
    shm = mem(args[13], 128).cast("q")
    if a == 1:
        return CallArg(resp_vaddr=shm[0], resp_size=shm[1])
    if a == 2:
        return CallArg(resp_vaddr=shm[2], resp_size=PAGE)
    if a == 3 and vaddr:
        shm[8] = eapp_unmap(vaddr, size)
        shm[9] = asyn_enclave_call("pair", CallArg(req_vaddr=vaddr, req_size=size))
        ints(vaddr, 1)[0] += 1
    return CallArg()
