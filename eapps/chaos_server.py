"""Server of ``tvmrt stress`` (and the chaos tests), at one level of a chain three deep.

Its own shared memory holds ints ``[level, tag]`` (none: level 1 of tag 0).  Level 1 is
``chaos`` (``chaos-<tag>``), levels 2 and 3 are that name with ``.2`` and ``.3``.

A call loans a region and carries ``req_arg`` = ``crc << 32 | deep << 24 | i`` (24 bits
of ``i``): ``crc`` is the CRC-32 of the whole region as its sender left it, and every page
starts with the byte ``(i + level - 1) & 0xFF``.  The server checks both, writes
``(i + level) & 0xFF`` into every page, and -- with ``deep``, below level 3 -- passes the
region on to the next level, then checks that the region came back with the CRC that
level reported.  It returns ``resp_val`` = ``crc << 32 | hops``: the CRC of the region as
it leaves it and how many servers changed it, or ``hops`` = :data:`GONE` when a server
further down was gone (killed: the caller counts "server gone"), or 0 when what it was
sent was wrong (the caller counts "corrupted").
"""
import zlib

from tvmrt.eapp import *
from tvmrt.errors import NotOwned

DEEP = 1 << 24
GONE = 0xFE
LEVELS = 3
_handles = {}          # server name -> handle, kept across calls (a server lives on)


def _name(tag, level):
    base = "chaos" if tag == 0 else f"chaos-{tag}"
    return base if level == 1 else f"{base}.{level}"


def _call_down(tag, level, arg):
    """Call the next level; 0 or a negative code (the handle is dropped then)."""
    name = _name(tag, level + 1)
    h = _handles.get(name, -1)
    if h < 0:
        h = acquire_enclave(name)
        if h < 0:
            return h
        _handles[name] = h
    rc = call_enclave(h, arg)
    if rc != 0:
        _handles.pop(name, None)
    return rc


def main(args):
    a, vaddr, size = args[10], args[11], args[12]
    level, tag = (ints(args[13], 2).tolist() if args[13] else (1, 0))
    if not vaddr:
        return CallArg(resp_val=0)
    region = mem(vaddr, size)
    i = a & 0xFFFFFF
    pages = region[::PAGE]
    first = (i + level - 1) & 0xFF
    if zlib.crc32(region) != a >> 32 or bytes(pages).count(first) != len(pages):
        return CallArg(resp_val=0)
    pages[:] = bytes(((first + 1) & 0xFF,)) * len(pages)
    crc, hops = zlib.crc32(region), 1
    if a & DEEP and level < LEVELS:
        arg = CallArg(req_arg=crc << 32 | (a & 0xFFFFFFFF), req_vaddr=vaddr, req_size=size)
        if _call_down(tag, level, arg) != 0:
            return CallArg(resp_val=GONE)
        down = arg.resp_val & 0xFF
        if down == GONE or down == 0:
            return CallArg(resp_val=down)
        crc = arg.resp_val >> 32
        try:
            if zlib.crc32(mem(vaddr, size)) != crc:
                return CallArg(resp_val=0)
        except NotOwned:
            return CallArg(resp_val=0)           # it did not come back to us
        hops += down
    return CallArg(resp_val=crc << 32 | hops)
