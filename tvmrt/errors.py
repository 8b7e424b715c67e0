"""One error hierarchy for tvmrt.

Every failure has a distinct negative integer ``code``.  The Pythonic APIs
(:mod:`tvmrt.host`, the raising helpers of :mod:`tvmrt.eapp`) raise a subclass
of :class:`TvmError`; the Penglai-named layer (:mod:`tvmrt.penglai`, the C-style
functions of :mod:`tvmrt.eapp`) returns ``-code`` style negative integers
instead.  The monitor sends codes on the wire; :func:`error_for` turns a code
(and a reason text) back into the right exception class.

Codes -1 and -2 keep Penglai's meaning (generic failure, ``-ESERVERBUSY``);
everything else is new and unique so that a test can tell failures apart.
"""
from __future__ import annotations


class TvmError(Exception):
    """Base class.  ``code`` is a distinct negative integer, ``reason`` a text."""

    code = -1

    def __init__(self, reason: str = "", code: int | None = None):
        if code is not None:
            self.code = code
        self.reason = reason or self.__class__.__doc__.strip().splitlines()[0]
        super().__init__(f"[{self.code}] {self.reason}")


class ServerBusy(TvmError):
    """the server is serving another call (non-blocking call refused)"""
    code = -2


class NotOwned(TvmError):
    """the caller does not own this address range"""
    code = -10


class Unaligned(TvmError):
    """address or size is not page aligned"""
    code = -11


class BadSize(TvmError):
    """size is zero, too large, not a page multiple or overflows"""
    code = -12


class UnknownHandle(TvmError):
    """no live enclave answers to this handle"""
    code = -13


class NoSuchServer(TvmError):
    """no server enclave is registered under this name"""
    code = -14


class CallCycle(TvmError):
    """the server is already on the caller's call chain"""
    code = -15


class PeerDied(TvmError):
    """the peer enclave died during the operation"""
    code = -16


class EnclaveFault(TvmError):
    """the enclave raised, exited or was killed"""
    code = -17


class QuotaExceeded(TvmError):
    """a per-peer quota on regions or bytes would be exceeded"""
    code = -18


class NameInUse(TvmError):
    """a server with this name already exists"""
    code = -19


class BadState(TvmError):
    """the operation is not allowed in the current state"""
    code = -20


class Timeout(TvmError):
    """a deadline passed"""
    code = -21


class RegionLoaned(TvmError):
    """the region is on loan and cannot be freed or given away now"""
    code = -22


class NoMemory(TvmError):
    """the monitor could not create shared memory"""
    code = -23


class ProtocolError(TvmError):
    """malformed or unexpected message"""
    code = -24


class BadReturn(TvmError):
    """the server returned a response region it does not own"""
    code = -25


class UnknownId(TvmError):
    """no shared-memory or schrodinger region has this id"""
    code = -26


class MonitorGone(TvmError):
    """the monitor is not reachable or went away"""
    code = -27


class NotPermitted(TvmError):
    """the peer may not act on this object"""
    code = -28


class InvalidArgument(TvmError):
    """an argument has the wrong type or value"""
    code = -29


_BY_CODE = {cls.code: cls for cls in (
    TvmError, ServerBusy, NotOwned, Unaligned, BadSize, UnknownHandle, NoSuchServer,
    CallCycle, PeerDied, EnclaveFault, QuotaExceeded, NameInUse, BadState, Timeout,
    RegionLoaned, NoMemory, ProtocolError, BadReturn, UnknownId, MonitorGone,
    NotPermitted, InvalidArgument)}

#: every distinct code, for tests and documentation
ALL_CODES = tuple(sorted(_BY_CODE))


def error_for(code: int, reason: str = "") -> TvmError:
    """Return the exception instance for ``code`` (generic TvmError if unknown)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return TvmError(reason, code=code)
    return cls(reason)
