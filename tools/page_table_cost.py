"""What a loan of a touched region costs in page-table work alone, in one process.

    python tools/page_table_cost.py [--mib 64] [--rounds 20]

A tvmrt loan of a region both sides touch does, per round trip, four ``mprotect`` calls
over the whole region (revoke in the caller, grant in the server, revoke in the server,
grant in the caller), each rewriting one page-table entry per populated page and
flushing the TLB; the touches themselves then run without faults.  This measures, on a
populated memfd mapping of ``--mib`` MiB: one ``mprotect(PROT_NONE)`` +
``mprotect(PROT_READ|PROT_WRITE)`` pair, the minor faults the next touch takes (0: the
entries are kept, only their protection changes), one byte written per page after the
pair, and the same write with no ``mprotect`` (what iceoryx2's loan costs: its segments
stay mapped in both processes).  Medians over ``--rounds``.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import resource
import statistics
import time

PAGE = mmap.PAGESIZE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    ns = ap.parse_args(argv)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    size = ns.mib << 20
    fd = os.memfd_create("page-table-cost")
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    buf = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(buf)
    pages = memoryview(m)[::PAGE]
    n = len(pages)
    pages[:] = b"\1" * n                     # populate every page once
    pair, touch, plain, faults = [], [], [], []
    for i in range(ns.rounds):
        fill = bytes((i & 0xFF,)) * n
        t0 = time.perf_counter_ns()
        if libc.mprotect(addr, size, 0) or libc.mprotect(       # PROT_NONE, then RW
                addr, size, mmap.PROT_READ | mmap.PROT_WRITE):
            raise OSError(ctypes.get_errno(), "mprotect")
        t1 = time.perf_counter_ns()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        pages[:] = fill
        t2 = time.perf_counter_ns()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        pages[:] = fill
        t3 = time.perf_counter_ns()
        pair.append(t1 - t0)
        touch.append(t2 - t1)
        plain.append(t3 - t2)
    med = statistics.median
    print(f"{ns.mib} MiB populated ({n} pages), medians of {ns.rounds} rounds:")
    print(f"  mprotect NONE + RW pair   {med(pair) / 1e3:9.1f} µs  "
          f"({med(pair) / n:.0f} ns per page)")
    print(f"  touch after the pair      {med(touch) / 1e3:9.1f} µs  "
          f"(minor faults: {med(faults):.0f})")
    print(f"  touch, no mprotect        {med(plain) / 1e3:9.1f} µs")
    print(f"  a loan's round trip does two pairs: {2 * med(pair) / 1e6:.2f} ms of "
          f"page-table work before any touch")
    del pages, buf
    m.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
