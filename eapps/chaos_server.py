"""Server "chaos": checks that every page of the loaned region starts with the byte
req_arg & 0xFF, then writes (req_arg + 1) & 0xFF into every page; resp_val = req_arg + 1,
or 0 when a page was wrong (the caller counts that as corrupted data)."""
from tvmrt.eapp import *


def main(args):
    a, vaddr, size = args[10], args[11], args[12]
    ok = True
    if vaddr:
        pages = mem(vaddr, size)[::PAGE]
        seen = bytes(pages)
        ok = seen.count(a & 0xFF) == len(seen)
        pages[:] = bytes(((a + 1) & 0xFF,)) * len(seen)
    return CallArg(resp_val=a + 1 if ok else 0)
