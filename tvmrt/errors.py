"""One error tree for tvmrt.

Every failure is a :class:`TvmError` subclass with a distinct negative integer
``code``.  The Pythonic APIs (:mod:`tvmrt.host`, the raising helpers of
:mod:`tvmrt.eapp`) raise them; the Penglai-named layer (:mod:`tvmrt.penglai`,
the C-style functions of :mod:`tvmrt.eapp`) returns the negative code instead.
The monitor sends codes on the wire; :func:`error_for` turns a code and a reason
back into the right exception.

The tree, by what a user catches (each category is also the matching builtin)::

    TvmError                                  -1   (abstract: never raised itself)
    ├── ArgumentError        ValueError       -40  bad arguments
    │   ├── InvalidArgument                   -29  wrong type or value
    │   ├── Unaligned                         -11  address/size not page aligned
    │   ├── BadSize                           -12  size zero, too big, not whole, overflows
    │   ├── UnknownHandle    LookupError      -13  no enclave answers to this handle
    │   ├── UnknownId        LookupError      -26  no region has this id
    │   ├── NoSuchServer     LookupError      -14  no server has this name
    │   └── NameInUse                         -19  a server has this name already
    ├── OwnershipError       PermissionError  -41  ownership
    │   ├── NotOwned                          -10  the caller does not own the range
    │   ├── NotPermitted                      -28  the object belongs to someone else
    │   └── RegionLoaned                      -22  the region is on loan right now
    ├── StateError           RuntimeError     -42  not allowed in the current state
    │   ├── BadState                          -20  (e.g. run twice, attach twice)
    │   ├── CallCycle                         -15  the server is on the caller's chain
    │   ├── ServerBusy                        -2   Penglai's -ESERVERBUSY (non-blocking)
    │   ├── NotStopped                        -60  resume of an enclave that is not stopped
    │   └── Stopped                           -61  the enclave is stopped (stop twice, run)
    ├── PeerError            RuntimeError     -43  the peer failed
    │   ├── EnclaveFault                      -17  the enclave raised, exited or was killed
    │   │   └── BadExitValue                  -31  main returned a non-integer / out of range
    │   ├── PeerDied                          -16  the server died during the call
    │   ├── BadReturn                         -25  the server returned a bad response
    │   └── IsolationViolation                -33  a peer tampered with a segment
    ├── ChannelError         ConnectionError  -44  the channel is closed or broken
    │   ├── ChannelClosed                     -30  closed by this process
    │   └── MonitorGone                       -27  the monitor is unreachable or went away
    ├── Timeout              TimeoutError     -21  a deadline passed
    ├── ResourceExhausted    OSError          -45  out of a resource
    │   ├── QuotaExceeded                     -18  a per-host quota would be exceeded
    │   └── NoMemory                          -23  no memory / address space / segments
    ├── ProtocolError                         -46  a malformed or unexpected message
    │   ├── LocalProtocolError  ValueError    -24  you sent garbage (refused here or there)
    │   └── RemoteProtocolError               -32  the other side sent garbage
    └── VerifyError          ValueError       -50  an attestation report does not verify
        ├── MalformedReport                   -51  not a report: a field missing or wrong
        ├── BadSignature                      -52  the signature does not cover these fields
        ├── WrongKey                          -53  signed by another key than the expected
        ├── MeasurementMismatch               -54  another enclave than the expected one
        └── NonceMismatch                     -55  the report answers another nonce

Penglai's own codes keep their meaning where they exist (-2 for a busy server);
no failure is reported as a generic -1.
"""
from __future__ import annotations


class TvmError(Exception):
    """Base class.  ``code`` is a distinct negative integer, ``reason`` a text."""

    code = -1

    def __init__(self, reason: str = "", code: int | None = None):
        if code is not None:
            self.code = code
        doc = self.__class__.__doc__ or "tvmrt error"
        self.reason = reason or doc.strip().splitlines()[0]
        super().__init__(f"[{self.code}] {self.reason}")

    def __reduce__(self):
        return (error_for, (self.code, self.reason))


# ---------------------------------------------------------------- bad arguments
class ArgumentError(TvmError, ValueError):
    """a bad argument"""
    code = -40


class InvalidArgument(ArgumentError):
    """an argument has the wrong type or value"""
    code = -29


class Unaligned(ArgumentError):
    """address or size is not page aligned"""
    code = -11


class BadSize(ArgumentError):
    """size is zero, too large, not a page multiple or overflows"""
    code = -12


class UnknownHandle(ArgumentError, LookupError):
    """no live enclave answers to this handle"""
    code = -13


class UnknownId(ArgumentError, LookupError):
    """no shared-memory or schrodinger region has this id"""
    code = -26


class NoSuchServer(ArgumentError, LookupError):
    """no server enclave is registered under this name"""
    code = -14


class NameInUse(ArgumentError):
    """a server with this name already exists"""
    code = -19


# ---------------------------------------------------------------- ownership
class OwnershipError(TvmError, PermissionError):
    """an ownership rule refused the operation"""
    code = -41


class NotOwned(OwnershipError):
    """the caller does not own this address range"""
    code = -10


class NotPermitted(OwnershipError):
    """the peer may not act on this object"""
    code = -28


class RegionLoaned(OwnershipError):
    """the region is on loan and cannot be freed or given away now"""
    code = -22


# ---------------------------------------------------------------- state
class StateError(TvmError, RuntimeError):
    """the operation is not allowed in the current state"""
    code = -42


class BadState(StateError):
    """the operation is not allowed in the current state"""
    code = -20


class CallCycle(StateError):
    """the server is already on the caller's call chain"""
    code = -15


class NotStopped(StateError):
    """resume of an enclave that is not stopped (or stopped by another enclave's stop)"""
    code = -60


class Stopped(StateError):
    """the enclave is stopped: not stopped again, not run until resumed"""
    code = -61


class ServerBusy(StateError):
    """the server is serving another call (non-blocking call refused)"""
    code = -2


# ---------------------------------------------------------------- the peer failed
class PeerError(TvmError, RuntimeError):
    """the peer enclave failed"""
    code = -43


class EnclaveFault(PeerError):
    """the enclave raised, exited or was killed"""
    code = -17


class BadExitValue(EnclaveFault):
    """main returned something that is not an integer exit value"""
    code = -31


class PeerDied(PeerError):
    """the peer enclave died during the operation"""
    code = -16


class BadReturn(PeerError):
    """the server returned a response it may not give"""
    code = -25


class IsolationViolation(PeerError):
    """a peer tampered with a segment it held, or (strict mode) still mapped a region
    it had given up; it was killed"""
    code = -33


# ---------------------------------------------------------------- the channel
class ChannelError(TvmError, ConnectionError):
    """the channel to the monitor is closed or broken"""
    code = -44


class ChannelClosed(ChannelError):
    """the connection was closed by this process"""
    code = -30


class MonitorGone(ChannelError):
    """the monitor is not reachable or went away"""
    code = -27


# ---------------------------------------------------------------- deadlines
class Timeout(TvmError, TimeoutError):
    """a deadline passed"""
    code = -21


# ---------------------------------------------------------------- resources
class ResourceExhausted(TvmError, OSError):
    """a resource is exhausted"""
    code = -45


class QuotaExceeded(ResourceExhausted):
    """a per-host quota on enclaves, regions or bytes would be exceeded"""
    code = -18


class NoMemory(ResourceExhausted):
    """the monitor could not create shared memory or find address space"""
    code = -23


# ---------------------------------------------------------------- protocol
class ProtocolError(TvmError):
    """a malformed or unexpected message"""
    code = -46


class LocalProtocolError(ProtocolError, ValueError):
    """this side sent a malformed or unexpected message"""
    code = -24


class RemoteProtocolError(ProtocolError):
    """the other side sent a malformed or unexpected message"""
    code = -32


# ---------------------------------------------------------------- attestation
class VerifyError(TvmError, ValueError):
    """an attestation report does not verify"""
    code = -50


class MalformedReport(VerifyError):
    """not an attestation report: a field is missing or has the wrong type or size"""
    code = -51


class BadSignature(VerifyError):
    """the report's signature does not match its signed fields and public key"""
    code = -52


class WrongKey(VerifyError):
    """the report is signed by another key than the one expected"""
    code = -53


class MeasurementMismatch(VerifyError):
    """the report is of another enclave (measurement) than the one expected"""
    code = -54


class NonceMismatch(VerifyError):
    """the report answers another nonce than the one expected"""
    code = -55


def _walk(cls):
    yield cls
    for sub in cls.__subclasses__():
        yield from _walk(sub)


_BY_CODE: dict[int, type[TvmError]] = {}
for _cls in _walk(TvmError):
    if _cls.__module__ == __name__:
        assert _cls.code not in _BY_CODE, f"duplicate code {_cls.code}"
        _BY_CODE[_cls.code] = _cls
del _cls

#: every distinct code, for tests and documentation
ALL_CODES = tuple(sorted(_BY_CODE))

#: every class of the tree
ALL_ERRORS = tuple(_BY_CODE[c] for c in ALL_CODES)


def error_for(code: object, reason: str = "") -> TvmError:
    """The exception instance for ``code`` with ``reason``.

    An unknown code (a newer or broken peer) gives a :class:`RemoteProtocolError`
    that names it, never a bare :class:`TvmError`.
    """
    cls = _BY_CODE.get(code) if type(code) is int else None
    if cls is None or cls is TvmError:
        return RemoteProtocolError(f"unknown error code {code!r}: {reason}")
    return cls(reason)


__all__ = ["error_for", "ALL_CODES", "ALL_ERRORS"] + [c.__name__ for c in ALL_ERRORS]
