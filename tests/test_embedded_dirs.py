"""Embedded monitors leave no ``tvmrt-*`` directory behind, however their host ends.

Each test gives its processes a private ``TMPDIR`` (where the embedded monitor makes its
socket directory) and looks at what is left there.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import wait_until
from tvmrt import _embedded
from tvmrt._embedded import sweep_stale_dirs

#: a normal enclave that says it runs, then sleeps: killing anything while it sleeps
#: leaves no eapp code running that could print
SLEEPER = """\
import time
from tvmrt.eapp import *


def main(args):
    eapp_print("sleeper: running\\n")
    time.sleep(60)
    return 0
"""

#: a host with an embedded monitor and an enclave; it says where both are, then waits
HOST = """\
import sys, time
from tvmrt.host import Host
h = Host.connect(embedded=True)
h.create(sys.argv[1], name="sleeper")
print(h.embedded.dir, h.embedded.pid, flush=True)
time.sleep(60)
"""


def _env(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    env["TVMRT_SOCKET"] = str(tmp_path / "none.sock")    # no monitor there: embed one
    return env, str(tmp)


def _left(tmp: str) -> list[str]:
    return sorted(n for n in os.listdir(tmp) if n.startswith("tvmrt-"))


def _monitor_child(pid):
    """The embedded monitor below ``pid`` once it runs the monitor (past exec), or None."""
    try:
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return None
    for k in kids:
        try:
            if "--ready-fd" in k.cmdline():   # not in the cmdline it had before exec
                return k
        except psutil.Error:
            pass
    return None


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()                                         # reaped: the pid names no process
    return p.pid


@pytest.fixture
def sleeper(tmp_path):
    path = tmp_path / "sleeper.py"
    path.write_text(SLEEPER)
    return str(path)


# ---------------------------------------------------------------- tvmrt launch, signalled
@pytest.mark.timeout(90)
@pytest.mark.parametrize("when", ["starting", "running"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_launch_signalled_leaves_no_directory(tmp_path, sleeper, sig, when):
    env, tmp = _env(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "tvmrt", "launch", sleeper], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # starting: the monitor runs (past exec) but need not listen yet
        assert wait_until(lambda: _monitor_child(p.pid) is not None, 30), \
            p.stderr.read() if p.poll() is not None else "no monitor started"
        mon = _monitor_child(p.pid)
        assert _left(tmp)
        if when == "running":
            assert p.stdout.readline() == "sleeper: running\n"
        kids = psutil.Process(p.pid).children(recursive=True) + mon.children(recursive=True)
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:
        # a clean stop: the enclaves, the monitor and its directory are gone on return
        assert p.returncode == 128 + sig, err
        assert err == "", err
        assert _left(tmp) == []
    # SIGKILL: the monitor gets SIGTERM (PDEATHSIG), stops and removes its directory
    gone, alive = psutil.wait_procs(kids, timeout=15)
    assert not alive, f"outlived tvmrt launch: {alive}"
    assert wait_until(lambda: _left(tmp) == [], 10), _left(tmp)


# ---------------------------------------------------------------- a Host process, killed
def _start_host(tmp_path, sleeper):
    env, tmp = _env(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", HOST, sleeper], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line, p.communicate(timeout=30)[1]
    d, mon_pid = line.split()
    assert os.path.dirname(d) == tmp and os.path.isdir(d)
    return p, tmp, d, psutil.Process(int(mon_pid))


@pytest.mark.timeout(60)
def test_host_sigkilled_with_embedded_monitor_leaves_no_directory(tmp_path, sleeper):
    p, tmp, d, mon = _start_host(tmp_path, sleeper)
    kids = [mon] + mon.children(recursive=True)
    p.kill()
    p.wait()
    gone, alive = psutil.wait_procs(kids, timeout=15)
    assert not alive, f"outlived the host: {alive}"
    assert wait_until(lambda: _left(tmp) == [], 10), _left(tmp)


@pytest.mark.timeout(60)
def test_monitor_and_host_sigkilled_next_start_removes_the_directory(tmp_path, sleeper):
    p, tmp, d, mon = _start_host(tmp_path, sleeper)
    kids = mon.children(recursive=True)
    mon.kill()                      # nobody left to remove the directory ...
    p.kill()
    p.wait()
    psutil.wait_procs([mon] + kids, timeout=15)
    assert _left(tmp) == [os.path.basename(d)]
    assert os.listdir(d) == ["monitor.sock"]         # ... and its socket is dead
    env, _ = _env(tmp_path)
    r = subprocess.run([sys.executable, "-c",
                        "from tvmrt._embedded import EmbeddedMonitor\n"
                        "m = EmbeddedMonitor().start()\n"
                        "import os; print(sorted(os.listdir(os.path.dirname(m.dir))))\n"
                        "m.stop()"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    during = eval(r.stdout)                          # what the next start left
    assert os.path.basename(d) not in during and len(during) == 1
    assert _left(tmp) == []


# ---------------------------------------------------------------- the sweep itself
def _listening(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.listen(1)
    return s


def _dead_socket(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.close()                       # the file stays; nothing listens on it


@pytest.mark.timeout(30)
def test_sweep_removes_only_stale_directories_of_embedded_monitors(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    old = time.time() - 3600

    def mk(name, sock=None, extra=None, mtime=None):
        d = tmp_path / name
        d.mkdir(mode=0o700)
        if sock == "dead":
            _dead_socket(str(d / "monitor.sock"))
        elif sock == "live":
            keep.append(_listening(str(d / "monitor.sock")))
        elif sock == "file":
            (d / "monitor.sock").write_text("")
        if extra:
            (d / extra).write_text("mine")
        if mtime:
            os.utime(d, (mtime, mtime))
        return str(d)

    keep: list[socket.socket] = []
    try:
        stale = {
            mk(f"tvmrt-{dead}-aaaaaaaa"),                        # crashed while starting
            mk(f"tvmrt-{dead}-bbbbbbbb", sock="dead"),           # monitor SIGKILLed
            mk("tvmrt-k3x_9q2z", mtime=old),                     # an older version's
            mk("tvmrt-zzzzzzz1", sock="dead", mtime=old),
        }
        kept = {
            mk(f"tvmrt-{alive}-cccccccc"),                       # its host is alive
            mk(f"tvmrt-{dead}-dddddddd", sock="live"),           # a monitor answers
            mk(f"tvmrt-{dead}-eeeeeeee", extra="notes"),         # not only ours in it
            mk(f"tvmrt-{dead}-ffffffff", sock="file"),           # not a socket
            mk("tvmrt-young_12"),                                # old style, just made
            mk("tvmrt-12345678", mtime=old),                     # tvmrt-$UID, not ours
            mk(f"tvmrt-{dead}", mtime=old),                      # the same
            mk("tvmrt-ci-demo", mtime=old),                      # some other name
            mk(f"other-{dead}-gggggggg"),
        }
        (tmp_path / f"tvmrt-{dead}-hhhhhhhh").write_text("a file, not a directory")
        kept.add(str(tmp_path / f"tvmrt-{dead}-hhhhhhhh"))
        if os.geteuid() == 0:                                    # another user's
            other = mk(f"tvmrt-{dead}-iiiiiiii")
            os.chown(other, 65534, -1)
            kept.add(other)
        removed = sweep_stale_dirs(str(tmp_path))
        assert set(removed) == stale
        for path in stale:
            assert not os.path.lexists(path)
        for path in kept:
            assert os.path.lexists(path), path
        assert sweep_stale_dirs(str(tmp_path)) == []
    finally:
        for s in keep:
            s.close()


@pytest.mark.timeout(30)
def test_start_sweeps_and_names_its_directory_after_the_starter(tmp_path, monkeypatch):
    import tempfile
    dead = _dead_pid()
    stale = tmp_path / f"tvmrt-{dead}-zzzzzzzz"
    stale.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mon = _embedded.EmbeddedMonitor().start()
    try:
        assert not stale.exists()
        assert os.path.basename(mon.dir).startswith(f"tvmrt-{os.getpid()}-")
        assert os.stat(mon.dir).st_mode & 0o777 == 0o700
    finally:
        mon.stop()
    assert _left(str(tmp_path)) == []


@pytest.mark.timeout(30)
def test_monitor_removes_its_own_directory_when_it_stops(tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mon = _embedded.EmbeddedMonitor().start()
    d = mon.dir
    try:
        mon.proc.send_signal(signal.SIGTERM)     # the monitor alone, not stop()
        assert mon.proc.wait(20) == 0
        assert not os.path.exists(d)
    finally:
        mon.stop()


@pytest.mark.timeout(30)
def test_monitor_whose_host_died_before_ready_removes_its_directory(tmp_path):
    """The host died while its monitor started: "ready" goes nowhere (EPIPE).  The
    monitor ends quietly and still removes its directory, socket included."""
    d = tmp_path / "tvmrt-1-abcdefgh"
    d.mkdir(mode=0o700)
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "tvmrt", "monitor", "--socket",
                          str(d / "monitor.sock"), "--ready-fd", str(w), "--quiet",
                          "--own-socket-dir"], pass_fds=(w,), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    os.close(w)
    os.close(r)                                      # nobody will read "ready"
    out, err = p.communicate(timeout=20)
    assert p.returncode != 0
    assert out == "" and err == "", err
    assert not d.exists()
