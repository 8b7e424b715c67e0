"""A process's own view of the regions it maps and owns (host and enclave runtimes).

The monitor decides ownership; this table applies its decisions to the process's
address space and is the **only** code that changes protections:

* :meth:`RegionTable.apply` performs the monitor's grants (map, or ``mprotect``
  read-write) and drops (unmap), whoever the message carrying them was for;
* :meth:`RegionTable.lend` is the loan transaction: it validates everything first
  (integer ranges, alignment, sizes, ownership), then revokes (``PROT_NONE``) and
  returns a :class:`Loan`; the request is then sent, and either the monitor's grants
  bring the region back (commit) or, if the request never left this process,
  :meth:`RegionTable.rollback` restores it.

Views handed out (:meth:`RegionTable.view`) share one managed buffer per region;
while the region is away from this process every one of them is unusable (it raises
``ValueError`` instead of crashing the interpreter with SIGSEGV); when the same
segment comes back to the same address they work again, like a C pointer into the
relay page; when the segment is unmapped (freed, detached) they are dead for good.  A lookup that
misses asks the channel to apply what is already waiting in the socket first
(``refresh``), so a region that has just come back is usable at once.
"""
from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable

from . import _memory as memory
from ._args import check_u64
from ._layout import PAGE, U64
from ._wire import FdsLost, close_all
from .errors import BadSize, InvalidArgument, NotOwned, RemoteProtocolError, Unaligned

#: A region revoked for a request that has not been answered yet: ``(vaddr, seg,
#: length)``, a plain tuple (it is made on every loaning call).  Undo it with
#: :meth:`RegionTable.rollback` if the request never reached the monitor.
Loan = tuple[int, int, int]


class RegionTable:
    """Mappings (segment -> address) and owned / shared ranges of this process.

    Thread-safe: the thread reading the channel applies grants while others look up
    views or lend regions.
    """

    __slots__ = ("_lock", "mapped", "owned", "shared", "lent", "parked", "_starts",
                 "_stale", "_roots", "refresh")

    def __init__(self) -> None:
        self._lock = threading.Lock()     # never held while calling out (refresh)
        self.mapped: dict[int, tuple[int, int]] = {}   # seg -> (vaddr, length)
        self.owned: dict[int, tuple[int, int]] = {}    # relay: vaddr -> (seg, length)
        self.shared: dict[int, int] = {}               # shm windows: vaddr -> length
        self.lent: dict[int, tuple[int, int]] = {}     # revoked by lend: vaddr -> (seg, len)
        # given up by parking (_memory.park), not mprotect: vaddr -> length
        self.parked: dict[int, int] = {}
        self._starts: list[int] = []                   # sorted starts of owned + shared
        self._stale = False
        # root view handed out per region start: vaddr -> (root, flag, seg).  Every view
        # handed out is cut from its root; the flag (one int) is 1 while the region is
        # away (its views raise), 0 while it is here.
        self._roots: dict[int, tuple[memoryview, memoryview, int | None]] = {}
        #: called (without the lock) when a lookup misses: apply what is waiting
        self.refresh: Callable[[], None] | None = None

    # ------------------------------------------------------------------ monitor's word
    def apply(self, msg: dict, fds: list) -> None:
        """Apply the drops (``d``) and grants (``g``) carried by ``msg``.

        Takes ownership of ``fds``: one is mapped per grant that has one, the rest
        are closed, also on error.  Raises :class:`RemoteProtocolError` for a grant
        that makes no sense here (a bug or a hostile monitor).
        """
        drops = msg.get("d")
        grants = msg.get("g")
        if not drops and not grants:
            if fds:
                close_all(fds)
            return
        fi = 0
        try:
            with self._lock:
                if drops:
                    for seg in drops:
                        self._drop(seg)
                if grants:
                    mapped = self.mapped
                    roots = self._roots
                    for g in grants:
                        try:
                            seg, vaddr, length, has_fd, kind = g
                        except (TypeError, ValueError):
                            raise RemoteProtocolError(f"malformed grant {g!r:.80}") from None
                        if has_fd:
                            if fi >= len(fds):
                                # the kernel dropped it: this process is out of fds
                                raise FdsLost("the fd of a granted segment could not be "
                                              "received: out of file descriptors")
                            fd = fds[fi]
                            fi += 1
                            if kind == "remap" and type(self) is RegionTable:
                                # the monitor runs in strict mode (a first grant tells,
                                # before any region of it can be given up): from now on
                                # this process unmaps what it gives up
                                self.__class__ = StrictRegionTable
                            try:
                                old = self.mapped.get(seg)
                                if old is not None and old != (vaddr, length):
                                    self._drop(seg)
                                elif self.parked:
                                    self._forget_parked(vaddr)  # mapped afresh below
                                # has_fd - 1: where the region starts in the
                                # file (a split region's second half: not 0)
                                memory.map_fixed(vaddr, length, fd, has_fd - 1)
                            finally:
                                os.close(fd)
                            self.mapped[seg] = (vaddr, length)
                        else:
                            m = mapped.get(seg)
                            if m is None or m[0] != vaddr or m[1] != length:
                                raise RemoteProtocolError(
                                    f"grant of segment {seg} that is not mapped here")
                            self._take_back(vaddr, length)
                        if self.lent:
                            self.lent.pop(vaddr, None)
                        r = roots.get(vaddr)
                        if r is not None and r[1][0]:
                            self._unpark_views(vaddr, seg)
                        if kind == "shm":
                            self.shared[vaddr] = length
                        else:
                            self.owned[vaddr] = (seg, length)
                    self._stale = True
        finally:
            if fi < len(fds):
                close_all(fds[fi:])      # fds no grant used (none, from an honest monitor)

    def _drop(self, seg: int) -> None:
        m = self.mapped.pop(seg, None)
        if m is None:
            return
        vaddr, length = m
        self._kill(vaddr)
        if self.parked:
            self._forget_parked(vaddr)
        if self.owned.get(vaddr, (None,))[0] == seg:
            del self.owned[vaddr]
        if self.lent.get(vaddr, (None,))[0] == seg:
            del self.lent[vaddr]
        self.shared.pop(vaddr, None)
        self._stale = True
        memory.unmap(vaddr, length)

    def _give_up(self, vaddr: int, length: int) -> None:
        """Take this process's access to the region at ``vaddr`` away (parked or
        ``PROT_NONE``: :func:`tvmrt._memory.revoke`), remembering which."""
        if memory.revoke(vaddr, length):
            self.parked[vaddr] = length

    def _take_back(self, vaddr: int, length: int) -> None:
        """Undo :meth:`_give_up`: the region at ``vaddr`` is this process's again."""
        memory.restore(vaddr, length, self.parked.pop(vaddr, None) is not None)

    def _forget_parked(self, vaddr: int) -> None:
        """The region at ``vaddr`` is unmapped or mapped afresh: a parked mapping of it
        goes too (its parking place gets the park arena's reservation back)."""
        length = self.parked.pop(vaddr, None)
        if length is not None:
            memory.unpark_drop(vaddr, length)

    def drop(self, seg: int) -> None:
        """Unmap segment ``seg`` here (freed or detached); views of it die."""
        with self._lock:
            self._drop(seg)

    def drop_all(self) -> None:
        """Unmap everything (the connection is closing)."""
        with self._lock:
            for seg in list(self.mapped):
                self._drop(seg)
            self.shared.clear()
            self.lent.clear()

    def add_shared(self, vaddr: int, length: int) -> None:
        """Note a shared window mapped outside :meth:`apply` (an enclave's at start)."""
        with self._lock:
            self.shared[vaddr] = length
            self._stale = True

    # ------------------------------------------------------------------ the loan
    def lend(self, vaddr, size) -> Loan:
        """Validate and revoke the owned region ``[vaddr, vaddr+size)`` for a request.

        Raises, with nothing changed: :class:`InvalidArgument` (not a u64),
        :class:`Unaligned`, :class:`BadSize` (zero, not whole pages, not the whole
        region), :class:`NotOwned`.  Returns the :class:`Loan`.
        """
        if type(vaddr) is int and type(size) is int and 0 < size <= U64 \
                and not (vaddr | size) & (PAGE - 1):
            with self._lock:
                o = self.owned.get(vaddr)
                if o is not None and o[1] == size:
                    seg = o[0]
                    r = self._roots.get(vaddr)
                    if r is not None:
                        r[1][0] = 1                 # its views raise before the page goes
                    self._give_up(vaddr, size)
                    del self.owned[vaddr]
                    self.lent[vaddr] = o
                    self._stale = True
                    return (vaddr, seg, size)
        return self._lend_slow(vaddr, size)

    def _lend_slow(self, vaddr, size) -> Loan:
        """Why the fast path refused, as the precise error; or lend after all when a
        grant waiting in the socket makes the region ours."""
        vaddr = check_u64(vaddr, "req_vaddr")
        size = check_u64(size, "req_size")
        if vaddr % PAGE:
            raise Unaligned(f"req_vaddr {vaddr:#x} is not page aligned")
        if size == 0 or size % PAGE:
            raise BadSize(f"req_size {size:#x} must be a non-zero page multiple")
        o = self.owned.get(vaddr) if self.owns(vaddr) else None   # owns() drains first
        if o is None:
            raise NotOwned(f"this process does not own a region at {vaddr:#x}")
        length = o[1]
        if size != length:
            raise BadSize(f"req_size {size:#x} must cover the whole region ({length:#x})")
        return self.lend(vaddr, size)

    def rollback(self, loan: Loan) -> None:
        """The request carrying ``loan`` never reached the monitor: the region is ours
        again (unless the monitor has spoken about it since: its word holds)."""
        vaddr, seg, length = loan
        with self._lock:
            if self.lent.get(vaddr) != (seg, length):
                return
            self._take_back(vaddr, length)
            self._unpark_views(vaddr, seg)
            del self.lent[vaddr]
            self.owned[vaddr] = (seg, length)
            self._stale = True

    def revoke_owned(self, vaddr: int) -> bool:
        """Give up the owned region at ``vaddr`` because this process hands it to the
        monitor in a message that is not a request (a server's return, an exit).
        Returns False if it was not owned."""
        with self._lock:
            o = self.owned.pop(vaddr, None)
            if o is None:
                return False
            self._park_views(vaddr)
            self._give_up(vaddr, o[1])
            self._stale = True
            return True

    def split(self, vaddr: int, seg1: int, len1: int, seg2: int, len2: int) -> None:
        """The monitor split the owned region at ``vaddr`` (``split_mem_region``): it is
        two regions now, ``seg1`` at ``vaddr`` (``len1`` bytes) and ``seg2`` right after
        (``len2``), in the one mapping this process already has.  Views taken of the
        whole region die (each half may leave on its own); take new ones."""
        with self._lock:
            o = self.owned.get(vaddr)
            m = self.mapped.get(seg1)
            if o != (seg1, len1 + len2) or m != (vaddr, len1 + len2):
                raise RemoteProtocolError(f"split of region {vaddr:#x} that is not "
                                          f"owned here whole")
            self._kill(vaddr)
            self.owned[vaddr] = (seg1, len1)
            self.mapped[seg1] = (vaddr, len1)
            self.owned[vaddr + len1] = (seg2, len2)
            self.mapped[seg2] = (vaddr + len1, len2)
            self._stale = True

    # ------------------------------------------------------------------ lookups
    def owns(self, vaddr: int) -> bool:
        """True when the relay region starting at ``vaddr`` is this process's now."""
        if vaddr in self.owned:
            return True
        if self.refresh is not None:
            self.refresh()
        return vaddr in self.owned

    def _find(self, addr: int, size: int):
        """``(start, length)`` of the owned or shared range holding ``[addr, addr+size)``,
        or None."""
        o = self.owned.get(addr)
        if o is not None and 0 <= size <= o[1]:
            return addr, o[1]
        n = self.shared.get(addr)
        if n is not None and 0 <= size <= n:
            return addr, n
        if type(addr) is not int or type(size) is not int or size < 0:
            return None
        if self._stale:
            self._starts = sorted(list(self.owned) + list(self.shared))
            self._stale = False
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start = self._starts[i]
            o = self.owned.get(start)
            length = o[1] if o is not None else self.shared.get(start, 0)
            if addr + size <= start + length:
                return start, length
        return None

    def _lookup(self, addr: int, size: int):
        with self._lock:
            f = self._find(addr, size)
        if f is None and self.refresh is not None:
            self.refresh()
            with self._lock:
                f = self._find(addr, size)
        if f is None:
            try:
                end = f"{addr + size:#x}"
            except TypeError:
                raise InvalidArgument(f"bad address/size {addr!r}, {size!r}") from None
            raise NotOwned(f"this process does not own [{addr:#x}, {end})")
        return f

    def check(self, addr: int, size: int) -> None:
        """Raise NotOwned unless ``[addr, addr+size)`` lies in one owned or shared range."""
        self._lookup(addr, size)

    def view(self, addr: int, size: int) -> memoryview:
        """Checked memoryview over ``[addr, addr+size)``.

        The view (and any view sliced or cast from it) raises ``ValueError`` while the
        region is away.  Raises :class:`NotOwned` if it is not here now.
        """
        # Fast path without the lock: a root in _roots is a region that is here; if it
        # leaves right after this lookup, its flag makes the returned slice raise.
        r = self._roots.get(addr)
        if r is not None and not r[1][0] and type(size) is int and 0 <= size <= len(r[0]):
            return r[0][:size]
        return self._view_slow(addr, size)

    def _view_slow(self, addr, size) -> memoryview:
        self._lookup(addr, size)            # applies what is waiting; the precise error
        with self._lock:
            f = self._find(addr, size)
            if f is None:
                raise NotOwned(f"the region at {addr:#x} has just left this process")
            start, length = f
            r = self._roots.get(start)
            if r is None or r[1][0] or len(r[0]) != length:
                self._kill(start)
                mv = memory.view(start, length)
                o = self.owned.get(start)
                r = self._roots[start] = (mv, memory.flag_of(mv) or _private_flag(),
                                          o[0] if o is not None else None)
            off = addr - start
            return r[0][off:off + size]

    def _park_views(self, vaddr: int) -> None:
        """The region leaves: its views raise until the same segment comes back."""
        r = self._roots.get(vaddr)
        if r is not None:
            r[1][0] = 1

    def _unpark_views(self, vaddr: int, seg: int) -> None:
        """The region is back: its views work again if it is the same segment."""
        r = self._roots.get(vaddr)
        if r is not None:
            if r[2] == seg:
                r[1][0] = 0
            else:
                self._kill(vaddr)

    def _kill(self, vaddr: int) -> None:
        """The mapping goes: its views are dead for good."""
        r = self._roots.pop(vaddr, None)
        if r is not None:
            r[1][0] = 1


class StrictRegionTable(RegionTable):
    """The region table of a process whose monitor runs in strict mode (DESIGN.md §2
    ``remap``): giving a relay region up **unmaps** it (the address goes back to the
    arena's ``PROT_NONE`` reservation) and forgets the segment; no fd was kept (a
    segment's fd is closed as soon as it is mapped), so this process keeps neither
    mapping nor fd and needs a new grant, with the fd, to touch the region again.  The
    monitor checks that from ``/proc/PID/maps`` before it grants the region to anyone.

    A :class:`RegionTable` becomes one at the first ``"remap"`` grant it applies (one
    process talks to one monitor); the default mode's table is not touched.  Views
    behave as in the default mode: parked while the region is away, alive again when
    the same segment comes back to the same address.  :meth:`rollback` cannot restore
    a mapping it has no fd for: a loan whose request never left is lost here (the
    monitor still counts the region as this process's; it frees it with the process).
    """

    __slots__ = ()

    def _unmap_seg(self, vaddr: int, size: int, seg: int) -> None:
        """Give the mapping up: nothing of the segment stays in this process."""
        memory.unmap(vaddr, size)
        self.mapped.pop(seg, None)

    # RegionTable.lend with the unmap in place of the mprotect: the default table's body
    # stays one straight run on the call path (no hook to call), so this is its copy
    def lend(self, vaddr, size) -> Loan:
        if type(vaddr) is int and type(size) is int and 0 < size <= U64 \
                and not (vaddr | size) & (PAGE - 1):
            with self._lock:
                o = self.owned.get(vaddr)
                if o is not None and o[1] == size:
                    seg = o[0]
                    r = self._roots.get(vaddr)
                    if r is not None:
                        r[1][0] = 1                 # its views raise before the page goes
                    self._unmap_seg(vaddr, size, seg)
                    del self.owned[vaddr]
                    self.lent[vaddr] = o
                    self._stale = True
                    return (vaddr, seg, size)
        return self._lend_slow(vaddr, size)

    def rollback(self, loan: Loan) -> None:
        vaddr, seg, length = loan
        with self._lock:
            if self.lent.get(vaddr) == (seg, length):
                del self.lent[vaddr]
                self._kill(vaddr)

    def revoke_owned(self, vaddr: int) -> bool:
        with self._lock:
            o = self.owned.pop(vaddr, None)
            if o is None:
                return False
            self._park_views(vaddr)
            self._unmap_seg(vaddr, o[1], o[0])
            self._stale = True
            return True

    def _drop(self, seg: int) -> None:
        if seg in self.mapped:
            RegionTable._drop(self, seg)
            return
        # freed while away from here: nothing is mapped, the loan is over
        for v, (s, _n) in list(self.lent.items()):
            if s == seg:
                del self.lent[v]
                self._kill(v)


def _private_flag() -> memoryview:
    """A flag word for a root whose views this interpreter cannot kill (its memoryview
    layout is not the one :mod:`_memory` checked): the table's bookkeeping stays the
    same, the views are simply not invalidated."""
    return memoryview(bytearray(4)).cast("i")
