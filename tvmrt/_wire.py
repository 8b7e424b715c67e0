"""Wire protocol: one msgpack map per SOCK_SEQPACKET message, fds via SCM_RIGHTS.

Every message is a map with a short string key ``"op"``.  Decoding is strict:
no ext types, bounded lengths, string map keys, a frame-size limit.  Schema
checks of individual fields are done by the receiver (the monitor checks
every field of every peer message; see :mod:`tvmrt.monitor.schema`).
"""
from __future__ import annotations

import array
import mmap
import os
import socket
import threading
from typing import NoReturn

import msgpack

from .errors import (
    InvalidArgument,
    MonitorGone,
    RemoteProtocolError as ProtocolError,
    ResourceExhausted,
)

#: largest frame accepted (an eapp's source travels in CREATE)
MAX_FRAME = 2 * 1024 * 1024
#: most fds one message may carry
MAX_FDS = 8
#: socket buffer asked for so that a MAX_FRAME message fits a SEQPACKET send
SOCK_BUF = 4 * 1024 * 1024

U64 = (1 << 64) - 1

_tls = threading.local()   # per-thread Packer and receive buffer

_ANC = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def encode(msg: dict) -> bytes:
    """Pack one message (with this thread's reusable Packer: half the cost of packb)."""
    p = getattr(_tls, "packer", None)
    if p is None:
        p = _tls.packer = msgpack.Packer(use_bin_type=True)
    try:
        return p.pack(msg)
    except (OverflowError, TypeError, ValueError) as exc:
        # a value msgpack cannot carry (an int beyond 64 bits, an object): the caller's
        # argument, refused before anything was sent
        _tls.packer = None
        raise InvalidArgument(f"cannot send {msg.get('op')!r}: {exc}") from None
    except BaseException:
        # a failed pack may leave the packer's buffer dirty: start afresh next time
        _tls.packer = None
        raise


def decode(data: bytes | memoryview) -> dict:
    """Unpack one message; raise :class:`ProtocolError` unless it is a map with a str op."""
    if len(data) > MAX_FRAME:
        raise ProtocolError("frame too large")
    try:
        # msgpack >= 1.0 defaults: raw=False, strict_map_key=True, and string/bin/array
        # lengths bounded by the frame's own size; ext types (incl. timestamps) refused.
        msg = msgpack.unpackb(data, max_ext_len=0, max_array_len=4096, max_map_len=256)
    except Exception as exc:  # msgpack raises many types for bad input
        raise ProtocolError(f"malformed frame: {exc.__class__.__name__}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("frame is not a map with a string 'op'")
    return msg


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected AF_UNIX SOCK_SEQPACKET pair, close-on-exec, with large buffers."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        tune(s)
    return a, b


def tune(sock: socket.socket) -> None:
    """Raise the send buffer so that a MAX_FRAME message can be sent."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    except OSError:
        pass


def send(sock: socket.socket, msg: dict, fds=()) -> None:
    """Send one message (and fds).  Raises :class:`MonitorGone` if the peer is gone."""
    data = encode(msg)
    try:
        if fds:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            sock.send(data)
    except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError) as exc:
        raise MonitorGone(f"peer closed the connection ({exc.__class__.__name__})") from None


class Receiver:
    """Receives whole frames into one reusable buffer (MAX_FRAME + 1 bytes, allocated
    once): ``sock.recv(MAX_FRAME + 1)`` would make glibc mmap a fresh 2 MiB block,
    mremap it down and munmap it for every message (3 syscalls + a page fault each).

    One receiver serves one reader at a time: a channel's holder of the read turn, the
    daemon's loop, or (through :func:`recv`) one thread.
    """

    __slots__ = ("_buf", "_bufs")

    def __init__(self) -> None:
        # Anonymous private pages, not a bytearray: bytearray(n) zero-fills, which
        # faults in all 513 pages at once -- 2.4 ms of a new enclave's 8.6 ms start
        # (docs/design.md, "Creating an enclave").  A mapping's pages are faulted in
        # only when a frame reaches them; private, so that a fork (the zygote's
        # enclaves) gets a copy-on-write copy and never sees the parent's frames.
        self._buf = memoryview(mmap.mmap(-1, MAX_FRAME + 1,
                                         flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        self._bufs = [self._buf]

    def recv(self, sock: socket.socket, want_fds: bool = False, flags: int = 0):
        """One message from ``sock``: ``(msg, fds)``, fds a list of ints owned by the
        caller (always empty unless ``want_fds``).

        Raises :class:`MonitorGone` on EOF, :class:`RemoteProtocolError` on a malformed
        frame (any fds that came with it are closed first), ``BlockingIOError`` when
        nothing is waiting on a non-blocking socket or with ``flags`` MSG_DONTWAIT.

        A peer that closed while *it* had unread data makes the kernel report
        ``ECONNRESET`` once, before the frames the peer sent are delivered: those are
        its last words (a final ``exit`` or ``fault``), so reading goes on until real EOF.
        """
        buf = self._buf
        for _ in range(_RESET_RETRIES):
            try:
                if want_fds:
                    n, anc, _f, _a = sock.recvmsg_into(self._bufs, _ANC, flags)
                    if anc:
                        return self._with_fds(n, anc)
                else:
                    n = sock.recv_into(buf, 0, flags)
                break
            except ConnectionResetError:
                continue
            except BrokenPipeError:
                n = 0
                break
        else:
            n = 0
        if not n:
            raise MonitorGone("connection closed")
        return decode(buf[:n]), []

    def recv_checked(self, sock: socket.socket, flags: int = 0):
        """:meth:`recv` with fds, raising :class:`FdsLost` (with the message) when the
        kernel could not hand over every fd (``MSG_CTRUNC``: this process is out of
        fds), so that a server can refuse that one request.  Not on the call path: a
        check there measured 20 % slower calls (code layout); a client finds a lost fd
        where it needs it, in :meth:`RegionTable.apply`."""
        while True:
            try:
                n, anc, mflags, _a = sock.recvmsg_into(self._bufs, _ANC, flags)
                break
            except ConnectionResetError:
                return self.recv(sock, True, flags)     # the reset path reads on
        if mflags & _CTRUNC:
            self._fds_lost(n, anc)
        if anc:
            return self._with_fds(n, anc)
        if not n:
            raise MonitorGone("connection closed")
        return decode(self._buf[:n]), []

    def _fds_lost(self, n: int, anc) -> NoReturn:
        """The kernel could not hand over every fd of the message (this process is
        out of fds: ``MSG_CTRUNC``): raise :class:`FdsLost` carrying the message, so
        that a server can refuse that one request."""
        close_all(fds_from_ancillary(anc))
        try:
            msg = decode(self._buf[:n]) if n else None
        except ProtocolError:
            msg = None
        raise FdsLost("a file descriptor sent with a message could not be received: "
                      "out of file descriptors", msg)

    def _with_fds(self, n: int, anc) -> tuple[dict, list[int]]:
        fds = fds_from_ancillary(anc)
        try:
            if not n:
                raise MonitorGone("connection closed")
            return decode(self._buf[:n]), fds
        except BaseException:
            close_all(fds)
            raise


def recv(sock: socket.socket, want_fds: bool = False, nonblock: bool = False):
    """Receive one message with this thread's :class:`Receiver` (see its ``recv``)."""
    rx = getattr(_tls, "rx", None)
    if rx is None:
        rx = _tls.rx = Receiver()
    flags = _DONTWAIT if nonblock else 0
    return rx.recv_checked(sock, flags) if want_fds else rx.recv(sock, False, flags)


_DONTWAIT = socket.MSG_DONTWAIT
_CTRUNC = socket.MSG_CTRUNC


class FdsLost(ResourceExhausted):
    """A message arrived without (all of) its fds: the receiver is out of fds.
    ``msg`` is the message itself (None if it did not decode)."""

    def __init__(self, reason: str, msg: dict | None = None):
        super().__init__(reason)
        self.msg = msg


#: ECONNRESET is reported once per reset; a few retries cover any kernel's variant
_RESET_RETRIES = 4


def fds_from_ancillary(anc) -> list[int]:
    """Extract SCM_RIGHTS fds from recvmsg ancillary data."""
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - (len(payload) % a.itemsize)])
            fds.extend(a)
    return fds


def close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
