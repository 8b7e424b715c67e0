"""tvmrt: Penglai-TVM enclave IPC re-created on Linux, each enclave an OS process.

Public surface:
    tvmrt.host      Pythonic host API (Host, Enclave, SharedMemory, Schrodinger)
    tvmrt.eapp      enclave API with Penglai's names (for eapps)
    tvmrt.penglai   Penglai's host SDK names with C-style returns
    tvmrt.errors    the error tree (TvmError, categories, distinct codes)
    tvmrt.verify_report, report_to_json, report_from_json, measure
                    attestation reports: check one, its JSON form, an eapp's measurement

The names below are re-exported here and imported on first use, so that importing a
pure part of the package (the monitor's core, the error tree) pulls in no I/O module.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOST = ("Host", "Enclave", "SharedMemory", "Schrodinger", "NORMAL", "SERVER")
_CALLARG = ("CallArg", "call_enclave_arg_t")
_ERRORS = (
    "TvmError", "ALL_CODES", "ALL_ERRORS", "error_for",
    "ArgumentError", "InvalidArgument", "Unaligned", "BadSize", "UnknownHandle", "UnknownId",
    "NoSuchServer", "NameInUse",
    "OwnershipError", "NotOwned", "NotPermitted", "RegionLoaned",
    "StateError", "BadState", "CallCycle", "ServerBusy",
    "PeerError", "EnclaveFault", "BadExitValue", "PeerDied", "BadReturn", "IsolationViolation",
    "ChannelError", "ChannelClosed", "MonitorGone",
    "Timeout",
    "ResourceExhausted", "QuotaExceeded", "NoMemory",
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "VerifyError", "MalformedReport", "BadSignature", "WrongKey", "MeasurementMismatch",
    "NonceMismatch",
)
_ATTEST = ("measure", "verify_report", "report_to_json", "report_from_json")

_WHERE = {**{n: ".host" for n in _HOST}, **{n: "._callarg" for n in _CALLARG},
          **{n: ".errors" for n in _ERRORS}, **{n: "._attest" for n in _ATTEST}}

__all__ = list(_CALLARG + _HOST + _ERRORS + _ATTEST)


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'tvmrt' has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
