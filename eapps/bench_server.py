"""Server of ``tvmrt bench``: answers every call at once, touching the loaned region.

* no region (``req_vaddr`` = 0): the null call, registers only;
* a one-page region: reads one byte (must be ``req_arg & 0xFF``), writes the next value;
* ``req_arg`` with bit 62 set (``UNTOUCHED``): the region is not touched at all;
* a larger region: reads one byte of every page (``bytes(mv[::4096])``), checks them all,
  then writes the next value into every page (``mv[::4096] = ...``).

``resp_val`` is ``req_arg + 1`` when the bytes were as expected, else 0, so the caller
can check that the data really moved both ways.
"""
import gc

from tvmrt.eapp import *

UNTOUCHED = 1 << 62   # see eapps/bench_caller.py
gc.disable()          # the caller times with gc off; do the same on this side


def main(args):
    a, vaddr, size = args[10], args[11], args[12]
    ret = CallArg()
    ok = True
    if vaddr and not a & UNTOUCHED:
        v = a & 0xFF
        w = (a + 1) & 0xFF
        if size <= PAGE:
            m = mem(vaddr, 1)
            ok = m[0] == v
            m[0] = w
        else:
            m = mem(vaddr, size)[::PAGE]
            seen = bytes(m)
            ok = seen.count(v) == len(seen)
            m[:] = bytes((w,)) * len(seen)
    ret.resp_val = a + 1 if ok else 0
    return ret
