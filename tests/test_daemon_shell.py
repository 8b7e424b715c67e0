"""The daemon (the I/O shell) against real processes, over raw protocol-v2 sockets."""
from __future__ import annotations

import array
import fcntl
import os
import socket

import msgpack
import pytest

from conftest import eapp
from test_protocol import PAGE, _raw, _request

pytestmark = pytest.mark.timeout(60)


@pytest.mark.skipif(os.geteuid() != 0, reason="reads the monitor's /proc (root's: the "
                    "monitor is non-dumpable)")
def test_segments_carry_the_monitor_name(clean):
    """Segments are memfds named tvmrt.<monitor pid>.<hex>.<random>: nothing in /dev/shm."""
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
        ours = [n for n in names if n.startswith(f"/memfd:tvmrt.{clean.pid}.")]
        assert ours and all(n.endswith("(deleted)") for n in ours), names
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"tvmrt.{clean.pid}.")]
        assert _request(s, {"op": "shmctl", "rid": 2, "id": rep["id"]})["op"] == "r"
    finally:
        s.close()


def test_a_host_cannot_resize_its_region(clean):
    """A segment is sealed at its size: a holder with its fd can neither truncate it (a
    SIGBUS weapon against the next holder, or the current one) nor grow it, nor add a
    seal of its own; the monitor serves on."""
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
        try:
            for size in (PAGE, 4 * PAGE):
                with pytest.raises(PermissionError):
                    os.ftruncate(fds[0], size)
            with pytest.raises(PermissionError):
                fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, fcntl.F_SEAL_FUTURE_WRITE
                            if hasattr(fcntl, "F_SEAL_FUTURE_WRITE") else fcntl.F_SEAL_WRITE)
            assert os.fstat(fds[0]).st_size == 2 * PAGE
        finally:
            os.close(fds[0])
        assert msgpack.unpackb(data)["op"] == "r"
        assert _request(s, {"op": "ps", "rid": 3})["op"] == "r"     # not cut off
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


def test_a_signal_for_a_peer_cut_off_earlier_in_its_batch_is_dropped(tmp_path):
    """The shell performs a Verify in place: a violation it finds goes to the core at
    once, whose answer may cut off a peer that the rest of the same batch still names
    (found by the strict model: the end of a stopped chain continues its server, which
    a Verify earlier in that batch had just found cheating and killed).  Like a Send to
    it, such a Signal is dropped: the zygote is not asked to signal a process the
    monitor has cut off.  A Signal for a peer it has not cut off still goes."""
    from tvmrt import _wire as wire
    from tvmrt.monitor.daemon import Daemon, _Epoll
    from tvmrt.monitor.effects import Close, Signal

    d = Daemon(path=str(tmp_path / "sock"))
    d.sel = _Epoll()
    d.zsock, zygote = socket.socketpair()
    peer, other = socket.socketpair()
    d.socks[5] = peer
    d.socks[6] = other
    try:
        d._apply([Close(5), Signal(5, "cont"), Signal(6, "cont")])
        zygote.setblocking(False)
        got = []
        while True:
            try:
                got.append(wire.Receiver().recv(zygote, True)[0])
            except BlockingIOError:
                break
        assert got == [{"op": "signal", "k": 6, "sig": "cont"}]
        assert 5 not in d.socks and peer.fileno() == -1
    finally:
        for s in (d.zsock, zygote, other):
            s.close()
        d.sel.ep.close()
