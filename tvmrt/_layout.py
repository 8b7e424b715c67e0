"""The address layout every tvmrt process shares (pure constants, no system calls).

Every tvmrt process (monitor, zygote, host, enclave) reserves the same arenas of
virtual addresses, and the monitor hands out region addresses inside them, so that
an address means the same region in whichever process owns it.  Following Penglai:

========== ====================== ===========================================
arena      range                  holds
========== ====================== ===========================================
mmap       0x20_0000_0000 +64 GiB ``eapp_mmap`` regions of enclaves
relay      0x38_0000_0000 +4 GiB  host schrodinger (relay) regions
shm        0x39_0000_0000 +28 GiB host shared memory (``shmget``)
park       0x40_0000_0000 +128 GiB big relay regions a process has given up, each at
                                  its own address + ``PARK_OFFSET`` (reserved on the
                                  process's first park)
========== ====================== ===========================================
"""
from __future__ import annotations

import os

#: the page size of this machine
PAGE: int = os.sysconf("SC_PAGE_SIZE")

#: arena name -> (base address, size in bytes)
ARENAS: dict[str, tuple[int, int]] = {
    "mmap": (0x20_0000_0000, 0x10_0000_0000),
    "relay": (0x38_0000_0000, 0x1_0000_0000),
    "shm": (0x39_0000_0000, 0x7_0000_0000),
}

#: Where a process parks a big region it has given up (:func:`tvmrt._memory.park`): the
#: region at ``vaddr`` moves to ``vaddr + PARK_OFFSET``, in a reservation mirroring the
#: three arenas above, made on a process's first park.
PARK_OFFSET: int = 0x20_0000_0000
PARK_ARENA: tuple[int, int] = (0x20_0000_0000 + PARK_OFFSET, 0x20_0000_0000)
#: regions from this size on are parked when given up instead of ``mprotect``ed
PARK_MIN: int = 1 << 20

#: largest unsigned 64-bit integer (every call_enclave_arg_t field)
U64: int = (1 << 64) - 1


def page_round(n: int) -> int:
    """Round ``n`` up to a whole number of pages."""
    return (n + PAGE - 1) & ~(PAGE - 1)
