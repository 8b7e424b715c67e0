"""A hostile enclave that frees, lends and gives away regions it never owned
(tests/test_hostile.py).  shm int64s: [0] another enclave's region (the innocent pair's),
[1] its size, [2] an address in the region arena that nobody owns.

The eapp API checks ownership in this process first; to reach the monitor's own checks
the requests marked "raw" are sent as they are, past the runtime.  Results, the error
code of each (0: it was allowed):
[8] eapp_unmap of the other's region; [9] eapp_unmap of the unowned address;
[10] a raw call to "thief" lending the other's region; [11] the same with the unowned
address; [12] a raw asyn_enclave_call to "thief" giving the other's region;
[13] a raw eapp_return_relay_page naming the other's region (this run has no relay
page); [14] a call of "thief" that answers with the other's region as its response;
[15] the same with the unowned address; [16] call_enclave through the API lending the
other's region (refused here, before anything is sent).
Then a region of its own, lent to "thief" (req_arg 3: the thief tries to free it and to
give it away): [17] the call's code, [18] its int 0 back (1 + 1 by the thief).
"""
from tvmrt import _runtime
from tvmrt.eapp import *
from tvmrt.errors import TvmError


def _raw(msg):
    try:
        _runtime.current.request(msg, timeout=20)
    except TvmError as exc:
        return exc.code
    return 0


def _call(h, req):
    return call_enclave(h, CallArg(req_arg=req), timeout=20)


def main(args):
    shm = mem(args[10], 256).cast("q")
    other, osize, nobody = shm[0], shm[1], shm[2]
    h = acquire_enclave("thief")
    shm[8] = eapp_unmap(other, osize)
    shm[9] = eapp_unmap(nobody, PAGE)
    shm[10] = _raw({"op": "call", "handle": h, "a": [0, 0, other, osize, 0, 0]})
    shm[11] = _raw({"op": "call", "handle": h, "a": [0, 0, nobody, PAGE, 0, 0]})
    shm[12] = _raw({"op": "asyn", "name": "thief", "arg": 0, "vaddr": other,
                    "size": osize})
    shm[13] = _raw({"op": "rrp", "v": [other]})
    shm[14] = _call(h, 1)
    shm[15] = _call(h, 2)
    shm[16] = call_enclave(h, CallArg(req_vaddr=other, req_size=osize))
    mine = eapp_mmap(0, PAGE)
    ints(mine, 1)[0] = 1
    shm[17] = call_enclave(h, CallArg(req_arg=3, req_vaddr=mine, req_size=PAGE), timeout=20)
    shm[18] = ints(mine, 1)[0]
    return 0
