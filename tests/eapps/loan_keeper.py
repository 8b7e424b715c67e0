"""A hostile lender (tests/test_hostile.py): it lends a region to "keeper" and, while
the keeper holds it, keeps using it.  shm int64 [0] chooses how:

0: through a checked view taken before the loan (``mem``): [10] 1 if it raised
   ValueError, 2 if the write went through;
1: through a raw pointer (ctypes): the lender faults (SIGSEGV) if the page is not its;
2: ``mprotect`` the address read-write again, then write 0x66 into every byte and read
   it back: [10] mprotect's errno (0: it worked), [12] 1 if the write stuck here;
3: write 0x77 into it through ``/proc/self/mem``: [10] the errno of opening it (0: it
   opened), [12] the errno of the write (0: it wrote), [13] 1 if a read through it
   showed the keeper's 0xA5 bytes.

[8] the call's return code, [9] its resp_val, [11] the region's first byte once back.
The attack starts when the host says the keeper holds the region ([14] = 1; at most
20 s) and [15] = 1 says it is over.
"""
import ctypes
import os
import threading
import time

from tvmrt.eapp import *

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
SIZE = PAGE


def _attack(shm, r, view):
    try:
        _attack1(shm, r, view)
    finally:
        shm[15] = 1


def _attack1(shm, r, view):
    until = time.monotonic() + 20
    while shm[14] != 1 and time.monotonic() < until:
        time.sleep(0.005)              # until the keeper holds the region, its bytes in
    mode = shm[0]
    if mode == 0:
        try:
            view[0:4] = b"\x01\x02\x03\x04"
            shm[10] = 2
        except ValueError:
            shm[10] = 1
    elif mode == 1:
        ctypes.memset(r, 0x55, SIZE)     # SIGSEGV here unless the page is ours
        shm[10] = 2
    elif mode == 2:
        if _libc.mprotect(r, SIZE, 3) != 0:                 # PROT_READ | PROT_WRITE
            shm[10] = ctypes.get_errno()
            return
        ctypes.memset(r, 0x66, SIZE)
        shm[12] = int(ctypes.string_at(r, SIZE) == b"\x66" * SIZE)
    elif mode == 3:
        try:
            fd = os.open("/proc/self/mem", os.O_RDWR)
        except OSError as exc:
            shm[10] = exc.errno
            return
        try:
            try:
                shm[13] = int(os.pread(fd, 16, r) == b"\xa5" * 16)
            except OSError:
                shm[13] = 0
            try:
                os.pwrite(fd, b"\x77" * SIZE, r)
            except OSError as exc:
                shm[12] = exc.errno
        finally:
            os.close(fd)


def main(args):
    shm = mem(args[10], 128).cast("q")
    r = eapp_mmap(0, SIZE)
    view = mem(r, SIZE)
    t = threading.Thread(target=_attack, args=(shm, r, view))
    t.start()
    arg = CallArg(req_vaddr=r, req_size=SIZE)
    shm[8] = call_enclave(acquire_enclave("keeper"), arg, timeout=30)
    shm[9] = arg.resp_val
    t.join()
    shm[11] = mem(r, 1)[0]
    return 0
