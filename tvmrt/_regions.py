"""A process's own view of the regions it maps and owns (host and enclave runtimes).

The monitor decides ownership; this table applies its decisions to the process's
address space (grant = map or ``mprotect`` read-write, revoke = ``mprotect``
``PROT_NONE``, drop = unmap) and answers "may I touch this?" before any access,
so that the runtime raises :class:`~tvmrt.errors.NotOwned` instead of faulting.
"""
from __future__ import annotations

import bisect
import os

from . import _memory as memory
from .errors import NotOwned, ProtocolError


class RegionTable:
    """Mappings (segment -> address) and owned ranges of this process."""

    def __init__(self):
        self.mapped: dict[int, tuple[int, int]] = {}   # seg -> (vaddr, length)
        self.owned: dict[int, tuple[int, int]] = {}    # vaddr -> (seg, length)
        self.shared: dict[int, int] = {}               # shm windows: vaddr -> length
        self._starts: list[int] = []                   # sorted starts of owned + shared
        self._stale = False
        self._views: dict[int, memoryview] = {}        # vaddr -> view of the whole mapping

    def _index(self):
        # rebuilt lazily, by check(), and only for an address inside a range
        self._stale = True

    def _view_of(self, vaddr, length):
        v = self._views.get(vaddr)
        if v is None or len(v) != length:
            v = self._views[vaddr] = memory.view(vaddr, length)
        return v

    def apply(self, msg: dict, fds: list) -> list:
        """Apply the monitor's drops (``d``) and grants (``g``) carried by ``msg``.

        Takes ownership of ``fds``: one is mapped per grant that has one, the rest
        are closed, also on error.
        Returns the granted ``(vaddr, length)``.
        """
        fi = 0
        try:
            drops = msg.get("d")
            if drops:
                for seg in drops:
                    self.drop(seg)
            g = msg.get("g")
            out = []
            if g:
                for seg, vaddr, length, has_fd in g:
                    if has_fd:
                        if fi >= len(fds):
                            raise ProtocolError("grant without its fd")
                        fd = fds[fi]
                        fi += 1
                        try:
                            memory.map_fixed(vaddr, length, fd)
                        finally:
                            os.close(fd)
                        self.mapped[seg] = (vaddr, length)
                    else:
                        if self.mapped.get(seg) != (vaddr, length):
                            raise ProtocolError(f"grant of segment {seg} that is not "
                                                f"mapped here")
                        memory.protect(vaddr, length, memory.PROT_RW)
                    self.owned[vaddr] = (seg, length)
                    out.append((vaddr, length))
                self._index()
            return out
        finally:
            for fd in fds[fi:]:          # fds no grant used (none, from an honest monitor)
                os.close(fd)

    def drop(self, seg: int) -> None:
        """Unmap segment ``seg`` (it was freed; keeping it would pin its memory)."""
        m = self.mapped.pop(seg, None)
        if m is None:
            return
        vaddr, length = m
        self._views.pop(vaddr, None)
        if self.owned.get(vaddr, (None,))[0] == seg:
            del self.owned[vaddr]
            self._index()
        memory.unmap(vaddr, length)

    def revoke(self, vaddr: int) -> tuple[int, int] | None:
        """Give up access to the owned region starting at ``vaddr`` (PROT_NONE).

        Returns ``(seg, length)``, or None if this process does not own such a region.
        """
        o = self.owned.pop(vaddr, None)
        if o is None:
            return None
        memory.protect(vaddr, o[1], memory.PROT_NONE)
        self._index()
        return o

    def restore(self, vaddr: int, seg_len: tuple[int, int]) -> None:
        """Undo :meth:`revoke` (the monitor refused the transfer)."""
        memory.protect(vaddr, seg_len[1], memory.PROT_RW)
        self.owned[vaddr] = seg_len
        self._index()

    def add_shared(self, vaddr: int, length: int) -> None:
        self.shared[vaddr] = length
        self._index()

    def remove_shared(self, vaddr: int) -> None:
        self.shared.pop(vaddr, None)
        self._views.pop(vaddr, None)
        self._index()

    def _find(self, addr: int, size: int):
        """``(start, length)`` of the owned or shared range holding ``[addr, addr+size)``."""
        o = self.owned.get(addr)
        if o is not None and 0 <= size <= o[1]:
            return addr, o[1]
        n = self.shared.get(addr)
        if n is not None and 0 <= size <= n:
            return addr, n
        if self._stale:
            self._starts = sorted(list(self.owned) + list(self.shared))
            self._stale = False
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and size >= 0:
            start = self._starts[i]
            length = self.owned[start][1] if start in self.owned else self.shared.get(start, 0)
            if addr + size <= start + length:
                return start, length
        raise NotOwned(f"this process does not own [{addr:#x}, {addr + size:#x})")

    def check(self, addr: int, size: int) -> None:
        """Raise NotOwned unless ``[addr, addr+size)`` lies in one owned or shared range."""
        self._find(addr, size)

    def view(self, addr: int, size: int) -> memoryview:
        """Checked memoryview over ``[addr, addr+size)``."""
        start, length = self._find(addr, size)
        off = addr - start
        return self._view_of(start, length)[off:off + size]
