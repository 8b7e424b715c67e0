"""What a loan of a touched region costs in page-table work alone, in one process.

    python tools/page_table_cost.py [--mib 64] [--rounds 20] [--live N]

A loan of a region both sides touch did, per round trip, four ``mprotect`` calls
over the whole region (revoke in the caller, grant in the server, revoke in the server,
grant in the caller), each rewriting one page-table entry per populated page and
flushing the TLB; the touches themselves then run without faults.  This measures, on a
populated memfd mapping of ``--mib`` MiB: one ``mprotect(PROT_NONE)`` +
``mprotect(PROT_READ|PROT_WRITE)`` pair, the minor faults the next touch takes (0: the
entries are kept, only their protection changes), one byte written per page after the
pair, and the same write with no ``mprotect`` (what iceoryx2's loan costs: its segments
stay mapped in both processes).  Then what tvmrt does instead for regions of 1 MiB or
more: a park + unpark pair (``tvmrt._memory.park``: the mapping moved away with
``mremap``, whole page-table pages at a time, and back) and the touch after it.
Medians over ``--rounds``.

Where the CPU has memory protection keys (``pku`` in ``/proc/cpuinfo``), it also
measures the same revoke and grant done with a key instead of ``mprotect``: the region
tagged once with ``pkey_mprotect``, then a ``pkey_set`` deny + allow pair (a write of
the thread's PKRU register: no system call, no page-table entry rewritten).  tvmrt does
not use keys: see docs/performance.md for why.

``--live N`` then runs ``N`` real tvmrt 64 MiB loans that both sides touch (``tvmrt
bench``'s row, its own embedded monitor) and ``N`` null calls, and counts the TLB
shootdowns (``TLB`` in ``/proc/interrupts``, all CPUs) each block caused: run it pinned
(``taskset -c 0``) and not.
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


def _shootdowns() -> int:
    """TLB shootdown interrupts so far, summed over the CPUs (-1 if not shown)."""
    with open("/proc/interrupts") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "TLB":
                return sum(int(x) for x in rest.split() if x.isdigit())
    return -1


def live(n: int) -> None:
    """Shootdowns per call of a real 64 MiB loan and of a null call (:func:`main`)."""
    from tvmrt import bench
    tvm = bench.Tvm(max(n, 100) + 2).start()
    try:
        for cfg in ("loan_64m", "null"):
            warm = 2
            tvm.block(cfg, warm, warm)
            before = _shootdowns()
            samples, _ = tvm.block(cfg, n, 0)
            after = _shootdowns()
            print(f"  live {cfg:9} {statistics.median(samples) / 1e3:9.1f} µs median, "
                  f"{(after - before) / n:.1f} TLB shootdowns per call "
                  f"({bench.placement()})")
    finally:
        tvm.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--live", type=int, default=0, metavar="N",
                    help="also N real tvmrt 64 MiB loans and N null calls, with the TLB "
                         "shootdowns each caused")
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
    # what tvmrt does for a region this big: park it (mremap away, PROT_NONE back at its
    # address) and bring it back, at an arena address as a real region has
    from tvmrt import _memory as memory
    from tvmrt._layout import ARENAS, PARK_MIN
    if size >= PARK_MIN:
        memory.reserve_arenas()
        at = ARENAS["mmap"][0] + ARENAS["mmap"][1] - 2 * size
        fd2 = os.memfd_create("page-table-cost-park")
        os.ftruncate(fd2, size)
        memory.map_fixed(at, size, fd2)
        park_pages = memory.view(at, size)[::PAGE]
        park_pages[:] = b"\1" * n
        parked, ptouch, pfaults = [], [], []
        for i in range(ns.rounds):
            t0 = time.perf_counter_ns()
            if not memory.park(at, size):
                print("  (parking refused here)")
                break
            memory.unpark(at, size)
            t1 = time.perf_counter_ns()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            park_pages[:] = bytes((i & 0xFF,)) * n
            t2 = time.perf_counter_ns()
            pfaults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            parked.append(t1 - t0)
            ptouch.append(t2 - t1)
        if parked:
            print(f"  park + unpark pair        {med(parked) / 1e3:9.1f} µs  "
                  f"(what tvmrt does from {PARK_MIN >> 20} MiB: mremap of page tables)")
            print(f"  touch after the pair      {med(ptouch) / 1e3:9.1f} µs  "
                  f"(minor faults: {med(pfaults):.0f})")
        del park_pages
        memory.unmap(at, size)
        os.close(fd2)
    if hasattr(libc, "pkey_alloc"):
        key = libc.pkey_alloc(0, 0)
        if key > 0:
            libc.pkey_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                           ctypes.c_int]
            t0 = time.perf_counter_ns()
            tagged = libc.pkey_mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE, key)
            tag = time.perf_counter_ns() - t0
            keyed = []
            for _ in range(ns.rounds):
                t0 = time.perf_counter_ns()
                libc.pkey_set(key, 3)           # PKEY_DISABLE_ACCESS | PKEY_DISABLE_WRITE
                libc.pkey_set(key, 0)
                keyed.append(time.perf_counter_ns() - t0)
            if tagged == 0:
                print(f"  tag with a key, once      {tag / 1e3:9.1f} µs")
                print(f"  pkey_set deny + allow     {med(keyed) / 1e3:9.1f} µs  (this "
                      f"thread only)")
            libc.pkey_free(key)
    del pages, buf
    m.close()
    if ns.live:
        live(ns.live)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
