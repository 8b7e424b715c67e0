"""The zygote's warm processes: forked ahead, each becomes an enclave with one message.

A warm process has closed every fd but its channel and /dev/null, leads its process
group and is in its sandbox before any create asks for it; it must never hold another
enclave's fds, must end with the monitor, and creation must go on when warm processes
are killed from outside (a create then gets the next one, or a process forked for it).
"""
from __future__ import annotations

import os
import signal

import psutil
import pytest

from conftest import eapp, private_monitor, wait_until
from tvmrt import SERVER
from tvmrt._embedded import EmbeddedMonitor
from tvmrt.host import Host
from tvmrt.monitor.zygote import POOL_SIZE, WARM_NAME

pytestmark = pytest.mark.timeout(120)

CODE = b"def main(args):\n    return 7\n"


@pytest.fixture
def mon():
    yield from private_monitor()


def _warm_pids(mon) -> set[int]:
    """The warm processes below monitor ``mon`` (children of its zygote)."""
    out = set()
    for k in psutil.Process(mon.pid).children(recursive=True):
        try:
            if k.name() == WARM_NAME.decode() and k.status() != psutil.STATUS_ZOMBIE:
                out.add(k.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _pool_full(h, mon) -> bool:
    return h.ps()["monitor"]["warm"] == POOL_SIZE and len(_warm_pids(mon)) == POOL_SIZE


def test_an_enclave_is_a_warm_process_and_the_pool_refills(mon):
    with Host.connect(mon.path, embedded=False) as h:
        assert wait_until(lambda: _pool_full(h, mon), 30)
        before = _warm_pids(mon)
        srv = h.create(CODE, name="s", type=SERVER)
        pid = next(e["pid"] for e in h.ps()["enclaves"] if e["name"] == "s")
        assert pid in before, "the enclave is not one of the warm processes"
        assert psutil.Process(pid).name() != WARM_NAME.decode()
        assert wait_until(lambda: _pool_full(h, mon), 30)
        assert pid not in _warm_pids(mon)
        assert h.create(CODE, name="n").run() == 7
        srv.destroy()


def _fd_targets(pid: int) -> list[str]:
    d = f"/proc/{pid}/fd"
    return [os.readlink(f"{d}/{fd}") for fd in sorted(os.listdir(d), key=int)]


def test_warm_processes_hold_no_fds_of_other_enclaves(mon):
    with Host.connect(mon.path, embedded=False) as h:
        assert wait_until(lambda: _pool_full(h, mon), 30)
        shm = h.shmget(0x1000)
        # two live enclaves, one with a shared segment: the warm processes forked since
        # (the pool refilled after each) must hold none of their fds
        srv = h.create(eapp("forker_server"), name="s", type=SERVER, shm=shm)
        other = h.create(CODE, name="n", shm=shm)
        old = _warm_pids(mon)
        assert wait_until(lambda: _pool_full(h, mon), 30)
        for pid in _warm_pids(mon):
            try:
                targets = _fd_targets(pid)
            except PermissionError:
                pytest.skip("a warm process is non-dumpable: only root reads its fds")
            # /dev/null as stdio, its channel, and the pipe end it closes once ready
            assert targets[:3] == ["/dev/null"] * 3, targets
            rest = sorted(t.split(":")[0] for t in targets[3:])
            assert rest == ["pipe", "socket"], \
                f"warm process {pid} holds {targets} (forked after enclaves: {pid not in old})"
        other.destroy()
        srv.destroy()
        shm.remove()


def test_killing_the_monitor_leaves_no_warm_process():
    mon = EmbeddedMonitor().start()
    try:
        with Host.connect(mon.path, embedded=False) as h:
            assert wait_until(lambda: _pool_full(h, mon), 30)
        warm = [psutil.Process(p) for p in _warm_pids(mon)]
        zygote = psutil.Process(mon.pid).children()
        mon.proc.send_signal(signal.SIGKILL)
        mon.proc.wait(20)
        _, alive = psutil.wait_procs(warm + zygote, timeout=10)
        assert not alive, f"outlived the monitor: {alive}"
    finally:
        mon.stop()


def test_creation_goes_on_when_warm_processes_are_killed(mon):
    with Host.connect(mon.path, embedded=False) as h:
        for _ in range(3):
            assert wait_until(lambda: _pool_full(h, mon), 30)
            procs = [psutil.Process(p) for p in _warm_pids(mon)]
            for p in procs:
                p.send_signal(signal.SIGKILL)
            psutil.wait_procs(procs, timeout=10)
            # the monitor may still hold the dead ones' channels: each create gets a
            # live warm process, or one forked for it
            for i in range(POOL_SIZE + 1):
                assert h.create(CODE, name=f"n{i}").run() == 7
        assert wait_until(lambda: _pool_full(h, mon), 30), "the pool did not refill"
