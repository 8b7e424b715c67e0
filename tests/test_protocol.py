"""Bad input from peers: errors or a disconnect of that peer, never a monitor crash."""
from __future__ import annotations

import socket

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import eapp
from tvmrt import _wire as wire
from tvmrt.errors import EnclaveFault, InvalidArgument, ProtocolError
from tvmrt.host import Host

pytestmark = pytest.mark.timeout(120)


def _raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.settimeout(5)
    return s


def _alive(path):
    with Host.connect(path, embedded=False) as h:
        shm = h.shmget(0x1000)
        shm.view.cast("i")[0] = 9
        assert h.create(eapp("shm_rw"), name="alive", shm=shm).run() == 9


def test_garbage_frame_disconnects_only_that_host(clean):
    bystander = Host.connect(clean.path, embedded=False)
    region = bystander.schrodinger_get(0x1000)
    s = _raw(clean.path)
    s.send(b"\xc1\xc1\xc1")
    assert s.recv(100) == b""                 # cut off
    s.close()
    _alive(clean.path)
    assert region.view[0] == 0                # the bystander noticed nothing
    bystander.close()


@pytest.mark.parametrize("msg,code", [
    ({"op": "nope", "rid": 1}, ProtocolError.code),
    ({"op": "shmget", "rid": 1, "size": "big"}, InvalidArgument.code),
    ({"op": "shmget", "rid": 1, "size": -4096}, InvalidArgument.code),
    ({"op": "shmget", "rid": 1, "size": 1 << 70}, None),
    ({"op": "shmget", "rid": 1, "size": 0}, -12),
    ({"op": "shmget", "rid": 1, "size": 4097}, -12),
    ({"op": "shmget", "rid": 1, "size": 1 << 62}, -12),
    ({"op": "sat", "rid": 1, "id": 0x7777777}, -26),
    ({"op": "run", "rid": 1, "handle": 99}, -13),
    ({"op": "run", "rid": 1, "handle": True}, InvalidArgument.code),
    ({"op": "create", "rid": 1, "name": "x" * 40, "type": 0, "code": b""},
     InvalidArgument.code),
    ({"op": "create", "rid": 1, "name": "x", "type": 7, "code": b""}, InvalidArgument.code),
    ({"op": "create", "rid": 1, "name": "x", "type": 0, "code": "text"},
     InvalidArgument.code),
    ({"op": "create", "rid": 1, "name": "x", "type": 0, "code": b"", "shm": [1, 2]},
     InvalidArgument.code),
])
def test_bad_fields_get_error_replies(clean, msg, code):
    s = _raw(clean.path)
    try:
        s.send(msgpack.packb(msg, use_bin_type=True))
        data = s.recv(wire.MAX_FRAME)
        if code is None:       # not even encodable as a u64: msgpack refuses to pack it
            return
        reply = wire.decode(data)
        assert reply["op"] == "e" and reply["c"] == code, reply
    except OverflowError:
        assert code is None
    finally:
        s.close()
    _alive(clean.path)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.text(max_size=8), st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
        | st.binary(max_size=20), lambda c: st.lists(c, max_size=4)
        | st.dictionaries(st.text(max_size=5), c, max_size=4), max_leaves=10), max_size=6),
))
def test_fuzzed_frames_never_crash_the_monitor(monitor, payload):
    if isinstance(payload, dict):
        payload.setdefault("op", "create")
        try:
            data = msgpack.packb(payload, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return
    else:
        data = payload or b"\x00"
    s = _raw(monitor.path)
    try:
        s.send(data)
        try:
            s.recv(wire.MAX_FRAME)
        except socket.timeout:
            pytest.fail("the monitor neither answered nor disconnected")
    finally:
        s.close()
    # and it still answers
    with Host.connect(monitor.path, embedded=False) as h:
        assert h.ps()["hosts"] >= 1


def test_enclave_sending_garbage_is_cut_off(host):
    enc = host.create(eapp("garbler"), name="garbler")
    with pytest.raises(EnclaveFault):
        enc.run()
    _alive(host.path)


def test_oversized_frame_is_refused(clean):
    s = _raw(clean.path)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        try:
            s.send(b"\x80" + b"x" * (wire.MAX_FRAME + 10))
        except OSError:
            return                               # the kernel already refused it
        assert s.recv(100) == b""
    finally:
        s.close()
    _alive(clean.path)
