"""The enclave API, with Penglai's names (``from tvmrt.eapp import *`` in an eapp).

An eapp is a Python file defining ``main(args)``.  ``args`` is the register view
of Penglai's ``EAPP_RESERVE_REG``: a list of 32 integers where

* normal enclave: ``args[10]``/``args[11]`` = shared memory address/size,
  ``args[13]``/``args[14]`` = relay (schrodinger) page address/size;
* server enclave, on each call: ``args[10]`` = ``req_arg``, ``args[11]`` = the
  address of the loaned region (or 0), ``args[12]`` = ``req_size``,
  ``args[13]``/``args[14]`` = the server's own shared memory.

A normal enclave's ``main`` return value (or ``EAPP_RETURN(v)``) is its exit
value; a server's ``main`` returns a :class:`CallArg` (or calls
``SERVER_RETURN(arg)``).

Functions keep Penglai's C conventions: they return ``0`` (or a value) on
success and a negative error code on failure (``call_enclave``,
``acquire_enclave``, ``eapp_unmap``); ``eapp_mmap`` returns 0 on failure.  The
exception for the last failure is in :func:`last_error`; :func:`check` turns a
code into that exception.  Memory is reached with :func:`mem` / :func:`ints`,
which check ownership first and raise :class:`~tvmrt.errors.NotOwned`.
"""
from __future__ import annotations

import os
import re

from . import _runtime as _rtmod
from ._args import check_seconds, check_u64
from ._callarg import CallArg, call_enclave_arg_t
from ._layout import PAGE, U64, page_round
from .errors import BadSize, BadState, InvalidArgument, NotOwned, TvmError, error_for

__all__ = [
    "CallArg", "call_enclave_arg_t", "eapp_print", "eapp_mmap", "eapp_unmap",
    "acquire_enclave", "call_enclave", "SERVER_RETURN", "EAPP_RETURN", "get_enclave_id",
    "get_caller_id", "get_report", "get_key", "ENCLAVE_KEY", "STORAGE_KEY", "mem", "ints",
    "check", "last_error", "PAGE", "eapp_return_relay_page", "asyn_enclave_call",
    "split_mem_region",
]


def _rt():
    rt = _rtmod.current
    if rt is None:
        raise BadState("tvmrt.eapp is only usable inside an enclave (run it with tvmrt)")
    return rt


def last_error() -> TvmError | None:
    """The exception describing this enclave's last failed call, or None."""
    return _rt().last_error


def check(rc: int) -> int:
    """Return ``rc`` if it is not negative, else raise the matching TvmError."""
    if isinstance(rc, int) and rc < 0:
        rt = _rtmod.current
        if rt is not None and rt.last_error is not None and rt.last_error.code == rc:
            raise rt.last_error
        raise error_for(rc)
    return rc


# ---------------------------------------------------------------- printing
_FMT = re.compile(r"%(l?)([dxupsc%])")


def _format(fmt: str, args) -> str:
    it = iter(args)

    def one(m):
        long_, conv = m.group(1), m.group(2)
        if conv == "%":
            return "%"
        v = next(it)
        if conv == "d":
            return str(int(v))
        if conv == "u":
            return str(int(v) & ((1 << 64) - 1 if long_ else 0xFFFFFFFF))
        if conv == "x":
            # Penglai's formatter: %x is exactly 8 lowercase digits, %lx exactly 16
            return f"{int(v) & ((1 << 64) - 1):016x}" if long_ else f"{int(v) & 0xFFFFFFFF:08x}"
        if conv == "p":
            return f"0x{int(v) & ((1 << 64) - 1):016x}"
        if conv == "s":
            return str(v)
        return chr(v) if isinstance(v, int) else str(v)[:1]
    return _FMT.sub(one, fmt)


def eapp_print(fmt: str, *args) -> int:
    """Penglai's ``eapp_print``: ``%d %u %x %lx %p %s %c`` with its fixed-width hex.

    Written unbuffered to the enclave's stdout (the host's terminal).
    """
    data = _format(fmt, args).encode()
    os.write(1, data)
    return len(data)


# ---------------------------------------------------------------- keys
#: ``get_key`` types, Penglai's numbering (its ATTEST_KEY, 2, is refused here)
ENCLAVE_KEY = 0
STORAGE_KEY = 1


def get_key(key_type: int = ENCLAVE_KEY, size: int = 32):
    """Penglai's ``get_key``: ``size`` bytes (1 .. 8160) of a key only enclaves with
    this enclave's measurement get, or None (see :func:`last_error`: InvalidArgument,
    BadSize).

    The monitor derives it with HKDF-SHA256 from its own secret key, salted with the
    measurement (tvmrt/_attest.py): the same code, name and type get the same key
    from a monitor started with the same ``--key FILE``, across restarts; any other
    measurement, type or monitor key, an unrelated one.  ENCLAVE_KEY and STORAGE_KEY
    are different keys (on Penglai they are equal)."""
    rt = _rt()
    if type(key_type) is not int or key_type not in (ENCLAVE_KEY, STORAGE_KEY):
        _refuse(rt, InvalidArgument(f"key type must be ENCLAVE_KEY (0) or STORAGE_KEY "
                                    f"(1), not {key_type!r:.40}"))
        return None
    if type(size) is not int or not 1 <= size <= 255 * 32:
        _refuse(rt, BadSize(f"key size must be 1 .. 8160 bytes, not {size!r:.40}"))
        return None
    m = _ask(rt, {"op": "key", "type": key_type, "size": size})
    return None if isinstance(m, TvmError) else m["key"]


# ---------------------------------------------------------------- memory
def _ask(rt, msg: dict, timeout=None, loan=None):
    """One request; the reply, or the TvmError (also kept for :func:`last_error`)."""
    try:
        return rt.request(msg, timeout=timeout, loan=loan)
    except TvmError as exc:
        rt.last_error = exc
        return exc


def _refuse(rt, exc: TvmError) -> TvmError:
    rt.last_error = exc
    return exc


def eapp_mmap(vaddr: int, size: int) -> int:
    """Allocate a relay region of ``size`` bytes (rounded up to pages); returns its address.

    ``vaddr`` is a hint and is ignored (the monitor places every region).  Returns 0
    on failure (see :func:`last_error`: InvalidArgument, BadSize, QuotaExceeded,
    NoMemory).  The memory is zeroed.
    """
    rt = _rt()
    if type(size) is not int or size <= 0 or size > U64:
        _refuse(rt, BadSize(f"eapp_mmap size must be 1 .. 2**64-1, not {size!r:.40}"))
        return 0
    m = _ask(rt, {"op": "mmap", "size": page_round(size)})
    return 0 if isinstance(m, TvmError) else m["vaddr"]


def eapp_unmap(vaddr: int, size: int) -> int:
    """Free a region this enclave owns (not one on loan to it).  0 or a negative code."""
    rt = _rt()
    try:
        vaddr = check_u64(vaddr, "vaddr")
        size = check_u64(size, "size")
    except TvmError as exc:
        return _refuse(rt, exc).code
    m = _ask(rt, {"op": "unmap", "vaddr": vaddr, "size": min(page_round(size), U64)})
    return m.code if isinstance(m, TvmError) else 0


def mem(addr: int, size: int) -> memoryview:
    """A writable byte view of ``[addr, addr+size)``; raises NotOwned unless this
    enclave owns that range (a relay region) or maps it (its shared memory).

    The view raises ``ValueError`` while the region is away from this enclave (on
    loan, returned to its lender) and works again when it comes back to the same
    address, like a C pointer; once the region is freed it is dead for good.  A
    stale view never touches memory that is not ours."""
    return _rt().table.view(addr, size)


def ints(addr: int, count: int) -> memoryview:
    """``mem`` viewed as ``count`` C ints (``int *`` in the tutorial's code)."""
    return mem(addr, count * 4).cast("i")


# ---------------------------------------------------------------- calls
def acquire_enclave(name: str) -> int:
    """Handle of the live server enclave ``name``, or a negative code (-14 no such)."""
    rt = _rt()
    if not isinstance(name, str):
        return _refuse(rt, InvalidArgument(f"server name must be a str, not {name!r:.40}")).code
    m = _ask(rt, {"op": "acquire", "name": name})
    return m.code if isinstance(m, TvmError) else m["handle"]


def call_enclave(handle: int, arg: CallArg, nonblocking: bool = False,
                 timeout: float | None = None) -> int:
    """Synchronous call of server ``handle`` with ``arg`` (updated in place).

    If ``arg.req_vaddr`` is set, that whole region (``req_size`` bytes) is loaned to the
    server for the call and comes back to the same address when the server returns or
    dies, whatever happens to the call.  The server's response region, if any, is this
    enclave's afterwards at ``arg.resp_vaddr`` (``resp_size`` bytes).  A busy server is
    waited for (FIFO) unless ``nonblocking``, which returns -2 at once.  ``timeout``
    (seconds) bounds the whole call, queueing and the server's run: past it this
    returns the Timeout code; the loan comes back when the server is done, and its
    late answer is discarded.  Several threads may call at once.
    Returns 0 or a negative error code (the exception is in :func:`last_error`).
    """
    rt = _rtmod.current
    if rt is None:
        _rt()
    try:
        if type(arg) is not CallArg and not isinstance(arg, CallArg):
            raise InvalidArgument(f"call_enclave takes a call_enclave_arg_t, not "
                                  f"{type(arg).__name__}")
        fields = [arg.req_arg, arg.resp_val, arg.req_vaddr, arg.req_size, arg.resp_vaddr,
                  arg.resp_size]
        # Ranges: the loan below validates req_vaddr/req_size before anything moves; a
        # field msgpack cannot carry fails the send (InvalidArgument, the loan rolled
        # back); any other bad field (negative, float) the monitor refuses, re-granting
        # the region.  No per-call Python check needed on the hot path.
        msg = {"op": "call", "handle": handle, "a": fields}
        if nonblocking:
            msg["nb"] = True
        if timeout is not None:
            msg["timeout"] = check_seconds(timeout)
        loan = rt.table.lend(fields[2], fields[3]) if fields[2] else None
        m = rt.chan.request(msg, (), timeout, loan)
    except TvmError as exc:
        rt.last_error = exc
        return exc.code
    arg.set_from(m["a"])
    return 0


def SERVER_RETURN(arg: CallArg):
    """Return from a server call with ``arg`` (never returns)."""
    raise _rtmod.ServerReturn(arg)


def EAPP_RETURN(value: int = 0):
    """End a normal enclave with exit value ``value`` (never returns)."""
    raise _rtmod.EappReturn(value)


def get_enclave_id() -> int:
    """This enclave's monitor id (eid)."""
    return _rt().eid


def get_caller_id() -> int:
    """Eid of the enclave whose call is being served, or -1 outside a call."""
    return _rt().caller_id


def get_report(name: str | None, nonce: int):
    """Attestation report of this enclave (``name`` None) or of server ``name``.

    Returns the dict of :meth:`tvmrt.host.Enclave.attest` (``measurement``, ``nonce``,
    ``name``, ``type``, ``public_key``, ``sig``: 64-byte Ed25519), or None (see
    :func:`last_error`: InvalidArgument, NoSuchServer).  Either report carries the
    measurement taken at ``create``: unlike Penglai, ``get_report(None)`` does not
    re-measure the live enclave and ``get_report(name)`` does not change the server's
    stored measurement (its later reports and keys stay the same).
    """
    rt = _rt()
    try:
        nonce = check_u64(nonce, "nonce")
        if name is not None and not isinstance(name, str):
            raise InvalidArgument(f"server name must be a str or None, not {name!r:.40}")
    except TvmError as exc:
        _refuse(rt, exc)
        return None
    msg = {"op": "report", "nonce": nonce}
    if name is not None:
        msg["name"] = name
    m = _ask(rt, msg)
    return None if isinstance(m, TvmError) else m["report"]


# ---------------------------------------------------------------- relay pages, the rest
def eapp_return_relay_page() -> int:
    """Penglai's ``eapp_return_relay_page``: hand the run's relay (schrodinger) page
    back to the host now, and wait until the host continues this enclave.

    The host's ``PLenclave_run`` returns 1 (``Enclave.run`` too, with
    ``Enclave.relay_returned`` set); the host may read and write the page, then
    ``PLenclave_set_rerun_arg(enclave, 1)`` and ``PLenclave_run`` again
    (``Enclave.set_rerun_arg(1)``; ``run()``).  Then this returns 0 and the page is
    this enclave's again at the same address (``args[13]``, ``args[14]`` unchanged)
    with the host's writes.  The rerun arg itself is not passed in: as on Penglai,
    1 (RETURN_USER_RELAY_PAGE) is the only one, and it is what resumption means.
    Without a relay page the host still gets 1 and nothing moves.  While the page is
    away, views of it raise ``ValueError``.  Returns a negative code (see
    :func:`last_error`) outside a normal enclave's run, with a call in flight, or if
    this enclave no longer holds the page; the page stays where it was then.  If the
    host destroys the enclave instead of rerunning it, this never returns.
    """
    rt = _rt()
    loans = []
    try:
        for vaddr, length in rt.relay:
            loans.append(rt.table.lend(vaddr, length))
    except TvmError as exc:
        for loan in loans:
            rt.table.rollback(loan)
        return _refuse(rt, exc).code
    # several regions (never today: one per run) go in one request; the monitor
    # re-grants them on a refusal, so only the first is a rollback loan here
    m = _ask(rt, {"op": "rrp", "v": [v for v, _ in rt.relay]},
             loan=loans[0] if loans else None)
    return m.code if isinstance(m, TvmError) else 0


def asyn_enclave_call(name: str, arg: CallArg) -> int:
    """Penglai's ``asyn_enclave_call``: give the region ``[arg.req_vaddr,
    +arg.req_size)`` (a whole region this enclave owns outright, or none when
    ``req_vaddr`` is 0) to the server enclave ``name`` and deliver ``arg.req_arg``,
    without waiting.

    Returns 0 once the monitor has taken the region: from then on it belongs to the
    server (this enclave loses it, as on Penglai).  The server's ``main`` runs with
    it like a call (``args[10]`` = req_arg, ``args[11]``/``args[12]`` = the region,
    ``get_caller_id()`` = this enclave) as soon as an instance is free -- FIFO with the
    synchronous callers queued on it -- and keeps it afterwards; its return value goes
    nowhere (a response region it names is freed).  If the server ends before or
    while taking it, the region is freed.  Nothing is ever reported back later:
    failure is known only at once, as a negative code (see :func:`last_error`):
    NoSuchServer, QuotaExceeded (its queue is full), NotOwned / RegionLoaned /
    BadSize / Unaligned (the region), CallCycle (``name`` is this enclave's own
    server name); the region stays with this enclave then.
    """
    rt = _rt()
    try:
        if not isinstance(arg, CallArg):
            raise InvalidArgument(f"asyn_enclave_call takes a call_enclave_arg_t, not "
                                  f"{type(arg).__name__}")
        if not isinstance(name, str):
            raise InvalidArgument(f"server name must be a str, not {name!r:.40}")
        vaddr = check_u64(arg.req_vaddr, "req_vaddr")
        size = check_u64(arg.req_size, "req_size")
        req = check_u64(arg.req_arg, "req_arg")
        if vaddr:
            rt.table.check(vaddr, size)
            if not rt.table.owns(vaddr):
                raise NotOwned(f"this enclave does not own a region at {vaddr:#x}")
    except TvmError as exc:
        return _refuse(rt, exc).code
    # revoked before the send (a refusal grants it back): never two writers
    if vaddr:
        rt.table.revoke_owned(vaddr)
    m = _ask(rt, {"op": "asyn", "name": name, "arg": req, "vaddr": vaddr, "size": size})
    return m.code if isinstance(m, TvmError) else 0


def split_mem_region(mem_addr: int, mem_size: int, split_addr: int) -> int:
    """Penglai's ``split_mem_region``: the region at ``mem_addr`` (``mem_size`` bytes,
    the whole region, one this enclave owns outright: from ``eapp_mmap``, not on loan)
    becomes two regions, ``[mem_addr, split_addr)`` and ``[split_addr,
    mem_addr+mem_size)``, at the same addresses with the same contents: each half can
    then be lent (``call_enclave``), given (``asyn_enclave_call``) or unmapped
    (``eapp_unmap``) on its own.  ``split_addr`` must be page aligned and strictly
    inside (each half at least a page).  Views taken of the whole region die; take new
    ones.  Returns 0, or a negative code (see :func:`last_error`): NotOwned,
    RegionLoaned, BadSize, Unaligned, QuotaExceeded (one region more),
    ResourceExhausted (the monitor is out of fds)."""
    rt = _rt()
    try:
        mem_addr = check_u64(mem_addr, "mem_addr")
        mem_size = check_u64(mem_size, "mem_size")
        split_addr = check_u64(split_addr, "split_addr")
    except TvmError as exc:
        return _refuse(rt, exc).code
    m = _ask(rt, {"op": "split", "vaddr": mem_addr, "size": mem_size, "at": split_addr})
    if isinstance(m, TvmError):
        return m.code
    seg1, len1, seg2, len2 = m["split"]
    rt.table.split(mem_addr, seg1, len1, seg2, len2)
    return 0
