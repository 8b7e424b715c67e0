"""The call path's promises (issue "Faster than the IPC people use today"), checked by
counting, never by timing: a call costs the monitor's core the same work whatever the
number of enclaves and regions (O(1)); in the default mode the monitor consults no
``/proc`` file and makes no fd or segment per call.
"""
from __future__ import annotations

import itertools
import os
import sys
import tracemalloc

import pytest

from conftest import wait_until
from core_driver import Driver
from tvmrt import bench
from tvmrt._layout import PAGE
from tvmrt.monitor.config import Config
from tvmrt.monitor.core import NORMAL, SERVER, Core
from tvmrt.monitor.zygote import POOL_SIZE

_rids = itertools.count(1)


def _req(d, peer, op, **kw):
    d.message(peer, {"op": op, "rid": next(_rids), **kw})
    return d.last_reply


def _lines(fn) -> int:
    """The Python lines ``fn()`` executes, in every function it calls: a count of the
    work that does not depend on the machine's speed."""
    n = 0

    def local(frame, event, arg):
        nonlocal n
        if event == "line":
            n += 1
        return local

    sys.settrace(lambda frame, event, arg: local)
    try:
        fn()
    finally:
        sys.settrace(None)
    return n


@pytest.mark.timeout(300)
def test_a_call_costs_the_core_the_same_with_500_more_enclaves_and_regions():
    d = Driver(Core(Config(key=b"k" * 32)))
    h = d.connect()
    sh = _req(d, h, "create", name="srv", type=SERVER, code=b"pass")["handle"]
    (s,) = [p for p, e in ((p, d.core.peers[p].enclave) for p in d.open)
            if e is not None and e.handle == sh]

    def new_enclave(name):
        rep = _req(d, h, "create", name=name, type=NORMAL, code=b"pass")
        assert rep["op"] == "r", rep
        peer = next(p for p in d.open if d.core.peers[p].enclave is not None
                    and d.core.peers[p].enclave.handle == rep["handle"])
        _req(d, h, "run", handle=rep["handle"])
        d.take(peer)
        return peer

    c = new_enclave("caller")
    rep = _req(d, c, "mmap", size=PAGE)
    v = rep["vaddr"]
    d.take(c)
    core = d.core

    def one_call(loan):
        a = [1, 0, v, PAGE, 0, 0] if loan else [1, 0, 0, 0, 0, 0]
        fx = core.message(c, {"op": "call", "rid": next(_rids), "handle": sh, "a": a})
        assert fx and fx[-1].peer == s and fx[-1].msg["op"] == "call", fx
        fx = core.message(s, {"op": "ret", "a": a})
        assert fx and fx[-1].peer == c and fx[-1].msg["op"] == "r", fx

    def cost(loan):
        one_call(loan)                              # warm: first-use paths
        return [_lines(lambda: one_call(loan)) for _ in range(3)]

    small = {loan: cost(loan) for loan in (False, True)}
    # 500 more enclaves (idle servers and running normal ones) and 500 more regions,
    # shared memory among them; the driver plays their processes
    filler = new_enclave("filler")
    for i in range(250):
        _req(d, h, "create", name=f"idle{i}", type=SERVER, code=b"pass")
        new_enclave(f"run{i}")
    for _ in range(500):
        assert _req(d, filler, "mmap", size=PAGE)["op"] == "r"
    d.take(filler)
    assert len(core.regions) > 500 and sum(
        1 for p in core.peers.values() if p.enclave is not None) > 500
    big = {loan: cost(loan) for loan in (False, True)}
    assert big == small
    # and each call the same as the one before (nothing accumulates per call)
    for loan in (False, True):
        assert len(set(big[loan])) == 1, big
    # nor in memory: 2,000 calls and returns leave the core's heap where it was
    tracemalloc.start()
    try:
        for loan in (False, True) * 10:
            one_call(loan)
        before = tracemalloc.get_traced_memory()[0]
        for loan in (False, True) * 1000:
            one_call(loan)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, f"{grown} bytes more after 2,000 calls"


# ------------------------------------------------------------------ a live monitor
#: Run in the test's monitor before ``tvmrt monitor``: an audit hook that writes every
#: path under /proc the monitor process opens or lists to a log.  The zygote and the
#: enclaves, forked from it, inherit the hook (audit hooks cannot be removed) and skip it:
#: the pid is not the monitor's (and the sandbox has closed the log's fd there).
_AUDIT = """
import os, sys
_log = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
_me = os.getpid()
def _hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and os.getpid() == _me:
        path = args[0]
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if isinstance(path, str) and path.startswith("/proc"):
            os.write(_log, (str(_me) + " " + event + " " + path + chr(10)).encode())
sys.addaudithook(_hook)
"""


class _AuditedTvm(bench.Tvm):
    """:class:`tvmrt.bench.Tvm` on a monitor running :data:`_AUDIT` (its prelude)."""

    def __init__(self, max_n: int, tmp: str):
        super().__init__(max_n)
        self.log = os.path.join(tmp, "proc.log")

    def start(self, prelude: str = "") -> _AuditedTvm:
        super().start(_AUDIT.format(log=self.log))
        return self

    def proc_opens(self) -> list[str]:
        """The monitor's own /proc opens so far."""
        assert self.host is not None and self.host.embedded is not None
        try:
            with open(self.log) as f:
                return [line for line in f
                        if line.split()[0] == str(self.host.embedded.pid)]
        except FileNotFoundError:
            return []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("config", ["null", "loan_4k"])
def test_the_default_mode_call_path_reads_no_proc_and_makes_no_fd_or_segment(config,
                                                                               tmp_path):
    """Blocks of 20 and of 2,000 calls (each with its own caller enclave, created and
    destroyed) cost the monitor the same /proc opens -- those of the create and the
    exit, none per call -- and leave its fds and segments where they were."""
    tvm = _AuditedTvm(2100, str(tmp_path))
    try:
        tvm.start()
        tvm.block(config, 20, 0)                    # first create: warm pool, imports
        opens, fds, segs = [], [], []
        mon: dict = {}

        def settled():
            # the warm pool refills after each create (a channel fd per warm process),
            # and the caller's socket closes when the monitor has read its EOF, after
            # the run's answer (sockets: this host's and the server's).  A leak per
            # call (2,000 fds) never settles.
            mon.update(tvm.host.ps()["monitor"])
            return mon["warm"] >= POOL_SIZE and mon["sockets"] == 2

        for n in (20, 2000, 20, 2000):
            before = len(tvm.proc_opens())
            tvm.block(config, n, 0)
            opens.append(len(tvm.proc_opens()) - before)
            wait_until(settled, 10)
            fds.append(mon["fds"])
            segs.append(mon["segments"])
        assert opens[1] == opens[0] and opens[3] == opens[2], (opens, tvm.proc_opens())
        assert len(set(fds)) == 1 and len(set(segs)) == 1, (fds, segs)
    finally:
        tvm.stop()
