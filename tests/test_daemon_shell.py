"""The daemon (the I/O shell) against real processes, over raw protocol-v2 sockets."""
from __future__ import annotations

import array
import os
import socket

import msgpack
import pytest

from conftest import eapp
from test_protocol import PAGE, _create, _raw, _recv, _request

pytestmark = pytest.mark.timeout(60)


@pytest.mark.skipif(os.geteuid() != 0, reason="reads the monitor's /proc (root's: the "
                    "monitor is non-dumpable)")
def test_segments_carry_the_monitor_name(clean):
    """Segments are created as /tvmrt.<monitor pid>.<hex> (and unlinked at once)."""
    s = _raw(clean.path)
    try:
        rep = _request(s, {"op": "shmget", "rid": 1, "size": PAGE})
        assert rep["op"] == "r"
        names = []
        fd_dir = f"/proc/{clean.pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                names.append(os.readlink(os.path.join(fd_dir, fd)))
            except OSError:
                pass
        ours = [n for n in names if n.startswith(f"/dev/shm/tvmrt.{clean.pid}.")]
        assert ours and all(n.endswith("(deleted)") for n in ours), names
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"tvmrt.{clean.pid}.")]
        assert _request(s, {"op": "shmctl", "rid": 2, "id": rep["id"]})["op"] == "r"
    finally:
        s.close()


def test_a_host_that_resizes_its_region_is_cut_off(clean):
    """The shell fstats a segment before it changes hands; a holder that truncated it
    (a SIGBUS weapon) is a violator: here the host, which is disconnected."""
    bystander = _raw(clean.path)
    s = _raw(clean.path)
    try:
        sid = _request(s, {"op": "sget", "rid": 1, "size": 2 * PAGE})["id"]
        s.sendall(msgpack.packb({"op": "sat", "rid": 2, "id": sid}))
        fds = array.array("i")
        data, anc, _f, _a = s.recvmsg(1 << 20, socket.CMSG_SPACE(4 * fds.itemsize))
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
        assert len(fds) == 1
        os.ftruncate(fds[0], PAGE)                  # shrink it under the next owner
        os.close(fds[0])
        rep = _create(s, 3, eapp("shm_rw"), "victim", stdio=False)
        assert rep["op"] == "r", rep
        s.send(msgpack.packb({"op": "run", "rid": 4, "handle": rep["handle"],
                              "mem": [sid, 0, 2 * PAGE]}))
        while True:                                  # cut off: EOF
            msg, _ = _recv(s)
            if msg is None:
                break
            assert msg.get("rid") != 4, msg
    finally:
        s.close()
    # the monitor serves on, and the bystander noticed nothing
    rep = _request(bystander, {"op": "ps", "rid": 1})
    assert rep["op"] == "r"
    bystander.close()


def test_a_busy_call_pair_does_not_starve_other_hosts(clean, host):
    """The daemon reads the answer of the peer it just sent to before going back to
    epoll (on one CPU that answer is already there); the chain is bounded, so while a
    caller and its server ping-pong as fast as they can, another host is still served."""
    import threading

    from tvmrt import SERVER
    from tvmrt.host import Host

    host.create(eapp("echo_server"), name="echo", type=SERVER)
    shm = host.shmget(PAGE)
    shm.view.cast("i")[0] = 20000                         # calls: seconds of ping-pong
    caller = host.create(eapp("stress_caller"), name="busy", shm=shm)
    result = []
    t = threading.Thread(target=lambda: result.append(caller.run(timeout=300)))
    t.start()
    try:
        other = Host.connect(clean.path, embedded=False)
        try:
            for _ in range(40):
                other.shmget(PAGE).remove()
            served_during_the_run = t.is_alive()
        finally:
            other.close()
    finally:
        t.join(300)
    assert result == [0]
    assert served_during_the_run, "the other host was only served after the run ended"
