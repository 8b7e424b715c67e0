"""The call path's promises (issue "Faster than the IPC people use today"), checked by
counting, never by timing: a call costs the monitor's core the same work whatever the
number of enclaves and regions (O(1)); in the default mode the monitor consults no
``/proc`` file and makes no fd or segment per call.
"""
from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc

import pytest

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
    """:class:`tvmrt.bench.Tvm` on a monitor started here, with :data:`_AUDIT`."""

    def __init__(self, max_n: int, tmp: str):
        super().__init__(max_n)
        self.dir = tmp
        self.log = os.path.join(tmp, "proc.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> _AuditedTvm:
        from tvmrt.host import SERVER as SERVER_TYPE, Host
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.path.join(self.dir, "m.sock")
        boot = (f"import sys; sys.path.insert(0, {root!r})\n" + _AUDIT.format(log=self.log)
                + "from tvmrt.cli import main; sys.exit(main())")
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", boot, "monitor", "--socket",
                                          path, "--quiet", "--ready-fd", str(w)],
                                         stdin=subprocess.DEVNULL, pass_fds=(w,))
        finally:
            os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], 30)
            assert ready and os.read(r, 64).startswith(b"ready"), "the monitor did not start"
        finally:
            os.close(r)
        self.host = Host.connect(path, embedded=False)
        self.shm = self.host.shmget(bench.page_round(bench.HDR.size + 8 * self.max_n))
        self.host.create("bench_server", name=bench.SERVER_NAME, type=SERVER_TYPE)
        return self

    def proc_opens(self) -> list[str]:
        """The monitor's own /proc opens so far."""
        assert self.proc is not None
        try:
            with open(self.log) as f:
                return [line for line in f if line.split()[0] == str(self.proc.pid)]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("config", ["null", "loan_4k"])
def test_the_default_mode_call_path_reads_no_proc_and_makes_no_fd_or_segment(config):
    """Blocks of 20 and of 2,000 calls (each with its own caller enclave, created and
    destroyed) cost the monitor the same /proc opens -- those of the create and the
    exit, none per call -- and leave its fds and segments where they were."""
    tmp = tempfile.mkdtemp(prefix="tvmrt-audit-")
    tvm = _AuditedTvm(2100, tmp)
    try:
        tvm.start()
        tvm.block(config, 20, 0)                    # first create: warm pool, imports
        opens, fds, segs = [], [], []
        for n in (20, 2000, 20, 2000):
            before = len(tvm.proc_opens())
            tvm.block(config, n, 0)
            opens.append(len(tvm.proc_opens()) - before)
            # Settled counts: the warm pool refills after each create (a channel fd per
            # warm process), and the caller's socket closes when the monitor has read its
            # EOF, after the run's answer.  A leak per call (2,000 fds) never settles.
            deadline = time.monotonic() + 10
            while True:
                mon = tvm.host.ps()["monitor"]
                # sockets: this host's and the server's, the caller's gone
                settled = mon["warm"] >= POOL_SIZE and mon["sockets"] == 2
                if settled or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            fds.append(mon["fds"])
            segs.append(mon["segments"])
        assert opens[1] == opens[0] and opens[3] == opens[2], (opens, tvm.proc_opens())
        assert len(set(fds)) == 1 and len(set(segs)) == 1, (fds, segs)
    finally:
        tvm.stop()
        shutil.rmtree(tmp, ignore_errors=True)
