"""The innocent server of tests/test_hostile.py (see pair_caller.py): checks the loaned
region against the CRC-32 in ``req_arg``, inverts every byte, returns the new CRC with
the call number; resp_val 0 says the region came in wrong."""
import zlib

from tvmrt.eapp import *


def _invert(data) -> bytes:
    """Every byte XOR 0xFF (as one big integer: a Python loop would be slow)."""
    n = len(data)
    return (int.from_bytes(data, "little") ^ ((1 << 8 * n) - 1)).to_bytes(n, "little")


def main(args):
    a, vaddr, size = args[10], args[11], args[12]
    region = mem(vaddr, size)
    if zlib.crc32(region) != a >> 32:
        return CallArg(resp_val=0)
    out = _invert(region)
    region[:] = out
    return CallArg(resp_val=zlib.crc32(out) << 32 | (a & 0xFFFFFFFF))
