"""The error tree: categories a user catches, builtins, distinct codes, the wire round trip."""
from __future__ import annotations

import pickle

import pytest

from tvmrt import errors as E

CATEGORY = {
    E.ArgumentError: ValueError, E.OwnershipError: PermissionError,
    E.StateError: RuntimeError, E.PeerError: RuntimeError,
    E.ChannelError: ConnectionError, E.Timeout: TimeoutError,
    E.ResourceExhausted: OSError, E.LocalProtocolError: ValueError, E.VerifyError: ValueError,
}


def test_every_class_has_a_distinct_code_and_no_generic_minus_one_is_raised():
    codes = [c.code for c in E.ALL_ERRORS]
    assert len(codes) == len(set(codes))
    assert all(c < 0 for c in codes)
    assert E.error_for(-1).code != -1           # -1 comes back as "unknown", never generic


@pytest.mark.parametrize("cat, builtin", list(CATEGORY.items()))
def test_categories_are_builtins_too(cat, builtin):
    assert issubclass(cat, builtin)
    for cls in E.ALL_ERRORS:
        if issubclass(cls, cat):
            assert issubclass(cls, builtin), cls


def test_leaves_sit_in_their_category():
    assert issubclass(E.NotOwned, PermissionError)
    assert issubclass(E.BadSize, ValueError) and issubclass(E.UnknownHandle, LookupError)
    assert issubclass(E.MonitorGone, ConnectionError)
    assert issubclass(E.ChannelClosed, ConnectionError)
    assert issubclass(E.BadExitValue, E.EnclaveFault)
    assert issubclass(E.LocalProtocolError, E.ProtocolError)
    assert issubclass(E.RemoteProtocolError, E.ProtocolError)
    assert not issubclass(E.RemoteProtocolError, E.LocalProtocolError)


@pytest.mark.parametrize("cls", [c for c in E.ALL_ERRORS if c is not E.TvmError])
def test_code_round_trip_and_pickle(cls):
    e = E.error_for(cls.code, "why")
    assert type(e) is cls and e.reason == "why" and str(e) == f"[{cls.code}] why"
    assert type(pickle.loads(pickle.dumps(e))) is cls


def test_unknown_codes_are_remote_protocol_errors():
    for code in (-9999, 5, "x", None):
        e = E.error_for(code, "from a newer peer")
        assert isinstance(e, E.RemoteProtocolError) and repr(code) in e.reason
