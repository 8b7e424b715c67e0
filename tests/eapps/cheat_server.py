"""A server that tries to keep a loaned region after giving it back (tests/test_strict.py).

req_arg 10: honest (adds 1 to the first int).
req_arg 11: re-mprotect: after returning, a thread mprotects the region's address
            read-write again and writes 0x666 into int 1 (in mprotect mode the old
            mapping is still there: the write lands in the caller's region; in strict
            mode the address holds only the anonymous PROT_NONE reservation).
req_arg 12: dup: keeps a dup of the segment fd it was sent (intercepted from the
            runtime) and maps it at another address; after returning, a thread writes
            0x777 into int 1 through that mapping.
req_arg 13: opens /proc/self/mem for writing; resp_val is the errno (0: it opened).
req_arg 14: keeps the dup unmapped and returns (nothing is mapped when it gives the
            region up); 0.2 s later a thread maps it elsewhere and writes 0x888 into
            int 1 (tests/test_hostile.py).
req_arg 15: as 14, but maps it back at the region's own address (``MAP_FIXED`` over the
            arena's reservation) and writes 0x999 there.
"""
import ctypes
import mmap
import os
import threading
import time

from tvmrt import _memory
from tvmrt.eapp import *

KEPT = []           # (vaddr, dup fd) of every segment fd the runtime was sent
MAPS = []           # mappings made from those dups: kept alive on purpose
_orig = _memory.map_fixed


def _keep(addr, length, fd, *a, **kw):
    KEPT.append((addr, os.dup(fd)))
    return _orig(addr, length, fd, *a, **kw)


_memory.map_fixed = _keep
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _later(fn):
    def run():
        time.sleep(0.2)
        fn()
    threading.Thread(target=run, daemon=True).start()


def main(args):
    a0, vaddr = args[10], args[11]
    if vaddr:
        ints(vaddr, 1)[0] += 1
    if a0 == 11:
        def remprotect():
            if _libc.mprotect(vaddr, 0x1000, mmap.PROT_READ | mmap.PROT_WRITE) == 0:
                ctypes.c_int.from_address(vaddr + 4).value = 0x666
        _later(remprotect)
    elif a0 == 12:
        fd = [f for v, f in KEPT if v == vaddr][-1]
        m = mmap.mmap(fd, 0x1000)       # MAP_SHARED, read-write, wherever the kernel likes
        MAPS.append(m)

        def write():
            m[4:8] = (0x777).to_bytes(4, "little")
        _later(write)
    elif a0 in (14, 15):
        fd = [f for v, f in KEPT if v == vaddr][-1]

        def remap():
            if a0 == 14:
                m = mmap.mmap(fd, 0x1000)
                MAPS.append(m)
                m[4:8] = (0x888).to_bytes(4, "little")
            else:
                _orig(vaddr, 0x1000, fd)           # MAP_SHARED | MAP_FIXED, read-write
                ctypes.c_int.from_address(vaddr + 4).value = 0x999
        _later(remap)
    elif a0 == 13:
        try:
            os.close(os.open("/proc/self/mem", os.O_RDWR))
            err = 0
        except OSError as exc:
            err = exc.errno
        return CallArg(resp_val=err)
    return CallArg(resp_val=a0 + 1)
