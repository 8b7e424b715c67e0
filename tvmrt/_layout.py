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

#: largest unsigned 64-bit integer (every call_enclave_arg_t field)
U64: int = (1 << 64) - 1


def page_round(n: int) -> int:
    """Round ``n`` up to a whole number of pages."""
    return (n + PAGE - 1) & ~(PAGE - 1)
