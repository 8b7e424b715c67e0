"""Bad input from peers: errors or a disconnect of that peer, never a monitor crash.

These tests speak protocol v2 (docs/protocol.md) to a real daemon directly: msgpack maps over a
raw ``SOCK_SEQPACKET`` socket, fds by ``SCM_RIGHTS``, no client library in between.
"""
from __future__ import annotations

import array
import os
import signal
import socket
import subprocess
import sys
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import eapp
from tvmrt.errors import (
    BadSize,
    EnclaveFault,
    InvalidArgument,
    LocalProtocolError,
    UnknownHandle,
    UnknownId,
)

pytestmark = pytest.mark.timeout(120)

MAX_FRAME = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def _raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.settimeout(10)
    return s


def _send(s, msg, fds=()):
    data = msgpack.packb(msg, use_bin_type=True)
    if fds:
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        s.send(data)


def _recv(s):
    """One frame: (msg, fds).  Received fds are closed at once (we map nothing)."""
    fds = array.array("i")
    data, anc, _flags, _ = s.recvmsg(MAX_FRAME, socket.CMSG_SPACE(16 * fds.itemsize))
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
    for fd in fds:
        os.close(fd)
    if not data:
        return None, []
    return msgpack.unpackb(data, raw=False), list(fds)


def _request(s, msg, fds=()):
    """Send a request; return its reply (skipping unsolicited messages)."""
    _send(s, msg, fds)
    while True:
        reply, _ = _recv(s)
        assert reply is not None, f"disconnected after {msg!r:.100}"
        if reply.get("rid") == msg.get("rid") or "rid" not in msg:
            return reply


def _alive(path):
    """The monitor still serves: a fresh host gets shared memory and a ps."""
    s = _raw(path)
    try:
        rep = _request(s, {"op": "shmget", "rid": 1, "size": PAGE})
        assert rep["op"] == "r" and rep["rid"] == 1 and rep["size"] == PAGE, rep
        rep = _request(s, {"op": "ps", "rid": 2})
        assert rep["op"] == "r" and rep["hosts"] >= 1, rep
    finally:
        s.close()


def test_garbage_frame_disconnects_only_that_host(clean):
    bystander = _raw(clean.path)
    rep = _request(bystander, {"op": "sget", "rid": 7, "size": PAGE})
    assert rep["op"] == "r"
    s = _raw(clean.path)
    s.send(b"\xc1\xc1\xc1")
    assert s.recv(100) == b""                 # cut off
    s.close()
    _alive(clean.path)
    # the bystander noticed nothing: its region is still there
    rep = _request(bystander, {"op": "sat", "rid": 8, "id": rep["id"]})
    assert rep["op"] == "r" and rep["g"][0][3:] == [1, "relay"], rep
    bystander.close()


@pytest.mark.parametrize("msg,code", [
    ({"op": "nope", "rid": 1}, LocalProtocolError.code),
    ({"op": "shmget", "rid": 1, "size": "big"}, InvalidArgument.code),
    ({"op": "shmget", "rid": 1, "size": -4096}, InvalidArgument.code),
    ({"op": "shmget", "rid": 1, "size": 1 << 70}, None),
    ({"op": "shmget", "rid": 1, "size": 0}, BadSize.code),
    ({"op": "shmget", "rid": 1, "size": 4097}, BadSize.code),
    ({"op": "shmget", "rid": 1, "size": 1 << 62}, BadSize.code),
    ({"op": "sat", "rid": 1, "id": 0x7777777}, UnknownId.code),
    ({"op": "run", "rid": 1, "handle": 99}, UnknownHandle.code),
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
        try:
            data = msgpack.packb(msg, use_bin_type=True)
        except OverflowError:
            assert code is None      # not even encodable as a u64: msgpack refuses it
            return
        s.send(data)
        reply, _ = _recv(s)
        assert reply["op"] == "e" and reply["c"] == code and reply["rid"] == 1, reply
    finally:
        s.close()
    _alive(clean.path)


@pytest.mark.parametrize("rid", [None, 0, -1, "1", 1.0, True, [1]])
def test_request_without_a_valid_rid(clean, rid):
    s = _raw(clean.path)
    try:
        msg = {"op": "shmget", "size": PAGE}
        if rid is not None:
            msg["rid"] = rid
        _send(s, msg)
        reply, _ = _recv(s)
        assert reply["op"] == "e" and reply["c"] == LocalProtocolError.code, reply
        assert "rid" not in reply
    finally:
        s.close()
    _alive(clean.path)


def test_many_requests_in_flight_are_answered_by_rid(clean):
    s = _raw(clean.path)
    try:
        for rid in range(1, 21):
            _send(s, {"op": "shmget", "rid": rid, "size": PAGE * (1 + rid % 3)})
        seen = {}
        for _ in range(20):
            reply, _ = _recv(s)
            assert reply["op"] == "r"
            seen[reply["rid"]] = reply["size"]
        assert seen == {rid: PAGE * (1 + rid % 3) for rid in range(1, 21)}
    finally:
        s.close()


def test_detach_names_the_segment_and_ctl_needs_dt(clean):
    s = _raw(clean.path)
    try:
        rep = _request(s, {"op": "sget", "rid": 1, "size": PAGE})
        sid = rep["id"]
        rep = _request(s, {"op": "sat", "rid": 2, "id": sid})
        seg = rep["g"][0][0]
        assert _request(s, {"op": "sat", "rid": 3, "id": sid})["op"] == "e"
        assert _request(s, {"op": "sctl", "rid": 4, "id": sid})["op"] == "e"
        rep = _request(s, {"op": "sdt", "rid": 5, "id": sid})
        assert rep["op"] == "r" and seg in rep["d"]
        assert _request(s, {"op": "sctl", "rid": 6, "id": sid})["op"] == "r"
    finally:
        s.close()


def _create(s, rid, path, name, **kw):
    with open(path, "rb") as f:
        code = f.read()
    fds = [os.open(os.devnull, os.O_WRONLY)] * 2 if kw.pop("stdio", True) else []
    try:
        return _request(s, {"op": "create", "rid": rid, "name": name, "type": 0,
                            "code": code, "path": path, **kw}, fds)
    finally:
        if fds:
            os.close(fds[0])


def test_create_answers_at_ready_and_compile_errors_are_create_errors(clean, tmp_path):
    s = _raw(clean.path)
    try:
        bad = tmp_path / "bad.py"
        bad.write_text("def main(args:\n    return 1\n")
        rep = _create(s, 1, str(bad), "bad")
        assert rep["op"] == "e" and rep["c"] == EnclaveFault.code and rep["rid"] == 1, rep
        assert "SyntaxError" in rep["why"], rep
        rep = _create(s, 2, eapp("shm_rw"), "good", stdio=False)
        assert rep["op"] == "r" and rep["rid"] == 2 and len(rep["measurement"]) == 32, rep
        assert _request(s, {"op": "destroy", "rid": 3, "handle": rep["handle"]})["op"] == "r"
        rep2 = _request(s, {"op": "run", "rid": 4, "handle": rep["handle"]})
        assert rep2["op"] == "e" and rep2["c"] == UnknownHandle.code
        assert "destroyed" in rep2["why"]
    finally:
        s.close()


def test_enclave_sending_garbage_is_cut_off(clean):
    s = _raw(clean.path)
    try:
        rep = _create(s, 1, eapp("garbler"), "garbler")
        assert rep["op"] == "r", rep
        rep = _request(s, {"op": "run", "rid": 2, "handle": rep["handle"]})
        assert rep["op"] == "e" and rep["c"] == EnclaveFault.code, rep
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
            s.recv(MAX_FRAME)
        except TimeoutError:
            pytest.fail("the monitor neither answered nor disconnected")
    finally:
        s.close()
    _alive(monitor.path)


def test_oversized_frame_is_refused(clean):
    s = _raw(clean.path)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        try:
            s.send(b"\x80" + b"x" * (MAX_FRAME + 10))
        except OSError:
            return                               # the kernel already refused it
        assert s.recv(100) == b""
    finally:
        s.close()
    _alive(clean.path)


def test_sigterm_right_after_start_stops_the_monitor(tmp_path):
    """A stop signal that arrives while the daemon sets up is not lost."""
    sock = str(tmp_path / "d" / "m.sock")
    boot = "import sys; from tvmrt.cli import main; sys.exit(main())"
    for delay in (0.0, 0.05, 0.2):
        p = subprocess.Popen([sys.executable, "-c", boot, "monitor", "--socket", sock],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            line = p.stdout.readline()
            assert b"listening" in line, line
            time.sleep(delay)
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=10) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
        assert not os.path.exists(sock)
