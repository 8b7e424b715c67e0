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
from ._callarg import CallArg, call_enclave_arg_t
from .errors import InvalidArgument, TvmError, error_for
from ._memory import PAGE, page_round

__all__ = [
    "CallArg", "call_enclave_arg_t", "eapp_print", "eapp_mmap", "eapp_unmap",
    "acquire_enclave", "call_enclave", "SERVER_RETURN", "EAPP_RETURN", "get_enclave_id",
    "get_caller_id", "get_report", "mem", "ints", "check", "last_error", "PAGE",
]


def _rt():
    rt = _rtmod.current
    if rt is None:
        raise TvmError("tvmrt.eapp is only usable inside an enclave (run it with tvmrt)")
    return rt


def _fail(rt, msg) -> int:
    exc = error_for(msg.get("c", -1), msg.get("why", ""))
    rt.last_error = exc
    return exc.code


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


# ---------------------------------------------------------------- memory
def eapp_mmap(vaddr: int, size: int) -> int:
    """Allocate a relay region of ``size`` bytes (rounded up to pages); returns its address.

    ``vaddr`` is a hint and is ignored (the monitor places every region).  Returns 0
    on failure (see :func:`last_error`).  The memory is zeroed.
    """
    rt = _rt()
    if not isinstance(size, int) or size <= 0:
        rt.last_error = InvalidArgument(f"bad size {size!r}")
        return 0
    m = rt.request({"op": "mmap", "size": page_round(size)})
    if m["op"] != "r":
        _fail(rt, m)
        return 0
    return m["vaddr"]


def eapp_unmap(vaddr: int, size: int) -> int:
    """Free a region this enclave owns (not one on loan to it).  0 or a negative code."""
    rt = _rt()
    m = rt.request({"op": "unmap", "vaddr": vaddr, "size": page_round(size)})
    return 0 if m["op"] == "r" else _fail(rt, m)


def mem(addr: int, size: int) -> memoryview:
    """A writable byte view of ``[addr, addr+size)``; raises NotOwned unless this
    enclave owns that range (a relay region) or maps it (its shared memory)."""
    return _rt().table.view(addr, size)


def ints(addr: int, count: int) -> memoryview:
    """``mem`` viewed as ``count`` C ints (``int *`` in the tutorial's code)."""
    return mem(addr, count * 4).cast("i")


# ---------------------------------------------------------------- calls
def acquire_enclave(name: str) -> int:
    """Handle of the live server enclave ``name``, or a negative code (-14 no such)."""
    rt = _rt()
    m = rt.request({"op": "acquire", "name": name})
    return m["handle"] if m["op"] == "r" else _fail(rt, m)


def call_enclave(handle: int, arg: CallArg, nonblocking: bool = False,
                 timeout: float | None = None) -> int:
    """Synchronous call of server ``handle`` with ``arg`` (updated in place).

    If ``arg.req_vaddr`` is set, that whole region (``req_size`` bytes) is loaned to the
    server for the call and is back at the same address when this returns, whatever
    happens.  The server's response region, if any, is this enclave's afterwards at
    ``arg.resp_vaddr`` (``resp_size`` bytes).  A busy server is waited for (FIFO, up
    to ``timeout`` seconds) unless ``nonblocking``, which returns -2 at once.
    Returns 0 or a negative error code.
    """
    rt = _rt()
    revoked = rt.table.revoke(arg.req_vaddr) if arg.req_vaddr else None
    msg = {"op": "call", "handle": handle, "a": arg.to_list()}
    if nonblocking:
        msg["nb"] = True
    if timeout is not None:
        msg["timeout"] = timeout
    m = rt.request(msg)
    if m["op"] == "r":
        arg.set_from(m["a"])
        return 0
    if revoked is not None and "g" not in m and arg.req_vaddr not in rt.table.owned:
        # refused before anything moved: the region never left us
        rt.table.restore(arg.req_vaddr, revoked)
    return _fail(rt, m)


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

    Returns a dict (``hash``, ``sig`` (64 bytes), ``nonce``, ``measurement``), or None.
    """
    rt = _rt()
    msg = {"op": "report", "nonce": nonce}
    if name is not None:
        msg["name"] = name
    m = rt.request(msg)
    if m["op"] != "r":
        _fail(rt, m)
        return None
    return m["report"]
