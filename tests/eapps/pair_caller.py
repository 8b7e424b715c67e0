"""The innocent caller of tests/test_hostile.py: it calls server "pair" over and over,
each time lending its one region (kept for its whole life, so a hostile enclave can aim
at its address) filled with fresh random bytes; the server checks them against the
CRC-32 in ``req_arg``, inverts every byte and returns the new CRC.  Every answer is
checked: the return code, the CRC, and every byte of the region against what the
inversion must give.  It calls until the host sets the stop flag (and at least 3 times).

shm int64s: [0] stop flag (the host sets 1), [1] its region's address (published at
start), [2] correct calls, [3] wrong data, [4] failed calls, [5] the last failure's code.
"""
import random
import zlib

from tvmrt.eapp import *

SIZE = 2 * PAGE


def _invert(data) -> bytes:
    """Every byte XOR 0xFF (as one big integer: a Python loop would be slow)."""
    n = len(data)
    return (int.from_bytes(data, "little") ^ ((1 << 8 * n) - 1)).to_bytes(n, "little")


def main(args):
    shm = mem(args[10], 64).cast("q")
    region = eapp_mmap(0, SIZE)
    shm[1] = region
    h = acquire_enclave("pair")
    rnd = random.Random(region)
    i = 0
    while shm[0] == 0 or i < 3:
        i += 1
        data = rnd.randbytes(SIZE)
        mem(region, SIZE)[:] = data
        arg = CallArg(req_arg=zlib.crc32(data) << 32 | i, req_vaddr=region, req_size=SIZE)
        rc = call_enclave(h, arg, timeout=30)
        if rc != 0:
            shm[4] += 1
            shm[5] = rc
            continue
        want = _invert(data)
        back = bytes(mem(region, SIZE))
        if arg.resp_val == zlib.crc32(want) << 32 | i and back == want:
            shm[2] += 1
        else:
            shm[3] += 1
    return 0
