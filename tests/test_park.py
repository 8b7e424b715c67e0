"""Parking: a big relay region given up (a loan, a server's return) is moved out of the
way with ``mremap`` instead of ``mprotect``ed, so that giving it up and getting it back
cost page-table pages, not one entry per populated page (tvmrt._memory.park).

Checked on a RegionTable in this process, against /proc/self/maps and the kernel's fault
counter: at the region's address nothing of the segment is left while it is away (a
write there is SIGSEGV), the data comes back intact and without a fault, and every path
out of the parked state (grant, rollback, drop, a fresh grant with the fd) leaves
exactly one mapping of the segment, or none.
"""
from __future__ import annotations

import ctypes
import faulthandler
import os
import resource
import signal

import pytest

from tvmrt import _memory as memory
from tvmrt._layout import ARENAS, PAGE, PARK_MIN, PARK_OFFSET
from tvmrt._regions import RegionTable

pytestmark = pytest.mark.timeout(60)

SIZE = 4 << 20                          # two page-table pages' worth, plus alignment
#: far up the eapp_mmap arena, where no monitor of this test process hands out addresses
#: (they start at the arena's base); not 2 MiB aligned, to take the partial-table path too
VADDR = ARENAS["mmap"][0] + ARENAS["mmap"][1] - 64 * SIZE + 3 * PAGE
SEG = 0x7EEE


def _maps_of(name: str) -> list[tuple[int, int, str]]:
    """(start, end, perms) of every mapping of the memfd ``name`` in this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and f"/memfd:{name}" in parts[5]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[1]))
    return out


def _at(addr: int) -> str | None:
    """The perms of whatever is mapped at ``addr`` (None: nothing)."""
    with open("/proc/self/maps") as f:
        for line in f:
            rng, perms = line.split(None, 2)[:2]
            lo, hi = (int(x, 16) for x in rng.split("-"))
            if lo <= addr < hi:
                return perms
    return None


@pytest.fixture
def region(request):
    """A RegionTable owning a SIZE-byte relay region at VADDR, every page written."""
    memory.reserve_arenas()
    name = f"tvmrt-park-test-{os.getpid()}-{request.node.name}"[:60]
    fd = os.memfd_create(name)
    os.ftruncate(fd, SIZE)
    t = RegionTable()
    t.apply({"g": [[SEG, VADDR, SIZE, 1, "relay"]]}, [fd])     # closes fd
    pages = memory.view(VADDR, SIZE)[::PAGE]
    pages[:] = bytes(range(256)) * (len(pages) // 256)
    yield t, name
    t.drop_all()
    assert _maps_of(name) == [], "a mapping of the segment outlived its drop"
    assert _at(VADDR + PARK_OFFSET) == "---p", "the park arena's reservation is back"


def _write_faults(addr: int) -> int:
    """Fork a child that writes one byte at ``addr``; the signal it died of (0: none)."""
    pid = os.fork()
    if pid == 0:                                     # pragma: no cover (child)
        try:
            faulthandler.disable()                   # (pytest's: no report of the fault)
            ctypes.memset(addr, 1, 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def _data_intact() -> bool:
    pages = memory.view(VADDR, SIZE)[::PAGE]
    return bytes(pages) == bytes(range(256)) * (len(pages) // 256)


def test_a_big_loan_parks_and_comes_back_without_a_fault(region):
    t, name = region
    assert SIZE >= PARK_MIN
    loan = t.lend(VADDR, SIZE)
    assert VADDR in t.parked
    # nothing of the segment at its address: the arena's PROT_NONE reservation
    assert _maps_of(name) == [(VADDR + PARK_OFFSET, VADDR + PARK_OFFSET + SIZE, "rw-s")]
    assert _at(VADDR) == "---p" and _at(VADDR + SIZE - 1) == "---p"
    assert _write_faults(VADDR + SIZE // 2) == signal.SIGSEGV
    # the monitor's grant (no fd: this process still maps the segment) brings it back
    t.apply({"g": [[SEG, VADDR, SIZE, 0, "relay"]]}, [])
    assert not t.parked and t.owned[VADDR] == (SEG, SIZE) and VADDR not in t.lent
    assert _maps_of(name) == [(VADDR, VADDR + SIZE, "rw-s")]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert _data_intact()
    # the page tables came back with it: reading its 1,024 pages takes no fault of its
    # own (the few counted are Python's allocations; remapped afresh it would be 1,024)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < SIZE // PAGE // 10
    assert loan == (VADDR, SEG, SIZE)


def test_rollback_of_a_parked_loan(region):
    t, name = region
    loan = t.lend(VADDR, SIZE)
    t.rollback(loan)
    assert not t.parked and t.owned[VADDR] == (SEG, SIZE)
    assert _maps_of(name) == [(VADDR, VADDR + SIZE, "rw-s")] and _data_intact()


def test_a_servers_return_parks_and_a_drop_unmaps_both_places(region):
    t, name = region
    assert t.revoke_owned(VADDR)
    assert VADDR in t.parked and _at(VADDR) == "---p"
    t.drop(SEG)                                     # freed while away
    assert not t.parked and _maps_of(name) == []


def test_a_fresh_grant_with_the_fd_replaces_the_parked_mapping(region):
    t, name = region
    t.lend(VADDR, SIZE)
    fd = os.memfd_create(name)                      # the same segment's fd, sent again
    os.ftruncate(fd, SIZE)
    t.apply({"g": [[SEG, VADDR, SIZE, 1, "relay"]]}, [fd])
    assert not t.parked
    assert _maps_of(name) == [(VADDR, VADDR + SIZE, "rw-s")], "one mapping, not two"


def test_small_regions_are_mprotected_not_parked():
    memory.reserve_arenas()
    name = f"tvmrt-park-small-{os.getpid()}"
    fd = os.memfd_create(name)
    os.ftruncate(fd, PAGE)
    t = RegionTable()
    t.apply({"g": [[SEG + 1, VADDR, PAGE, 1, "relay"]]}, [fd])
    try:
        t.lend(VADDR, PAGE)
        assert not t.parked and _maps_of(name) == [(VADDR, VADDR + PAGE, "---s")]
        t.apply({"g": [[SEG + 1, VADDR, PAGE, 0, "relay"]]}, [])
        assert _maps_of(name) == [(VADDR, VADDR + PAGE, "rw-s")]
    finally:
        t.drop_all()
    assert _maps_of(name) == []
