"""Caller of ``tvmrt bench``: times ``n`` call_enclave()s to ``bench-server``.

The host gives it shared memory (``args[10]``/``args[11]``) that starts with a header
of sixteen little-endian u64 (see :mod:`tvmrt.bench`)::

    0 magic  1 mode (0 null, 1 loan, 2 loan + write every page, 3 loan, untouched)
    2 n  3 size
    4 status (written here: 0 ok, else a negative code)
    5 calls done (also every 128 calls, between them, for the progress display)
    6 total ns spent writing the pages before calls ``warm``.. (mode 2)  7 warm
    8 CPU time of this process over the loop, ns  9..15 unused

and then ``n`` u64 slots, where the duration of every call in ns is written.
"""
import gc
import struct
import time

from tvmrt.eapp import *
from tvmrt.errors import TvmError

HDR = struct.Struct("<16Q")
MAGIC = 0x31424D5654                # "TVMB1"
SERVER_NAME = "bench-server"
NULL, LOAN, LOAN_ALL, LOAN_NONE = 0, 1, 2, 3
UNTOUCHED = 1 << 62                 # in req_arg: the server must not touch the region
BAD_DATA = 1 << 63 | 0xDA7A         # status: the server did not see or write the bytes


def main(args):
    shm, shm_size = args[10], args[11]
    hdr = mem(shm, HDR.size)
    magic, mode, n, size, _, _, _, warm = HDR.unpack(hdr)[:8]
    if magic != MAGIC or HDR.size + 8 * n > shm_size:
        return 2
    out = mem(shm + HDR.size, 8 * n).cast("Q")
    live = mem(shm + 5 * 8, 8).cast("Q")
    status, done, prewrite = 0, 0, 0

    h = acquire_enclave(SERVER_NAME)
    if h < 0:
        status = h
    arg = CallArg()
    vaddr = 0
    if status == 0 and mode != NULL:
        vaddr = eapp_mmap(0, size)
        if not vaddr:
            status = last_error().code
        arg.req_vaddr, arg.req_size = vaddr, size
    npages = size // PAGE
    perf = time.perf_counter_ns
    cpu0 = time.thread_time_ns()
    gc.disable()
    try:
        for i in range(n if status == 0 else 0):
            v = i & 0xFF
            arg.req_arg = i | UNTOUCHED if mode == LOAN_NONE else i
            if mode == LOAN_ALL:
                w0 = perf()
                mem(vaddr, size)[::PAGE] = bytes((v,)) * npages
                if i >= warm:
                    prewrite += perf() - w0
            elif mode == LOAN:
                mem(vaddr, 1)[0] = v
            t0 = perf()
            rc = call_enclave(h, arg)
            t1 = perf()
            if rc != 0:
                status = rc
                break
            out[i] = t1 - t0
            done += 1
            if not done & 127:
                live[0] = done
            if arg.resp_val != arg.req_arg + 1 or (
                    mode != LOAN_NONE and vaddr and mem(vaddr, 1)[0] != (v + 1) & 0xFF):
                status = BAD_DATA
                break
    except TvmError as exc:         # the monitor went away (^C): no traceback noise
        status = exc.code
    finally:
        gc.enable()
    cpu = time.thread_time_ns() - cpu0
    HDR.pack_into(hdr, 0, magic, mode, n, size, status & ((1 << 64) - 1), done, prewrite,
                  warm, cpu, 0, 0, 0, 0, 0, 0, 0)
    return 0 if status == 0 else 1
