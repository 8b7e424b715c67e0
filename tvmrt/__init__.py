"""tvmrt: Penglai-TVM enclave IPC re-created on Linux, each enclave an OS process.

Public surface:
    tvmrt.host      Pythonic host API (Host, Enclave, SharedMemory, Schrodinger)
    tvmrt.eapp      enclave API with Penglai's names (for eapps)
    tvmrt.penglai   Penglai's host SDK names with C-style returns
    tvmrt.errors    the error hierarchy (TvmError and distinct codes)
"""
from ._callarg import CallArg, call_enclave_arg_t
from .errors import (ALL_CODES, BadReturn, BadSize, BadState, CallCycle, EnclaveFault,
                     InvalidArgument, MonitorGone, NameInUse, NoMemory, NoSuchServer,
                     NotOwned, NotPermitted, PeerDied, ProtocolError, QuotaExceeded,
                     RegionLoaned, ServerBusy, Timeout, TvmError, Unaligned, UnknownHandle,
                     UnknownId, error_for)
from .host import NORMAL, SERVER, Enclave, Host, Schrodinger, SharedMemory

__version__ = "0.1.0"

__all__ = [
    "CallArg", "call_enclave_arg_t", "Host", "Enclave", "SharedMemory", "Schrodinger",
    "NORMAL", "SERVER", "TvmError", "ALL_CODES", "error_for", "BadReturn", "BadSize",
    "BadState", "CallCycle", "EnclaveFault", "InvalidArgument", "MonitorGone", "NameInUse",
    "NoMemory", "NoSuchServer", "NotOwned", "NotPermitted", "PeerDied", "ProtocolError",
    "QuotaExceeded", "RegionLoaned", "ServerBusy", "Timeout", "Unaligned", "UnknownHandle",
    "UnknownId",
]
