"""An enclave and everything it forks are one unit: they end together.

Each enclave process leads a session and process group of its own; the zygote is a
child subreaper and kills what is left of an enclave (its group, and every orphan
re-parented to it that belongs to no live enclave) when the enclave ends, is
destroyed, or when the monitor goes away.
"""
from __future__ import annotations

import signal
import threading

import psutil
import pytest

from conftest import eapp, shm_names, wait_until
from tvmrt import SERVER
from tvmrt._embedded import EmbeddedMonitor
from tvmrt.errors import PeerDied
from tvmrt.host import Host

pytestmark = pytest.mark.timeout(60)

# tests/eapps/forker.py modes
ORPHAN, SETSID, HOLD, SETPGID = 1, 2, 4, 8

MODES = {
    "child": 0,                          # a plain fork: in the enclave's group
    "orphan": ORPHAN,                    # double fork: adopted by the zygote
    "orphan-setsid": ORPHAN | SETSID,    # ... that also left the session and group
    "setpgid": SETPGID,                  # left the group, not the session
    "setsid": SETSID,                    # left the session while its parent lives
}


def _proc(pid: int) -> psutil.Process | None:
    """The process ``pid``, or None if it has ended already."""
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _gone(p: psutil.Process | None) -> bool:
    if p is None:
        return True
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _alive(p: psutil.Process | None) -> bool:
    return not _gone(p)


def _forker(host, mode, name="forker"):
    shm = host.shmget(0x1000)
    v = shm.view.cast("i")
    v[0] = mode
    return host.create(eapp("forker"), name=name, shm=shm), v


def _descendant(v) -> psutil.Process | None:
    assert wait_until(lambda: v[1] == 1 and v[2] != 0, 10), "the eapp's fork did not run"
    return _proc(v[2])


class _Run(threading.Thread):
    """enc.run() in a thread; keeps what it returned or raised."""

    def __init__(self, enc):
        super().__init__(daemon=True)
        self.enc = enc
        self.result: object = None

    def run(self):
        try:
            self.result = self.enc.run()
        except BaseException as exc:          # noqa: BLE001 - the test looks at it
            self.result = exc


@pytest.mark.parametrize("mode", list(MODES.values()), ids=list(MODES))
def test_descendants_die_when_enclave_returns(host, mode):
    enc, v = _forker(host, mode)
    assert enc.run() == 0
    p = _descendant(v)
    assert wait_until(lambda: _gone(p), 5), f"{p} outlived its enclave"


@pytest.mark.parametrize("mode", [0, ORPHAN, SETPGID], ids=["child", "orphan", "setpgid"])
def test_descendants_live_while_enclave_runs(host, mode):
    enc, v = _forker(host, mode | HOLD)
    t = _Run(enc)
    t.start()
    p = _descendant(v)
    # a few zygote wake-ups (a spawn, an exit) meanwhile must not touch it
    host.create(eapp("shm_rw"), name="other", shm=host.shmget(0x1000)).run()
    assert _alive(p), "a running enclave's descendant was killed"
    v[3] = 1
    t.join(20)
    assert t.result == 0
    assert wait_until(lambda: _gone(p), 5), f"{p} outlived its enclave"


@pytest.mark.parametrize("mode", list(MODES.values()), ids=list(MODES))
def test_descendants_die_when_running_enclave_is_destroyed(host, mode):
    enc, v = _forker(host, mode | HOLD)
    t = _Run(enc)
    t.start()
    p = _descendant(v)
    enc.destroy()
    t.join(20)
    assert isinstance(t.result, Exception), f"run gave {t.result!r}"
    assert wait_until(lambda: _gone(p), 5), f"{p} outlived its destroyed enclave"


def test_descendants_die_when_host_goes(clean):
    h = Host.connect(clean.path, embedded=False)
    try:
        kids = []
        for i, mode in enumerate((0, ORPHAN, SETPGID)):
            enc, v = _forker(h, mode | HOLD, name=f"forker{i}")
            _Run(enc).start()
            kids.append(_descendant(v))
        assert all(_alive(p) for p in kids)
    finally:
        h.close()
    assert wait_until(lambda: all(_gone(p) for p in kids), 5), \
        f"outlived their host: {[p for p in kids if _alive(p)]}"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_nothing_survives_the_monitor(how):
    before = shm_names()
    mon = EmbeddedMonitor().start()
    mp = psutil.Process(mon.pid)
    host = Host.connect(mon.path, embedded=False)
    try:
        kids = []
        for i, mode in enumerate((0, ORPHAN, SETPGID, SETSID)):
            enc, v = _forker(host, mode | HOLD, name=f"forker{i}")
            _Run(enc).start()
            kids.append(_descendant(v))
        assert all(_alive(p) for p in kids)
        everything = kids + mp.children(recursive=True)
        mon.proc.send_signal(how)
        mon.proc.wait(20)
        assert wait_until(lambda: all(_gone(p) for p in everything), 5), \
            f"survived the monitor: {[p for p in everything if _alive(p)]}"
    finally:
        host.close()
        mon.stop()
    assert shm_names() <= before


def _server(host):
    sshm = host.shmget(0x1000)
    sv = sshm.view.cast("i")
    srv = host.create(eapp("forker_server"), name="forker-srv", type=SERVER, shm=sshm)
    cshm = host.shmget(0x1000)
    cv = cshm.view.cast("i")
    return srv, sv, cshm, cv


def test_server_handler_fork_dies_with_the_server(host):
    srv, sv, cshm, cv = _server(host)
    cv[0] = 1
    assert host.create(eapp("forker_caller"), name="fc", shm=cshm).run() == 0
    assert (cv[1], cv[2]) == (0, 1)
    p = _proc(sv[2])
    assert _alive(p), "the server's child died while the server lives"
    srv.destroy()
    assert wait_until(lambda: _gone(p), 5), f"{p} outlived its server"


def test_server_that_exits_takes_its_child_along(host):
    srv, sv, cshm, cv = _server(host)
    cv[0] = 2
    assert host.create(eapp("forker_caller"), name="fc", shm=cshm).run() == 0
    assert cv[1] == PeerDied.code
    assert sv[2] != 0
    p = _proc(sv[2])
    assert wait_until(lambda: _gone(p), 5), f"{p} outlived its server"
