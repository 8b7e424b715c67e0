"""Memory primitives: the common address arena and fixed-address mappings.

Every tvmrt process (host, zygote, enclave) reserves the same ranges of virtual
addresses (anonymous, ``PROT_NONE``, ``MAP_NORESERVE``: no memory is used).  The
monitor hands every region an address inside an arena, unique within the
monitor instance, and each process maps the region's segment **at that
address** with ``MAP_FIXED`` over its own reservation.  So an address in a
``call_enclave_arg_t`` is valid in whichever process owns the region.

The arenas themselves are listed in :mod:`tvmrt._layout`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap as _mmap
import os

from ._layout import ARENAS, PAGE, PARK_ARENA, PARK_MIN, PARK_OFFSET, page_round  # noqa: F401

PROT_NONE = 0
PROT_RW = _mmap.PROT_READ | _mmap.PROT_WRITE
_MAP_SHARED = 0x01
_MAP_PRIVATE = 0x02
_MAP_FIXED = 0x10
_MAP_ANON = 0x20
_MAP_NORESERVE = 0x4000
_MAP_FIXED_NOREPLACE = 0x100000
_MADV_DONTFORK = 10
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p)
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong)


def _fail(what: str):
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def reserve_arenas() -> None:
    """Reserve every arena in this process (idempotent per process).

    Raises OSError if something else already lives at those addresses.
    """
    if _reserved.get("pid") is not None:
        # done in this process, or in an ancestor whose mappings fork copied to us
        return
    for name, (base, size) in ARENAS.items():
        got = _libc.mmap(base, size, PROT_NONE,
                         _MAP_PRIVATE | _MAP_ANON | _MAP_NORESERVE | _MAP_FIXED_NOREPLACE, -1, 0)
        if got == _MAP_FAILED or got != base:
            _fail(f"reserving the {name} arena at {base:#x}")
    _reserved["pid"] = os.getpid()


# Process-wide facts: the arena is reserved or not, and which monitor hands out its
# addresses (two monitors would give the same addresses to different regions).
_reserved: dict = {}
_claim = {"monitor": None, "users": 0}


def claim_arena(monitor: str) -> None:
    """Note that this process maps regions of ``monitor``; BadState if another monitor
    already has live connections in this process."""
    from .errors import BadState
    if _claim["users"] and _claim["monitor"] != monitor:
        raise BadState(f"this process is connected to the monitor at {_claim['monitor']}; "
                       f"regions of two monitors would collide in its address arena")
    _claim["monitor"] = monitor
    _claim["users"] += 1


def release_arena() -> None:
    """Undo one :func:`claim_arena`."""
    _claim["users"] = max(0, _claim["users"] - 1)


def map_fixed(addr: int, length: int, fd: int, offset: int = 0, prot: int = PROT_RW) -> None:
    """Map ``length`` bytes of ``fd`` at exactly ``addr`` (over the reservation)."""
    got = _libc.mmap(addr, length, prot, _MAP_SHARED | _MAP_FIXED, fd, offset)
    if got == _MAP_FAILED:
        _fail(f"mmap at {addr:#x}")
    # A host that forks must not hand its regions to the child.
    _libc.madvise(addr, length, _MADV_DONTFORK)


# the raw call (0, or -1 with errno set): the loan path calls it without a wrapper
_mprotect = _libc.mprotect


def revoke(addr: int, length: int) -> bool:
    """Take this process's access to the region at ``addr`` away: a region of
    ``PARK_MIN`` bytes or more is parked (:func:`park`; True), a smaller one -- or one
    that cannot be parked -- is ``PROT_NONE``d (False).  OSError if neither works."""
    if length >= PARK_MIN and park(addr, length):
        return True
    if _mprotect(addr, length, PROT_NONE):
        _fail(f"mprotect at {addr:#x}")
    return False


def restore(addr: int, length: int, parked: bool) -> None:
    """Give the access :func:`revoke` took back (``parked``: what it returned)."""
    if parked:
        unpark(addr, length)
    elif _mprotect(addr, length, PROT_RW):
        _fail(f"mprotect at {addr:#x}")


def unmap(addr: int, length: int) -> None:
    """Drop a mapping, putting the PROT_NONE reservation back in its place."""
    got = _libc.mmap(addr, length, PROT_NONE,
                     _MAP_PRIVATE | _MAP_ANON | _MAP_NORESERVE | _MAP_FIXED, -1, 0)
    if got == _MAP_FAILED:
        _fail(f"unmap at {addr:#x}")


# ---------------------------------------------------------------------------- parking
# Giving up a big region by mprotect rewrites one page-table entry per populated page
# (a 64 MiB region both sides touch: 16,384 entries, 1-2 ms per mprotect).  Moving the
# mapping away with mremap moves whole page-table pages instead (one entry per 2 MiB
# where source and destination line up: parking keeps the offset within 2 MiB), and
# moving it back restores it with its entries intact: no fault on the next touch.  The
# region's own address gets the PROT_NONE reservation back at once, so a write there
# faults exactly as after mprotect(PROT_NONE), and nothing else can be mapped there.
_park = {"reserved": False}       # fork copies it with the reservation itself


def _reserve_park() -> bool:
    base, size = PARK_ARENA
    got = _libc.mmap(base, size, PROT_NONE,
                     _MAP_PRIVATE | _MAP_ANON | _MAP_NORESERVE | _MAP_FIXED_NOREPLACE, -1, 0)
    if got != base:
        if got != _MAP_FAILED:
            _libc.munmap(got, size)
        return False
    _park["reserved"] = True
    return True


def park(addr: int, length: int) -> bool:
    """Move the mapping at ``addr`` (in an arena) to ``addr + PARK_OFFSET`` and reserve
    ``addr`` again (PROT_NONE).  False, with nothing changed, if this cannot be done
    (no park arena here, mremap refused): the caller mprotects instead."""
    if not _park["reserved"] and not _reserve_park():
        return False
    to = addr + PARK_OFFSET
    if _libc.mremap(addr, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, to) != to:
        return False
    if _libc.mmap(addr, length, PROT_NONE,
                  _MAP_PRIVATE | _MAP_ANON | _MAP_NORESERVE | _MAP_FIXED, -1, 0) != addr:
        # (out of memory for a vma): move it back rather than leave a hole
        if _libc.mremap(to, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, addr) != addr:
            _fail(f"mremap back to {addr:#x}")
        unpark_drop(addr, length)
        return False
    return True


def unpark(addr: int, length: int) -> None:
    """Move the region parked for ``addr`` back to ``addr`` (over its reservation)."""
    if _libc.mremap(addr + PARK_OFFSET, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED,
                    addr) != addr:
        _fail(f"mremap to {addr:#x}")
    unpark_drop(addr, length)


def unpark_drop(addr: int, length: int) -> None:
    """Put the park arena's reservation back over ``addr``'s parking place (dropping
    whatever is parked there)."""
    unmap(addr + PARK_OFFSET, length)


_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_from_memory.restype = ctypes.py_object
_from_memory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PyBUF_WRITE = 0x200


def view(addr: int, length: int) -> memoryview:
    """A writable byte memoryview over ``[addr, addr+length)`` (no checks: see callers).

    Every view sliced or cast from it shares its managed buffer, so that
    :func:`flag_of` gives the word that makes all of them unusable at once.
    """
    return _from_memory(addr, length, _PyBUF_WRITE)


# CPython keeps, for every memoryview, a pointer to the managed buffer all views cut
# from the same export share (PyMemoryViewObject.mbuf, right after the variable-size
# object header), and the managed buffer has a flags word after its object header.
# Setting its RELEASED flag makes every view sharing it raise ValueError ("operation
# forbidden on released memoryview object") on any use, instead of touching memory
# that is no longer ours (a SIGSEGV that would kill the interpreter).  The layout is
# checked once at import; where it does not hold, views are simply not invalidated.
_MBUF_OFF = ctypes.sizeof(ctypes.c_ssize_t) * 3          # ob_refcnt, ob_type, ob_size
_FLAGS_OFF = ctypes.sizeof(ctypes.c_ssize_t) * 2         # ob_refcnt, ob_type
_MBUF_RELEASED = 0x1


def _flags_of(mv: memoryview) -> ctypes.c_int:
    mbuf = ctypes.c_void_p.from_address(id(mv) + _MBUF_OFF).value
    return ctypes.c_int.from_address(mbuf + _FLAGS_OFF)


def flag_of(mv: memoryview) -> memoryview | None:
    """The released flag word shared by ``mv`` and every view cut from it, as a
    one-int view (None where this interpreter's layout is not the one checked at
    import).  Storing 1 kills them all, 0 revives them (a view made by :func:`view` has
    no other flag bit set).  A memoryview store is the cheapest write Python has: it
    happens twice per loan on the call path."""
    if not _KILL_WORKS:
        return None
    return _from_memory(ctypes.addressof(_flags_of(mv)), ctypes.sizeof(ctypes.c_int),
                        _PyBUF_WRITE).cast("i")


def _probe_kill() -> bool:
    buf = ctypes.create_string_buffer(64)
    root = _from_memory(ctypes.addressof(buf), 64, _PyBUF_WRITE)
    child = root[8:16].cast("i")
    try:
        if _flags_of(root).value != 0 or _flags_of(child).value != 0:
            return False
        _flags_of(root).value |= _MBUF_RELEASED
        try:
            child[0]
        except ValueError:
            return True
        return False
    except Exception:
        return False


_KILL_WORKS = _probe_kill()


def set_name(name: bytes) -> None:
    """``PR_SET_NAME``: this thread's name as ``ps`` and ``/proc/PID/comm`` show it (at
    most 15 bytes are kept)."""
    _libc["prctl"](15, name, 0, 0, 0)       # a fresh function pointer: a char* argument


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies."""
    _libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
