"""The monitor's boundary: it changes nothing it did not create, refuses what it cannot use
in one line, and survives running out of file descriptors (issue 6)."""
from __future__ import annotations

import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import msgpack
import pytest

from conftest import eapp, wait_until
from test_protocol import PAGE, _create, _raw, _request
from tvmrt import _wire as wire, errors as E
from tvmrt.host import Host

pytestmark = pytest.mark.timeout(60)


def _start(sock, cwd=None, nofile=None, extra=()):
    """A foreground ``tvmrt monitor --socket sock``; returns the process once it listens
    (or has exited)."""
    def limit():
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    p = subprocess.Popen([sys.executable, "-m", "tvmrt", "monitor", "--socket", sock, *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                         preexec_fn=limit)
    line = p.stdout.readline()
    if "listening" not in line:
        p.wait(20)
    return p


def _stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


def _refused(sock, *, cwd=None):
    """Run a monitor that must refuse ``sock``: returns its one stderr line."""
    r = subprocess.run([sys.executable, "-m", "tvmrt", "monitor", "--socket", sock],
                       capture_output=True, text=True, timeout=30, cwd=cwd)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("tvmrt monitor: ")
    return lines[0]


@pytest.mark.parametrize("relative", [False, True])
def test_an_existing_directory_keeps_its_mode(tmp_path, relative):
    """A 1777 directory (like /tmp) stays 1777: the monitor never chmods what it did not
    make; it removes only its own socket."""
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    (d / "someone-elses").write_text("keep me")
    sock = "m.sock" if relative else str(d / "m.sock")
    p = _start(sock, cwd=str(d))
    try:
        assert p.poll() is None, p.stderr.read()
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o1777
        with Host.connect(str(d / "m.sock"), embedded=False) as h:
            h.shmget(PAGE).remove()
    finally:
        assert _stop(p) == 0
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o1777
    assert sorted(os.listdir(d)) == ["someone-elses"]


def test_a_directory_it_creates_is_private_and_removed(tmp_path):
    sock = str(tmp_path / "new" / "deeper" / "m.sock")
    p = _start(sock)
    try:
        assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    finally:
        assert _stop(p) == 0
    assert not os.path.exists(os.path.dirname(sock))


def test_paths_it_cannot_use_are_refused_in_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("data")
    assert "is a regular file" in _refused(str(f))
    assert f.read_text() == "data"                          # not deleted
    (tmp_path / "dir.sock").mkdir()
    assert "is a directory" in _refused(str(tmp_path / "dir.sock"))
    assert "not a directory" in _refused(str(f / "m.sock"))
    long_path = str(tmp_path / ("x" * 120) / "m.sock")
    assert "too long" in _refused(long_path)
    os.symlink(f, tmp_path / "link.sock")
    assert "symbolic link" in _refused(str(tmp_path / "link.sock"))
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)                                   # writable by all, not sticky
    assert "not sticky" in _refused(str(loose / "m.sock"))
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o777


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_directory_is_refused_in_one_line(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o500)
    try:
        assert "permission denied" in _refused(str(d / "m.sock"))
    finally:
        os.chmod(d, 0o700)


def test_a_symlinked_directory_of_the_user_is_fine(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "via")
    sock = str(tmp_path / "via" / "m.sock")
    p = _start(sock)
    try:
        assert p.poll() is None, p.stderr.read()
        with Host.connect(sock, embedded=False) as h:
            h.shmget(PAGE).remove()
    finally:
        assert _stop(p) == 0
    assert os.path.isdir(real) and not os.listdir(real)


def test_a_stale_socket_of_its_own_is_reused(tmp_path):
    sock = str(tmp_path / "m.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(sock)
    s.close()                                               # stale: nobody listens
    p = _start(sock)
    try:
        assert p.poll() is None, p.stderr.read()
        assert "already listening" in _refused(sock)        # a live one is refused
    finally:
        assert _stop(p) == 0


def test_out_of_fds_refuses_one_client_and_serves_the_rest(tmp_path):
    """With a small fd limit: a connection the monitor cannot accept gets a 'bye' with
    ResourceExhausted (not a crash), a create it cannot give a socket pair is refused
    with ResourceExhausted (nothing left behind), and once fds are free again
    everything works."""
    sock = str(tmp_path / "m.sock")
    p = _start(sock, nofile=48)
    conns = []
    try:
        assert p.poll() is None, p.stderr.read()
        refused = None
        for _ in range(60):
            s = _raw(sock)
            try:
                s.send(msgpack.packb({"op": "ps", "rid": 1}))
            except (BrokenPipeError, ConnectionResetError):
                pass            # refused before it could send: its bye is waiting
            try:
                # a refused client's request is unread: the close reads as ECONNRESET
                # first, then the bye (the wire reads past the reset)
                msg = wire.recv(s)[0]
            except E.MonitorGone:
                msg = None
            if msg is None or msg.get("op") == "bye":
                refused = msg
                s.close()
                break
            conns.append(s)
        assert refused is not None, "never ran out of fds"
        assert refused["c"] == E.ResourceExhausted.code and "out of resources" in \
            refused["why"]
        assert p.poll() is None                             # the monitor lives on
        # one fd free: not enough for an enclave's socket pair
        # the monitor's fds as it counts them (any user may ask; its /proc is root's)
        rids = iter(range(1000, 2000))

        def fds():
            return _request(conns[1], {"op": "ps", "rid": next(rids)})["monitor"]["fds"]
        assert fds() == -1            # it cannot even open /proc/self/fd to count
        conns.pop().close()
        assert wait_until(lambda: fds() >= 0, 10)      # the close freed one
        # a create carrying its stdio (2 fds) cannot even be received whole: refused
        rep = _create(conns[0], 6, eapp("exiter"), "no-stdio", stdio=True)
        assert rep["op"] == "e" and rep["c"] == E.ResourceExhausted.code, rep
        assert "could not be received" in rep["why"]
        assert _request(conns[0], {"op": "ps", "rid": 60})["op"] == "r"   # still served
        rep = _create(conns[0], 7, eapp("exiter"), "starved", stdio=False)
        assert rep["op"] == "e" and rep["c"] in (E.ResourceExhausted.code,), rep
        # everyone else is still served
        assert _request(conns[1], {"op": "ps", "rid": 2})["op"] == "r"
        for s in conns[2:20]:
            s.close()
        del conns[2:20]
        # 18 of its 48 fds are free again (the pool of warm processes may take 2 back,
        # and just before, the monitor may have been at its limit: fds() == -1)
        assert wait_until(lambda: 0 <= fds() <= 48 - 16, 10), fds()
        rep = _create(conns[0], 8, eapp("exiter"), "fed", stdio=False)
        assert rep["op"] == "r", rep
        with Host.connect(sock, embedded=False) as h:
            h.shmget(PAGE).remove()
    finally:
        for s in conns:
            s.close()
        assert _stop(p) == 0
    assert "Traceback" not in p.stderr.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
@pytest.mark.parametrize("allowed", [False, True])
def test_a_refused_uid_is_told_why(allowed):
    """Another uid is refused, in one line saying how to allow it; allowed by
    ``--allow-uid`` it is served (here: a ps request)."""
    d = tempfile.mkdtemp(prefix="tvmrt-test-uid-")           # in /tmp: others can reach it
    os.chmod(d, 0o755)
    sock = os.path.join(d, "m.sock")
    p = _start(sock, extra=("--allow-uid", "65534") if allowed else ())
    try:
        os.chmod(sock, 0o777)                    # reachable, so that accept decides
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                             # pragma: no cover - the child
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(sock)
                s.settimeout(10)
                try:
                    s.send(msgpack.packb({"op": "ps", "rid": 1}))
                except OSError:
                    pass                         # refused: the bye is waiting
                data = s.recv(65536)
                os.write(w, data or b"EOF")
            finally:
                os._exit(0)
        os.close(w)
        data = os.read(r, 65536)
        os.close(r)
        os.waitpid(pid, 0)
        assert data not in (b"", b"EOF"), data
        msg = msgpack.unpackb(data)
        if allowed:
            assert msg["op"] == "r" and msg["rid"] == 1 and "enclaves" in msg, msg
        else:
            assert msg["op"] == "bye" and msg["c"] == E.NotPermitted.code
            assert "serves uid" in msg["why"] and "--allow-uid 65534" in msg["why"]
    finally:
        assert _stop(p) == 0
        os.rmdir(d)


def test_the_channel_raises_the_monitors_reason(tmp_path):
    """A client disconnected with a 'bye' raises its error, not 'connection closed'."""
    from tvmrt._channel import Channel
    from tvmrt._regions import RegionTable
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ch = Channel(a, RegionTable())
    b.send(msgpack.packb({"op": "bye", "c": E.ResourceExhausted.code, "why": "no fds"}))
    b.close()
    with pytest.raises(E.ResourceExhausted, match="no fds"):
        ch.request({"op": "ps"})
    ch.close()


def test_a_killed_monitor_leaves_no_traceback_on_the_terminal(tmp_path):
    """The monitor is SIGKILLed while an enclave waits in call_enclave: the eapp's raise
    (the call failed) prints nothing -- there is nobody to tell and the enclave dies
    with its monitor -- and the host says what happened in one line."""
    script = tmp_path / "host.py"
    script.write_text(
        "import os, signal, sys, threading, time\n"
        "from tvmrt import SERVER\n"
        "from tvmrt.host import Host\n"
        "from tvmrt.errors import TvmError\n"
        "h = Host.connect(embedded=True)\n"
        f"h.create({eapp('echo_server')!r}, name='echo', type=SERVER)\n"
        f"c = h.create({eapp('checked_caller')!r}, name='c')\n"
        "threading.Timer(0.2, os.kill, (h.embedded.pid, signal.SIGKILL)).start()\n"
        "try:\n"
        "    c.run(timeout=10)\n"
        "except TvmError as exc:\n"
        "    print(f'host: {type(exc).__name__}', file=sys.stderr)\n"
        "time.sleep(0.5)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "host: MonitorGone" in r.stderr, r.stderr
