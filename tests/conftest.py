"""Shared fixtures: one monitor per session, a host per test, leak checks after each."""
from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from tvmrt._embedded import EmbeddedMonitor
from tvmrt.host import Host
from tvmrt.monitor.zygote import WARM_NAME as _WARM

EAPPS = Path(__file__).parent / "eapps"


def eapp(name: str) -> str:
    """Path of a test eapp."""
    return str(EAPPS / f"{name}.py")


#: the monitor names its segments /tvmrt.<monitor pid>.<random hex>
SHM_PREFIX = "tvmrt."


def shm_names(mon_pid: int | None = None) -> set[str]:
    """This project's POSIX shared-memory segments in /dev/shm, those of the monitor
    ``mon_pid`` if given (another program's files there, or another monitor's -- a user's
    own, running while the tests do -- are none of our business and must not fail a leak
    check)."""
    prefix = SHM_PREFIX if mon_pid is None else f"{SHM_PREFIX}{mon_pid}."
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def wait_until(pred, timeout=10.0, every=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return pred()


def _fd_targets(pid) -> set[str]:
    """What the fds of process ``pid`` refer to ("pipe:[123]", "socket:[456]", paths)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass                  # closed meanwhile
    return out


def monitor_fds(mon) -> int:
    """The monitor's open fds: from /proc, or -- a non-root user cannot read the /proc of
    a non-dumpable monitor -- as the monitor counts them itself (``ps``), less the
    connection that asks."""
    try:
        return psutil.Process(mon.pid).num_fds()
    except psutil.AccessDenied:
        with Host.connect(mon.path, embedded=False) as h:
            return h.ps()["monitor"]["fds"] - 1


def wait_warm(mon, timeout=30):
    """Wait until the monitor holds its full pool of warm processes (the channels it
    holds to them are part of its idle fds)."""
    from tvmrt.monitor.zygote import POOL_SIZE
    with Host.connect(mon.path, embedded=False) as h:
        assert wait_until(lambda: h.ps()["monitor"]["warm"] == POOL_SIZE, timeout), \
            "the monitor's pool of warm processes did not fill"


@pytest.fixture(scope="session")
def monitor():
    mon = EmbeddedMonitor().start()
    before = shm_names(mon.pid)
    proc = psutil.Process(mon.pid)
    # the monitor closes the ready pipe just after writing "ready": count its idle fds once
    # that has happened
    try:
        assert wait_until(lambda: mon.ready_pipe not in _fd_targets(mon.pid), 10), \
            "the monitor kept its ready pipe open"
    except PermissionError:
        pass
    wait_warm(mon)
    # the connection wait_warm made is closed on the monitor's side a moment later: wait
    # for its count to settle
    counts = [monitor_fds(mon)]
    while len(counts) < 3 or counts[-1] != counts[-2] or counts[-2] != counts[-3]:
        time.sleep(0.05)
        counts.append(monitor_fds(mon))
    mon.idle_fds = counts[-1]
    yield mon
    kids = proc.children(recursive=True)
    assert mon.stop() == 0, "the monitor did not exit 0 on SIGTERM"
    gone, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive, f"processes outlived the monitor: {alive}"
    assert shm_names(mon.pid) <= before, "segments left in /dev/shm"


def private_monitor(**kw):
    """A monitor of a test module's own (``EmbeddedMonitor(**kw)``) as a generator for a
    fixture: it must exit 0 on SIGTERM, and no process may outlive it."""
    mon = EmbeddedMonitor(**kw).start()
    yield mon
    kids = psutil.Process(mon.pid).children(recursive=True)
    assert mon.stop() == 0, "the monitor did not exit 0 on SIGTERM"
    _, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive, f"processes outlived the monitor: {alive}"


def enclave_procs(mon):
    """Live processes below monitor ``mon`` other than its zygote."""
    return _enclave_procs(mon)


def _enclave_procs(mon):
    """Processes below the monitor other than the zygote and its warm processes (forked
    ahead, each to become an enclave: see monitor/zygote.py)."""
    out = []
    for k in psutil.Process(mon.pid).children(recursive=True):
        try:
            if (k.ppid() != mon.pid and k.status() != psutil.STATUS_ZOMBIE
                    and k.name() != _WARM.decode()):
                out.append(k)
        except psutil.NoSuchProcess:
            pass                  # it ended between the two calls
    return out


@pytest.fixture
def clean(monitor):
    """Check that a test leaves no enclave process, segment or monitor fd behind."""
    # the previous test's peers may still be closing: start from an idle monitor
    wait_until(lambda: not _enclave_procs(monitor) and monitor_fds(monitor) == monitor.idle_fds,
               10)
    fds = monitor.idle_fds
    shm = shm_names(monitor.pid)
    yield monitor
    assert wait_until(lambda: not _enclave_procs(monitor), 10), \
        f"enclave processes left: {_enclave_procs(monitor)}"
    assert wait_until(lambda: monitor_fds(monitor) == fds, 10), \
        f"monitor fds grew from {fds} to {monitor_fds(monitor)}"
    assert shm_names(monitor.pid) <= shm, "segments left in /dev/shm"


@pytest.fixture
def host(clean):
    h = Host.connect(clean.path, embedded=False)
    yield h
    h.close()
