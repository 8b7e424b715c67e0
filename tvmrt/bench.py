"""``tvmrt bench``: call_enclave latency against floors measured in the same run.

The tvmrt rows, each timed call by call inside a caller enclave
(``eapps/bench_caller.py``) calling ``bench-server`` (``eapps/bench_server.py``)
through a private embedded monitor:

* ``null``      call_enclave with req_vaddr = 0 (registers only);
* ``loan_4k``   a 4 KiB ``eapp_mmap`` region loaned on every call, the server touches
                one byte;
* ``loan_64m``  a 64 MiB region loaned on every call; before each call the caller
                writes one byte in every page (not timed), the server reads and writes
                one byte in every page (timed, it is inside the call);
* ``loan_256m`` a 256 MiB region loaned on every call that neither side touches (the
                cost of a loan whatever its size);
* ``loan_256m_touch``  as ``loan_64m``, 256 MiB;
* ``create``    create-to-ready: ``host.create()`` of a small eapp (an idle server)
                until it returns, which is when the enclave reported ready; each one
                destroyed (not timed) before the next.  After the rounds, a burst:
                ``--burst N`` enclaves created back to back (enclaves/s).

Floors, written without tvmrt (plain ``socket``, ``msgpack``, ``os.fork``):

* ``relay_floor``  client -> relay -> server -> relay -> client over SOCK_SEQPACKET,
                   three processes, a blocking relay that ``msgpack.unpackb``s every
                   frame it forwards; 6-field dict packed/unpacked at both ends
                   (floors.md 1b, "blocking relay thread, SEQPACKET");
* ``copy_4k`` / ``copy_64m`` / ``copy_256m``  the same bytes copied through an AF_UNIX
                   SOCK_STREAM socketpair (4 MiB buffers) to a server that ``recv_into``s a
                   preallocated buffer, touches it like bench-server does, and sends
                   it all back into the client's preallocated buffer (for 256 MiB
                   the one it sent from, and the server runs only for its block: the
                   run holds well under 1 GiB at any time).

Goals (issue 8), each checked against the same run's figures, per transfer mode
(:data:`GOALS`): null median <= 1.3x the relay floor's median *and* p99 <= 2x the relay
floor's p99; 4 KiB loan median <= 1.5x the relay floor's median; 256 MiB untouched
median <= 2x the 4 KiB loan's median (same mode); 64 MiB / 256 MiB touched: the copy
floor's median >= 10x the loan's; create-to-ready median <= 3 ms.

The tvmrt rows run in each transfer mode asked for (``--isolation``: both by default,
the default ``mprotect`` mode's rows keep their names, strict mode's are ``strict_null``
etc.), against the same floors: one embedded monitor per mode and round, the floors
interleaved between the modes' blocks.

Every config runs one block per round, rounds in a shuffled order (seeded by the
round number); the first samples of every block are dropped as warm-up and the rest
are pooled.  Every process inherits this process's CPU affinity, so
``taskset -c 0 tvmrt bench`` measures co-located processes.

``--peers`` is :mod:`tvmrt._peers` (and :mod:`tvmrt._iox2`), ``--plot`` is
:mod:`tvmrt._plot`, the live line :mod:`tvmrt._progress`; :func:`main` runs them all
with the same signal handling and clean-up.  ``docs/performance.md`` has the figures.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import struct
import sys
import time

import msgpack

from ._memory import PAGE, page_round, set_pdeathsig

KiB, MiB = 1024, 1024 * 1024
SMALL, BIG, HUGE = 4 * KiB, 64 * MiB, 256 * MiB
WARMUP_SMALL = 20           # samples dropped per block, null / 4 KiB configs
WARMUP_BIG = 1              # samples dropped per block, 64 / 256 MiB configs
WARMUP_CREATE = 2           # creates dropped per block

# shared-memory header of the caller eapp (see eapps/bench_caller.py)
HDR = struct.Struct("<16Q")
MAGIC = 0x31424D5654
MODE = {"null": 0, "loan_4k": 1, "loan_64m": 2, "loan_256m": 3, "loan_256m_touch": 2}
#: bench_caller's modes by name (for sweeps of other sizes, see tvmrt._plot)
TOUCH_ONE, TOUCH_ALL, UNTOUCHED = 1, 2, 3
SERVER_NAME = "bench-server"

QUICK = {"calls": 400, "big_calls": 2, "rounds": 2, "creates": 10, "burst": 20}

#: config -> (label, size); the order is the order of the table
CONFIGS = {
    "null": ("null call", 0),
    "loan_4k": ("4 KiB loan", SMALL),
    "loan_64m": ("64 MiB loan, both touch", BIG),
    "loan_256m": ("256 MiB loan, untouched", HUGE),
    "loan_256m_touch": ("256 MiB loan, both touch", HUGE),
    "create": ("create-to-ready", 0),
    "relay_floor": ("floor: raw 4-hop relay", 0),
    "copy_4k": ("floor: 4 KiB socket copy", SMALL),
    "copy_64m": ("floor: 64 MiB socket copy", BIG),
    "copy_256m": ("floor: 256 MiB socket copy", HUGE),
}
#: tvmrt config -> its floors (rows of the same run), the first one is the primary one;
#: ``loan_4k`` as a floor means the 4 KiB loan of the same transfer mode
FLOORS = {
    "null": ("relay_floor",),
    "loan_4k": ("relay_floor", "copy_4k"),
    "loan_64m": ("copy_64m",),
    "loan_256m": ("loan_4k",),
    "loan_256m_touch": ("copy_256m",),
    "create": (),
}
BIG_CONFIGS = ("loan_64m", "copy_64m", "loan_256m_touch", "copy_256m")

#: tvmrt config -> (goal as the table shows it, as --json says it, checks); a check is
#: (kind, statistic, reference row, limit):
#:   "ratio":   statistic / the reference's same statistic <= limit
#:   "speedup": the reference's statistic / statistic >= limit
#:   "ms":      statistic in ms <= limit
GOALS = {
    "null": ("≤1.3× relay, p99 ≤2× relay p99",
             "median <= 1.3x the relay floor's median and p99 <= 2x the relay floor's p99",
             (("ratio", "median", "relay_floor", 1.3), ("ratio", "p99", "relay_floor", 2.0))),
    "loan_4k": ("≤1.5× relay", "median <= 1.5x the relay floor's median",
                (("ratio", "median", "relay_floor", 1.5),)),
    "loan_256m": ("≤2× 4 KiB loan", "median <= 2x the 4 KiB loan's median (same mode)",
                  (("ratio", "median", "loan_4k", 2.0),)),
    "loan_64m": ("copy ≥10× slower", "the 64 MiB copy floor's median >= 10x this median",
                 (("speedup", "median", "copy_64m", 10.0),)),
    "loan_256m_touch": ("copy ≥10× slower",
                        "the 256 MiB copy floor's median >= 10x this median",
                        (("speedup", "median", "copy_256m", 10.0),)),
    "create": ("≤3 ms", "median <= 3 ms", (("ms", "median", None, 3.0),)),
}


class BenchError(Exception):
    """The bench could not measure (a call failed, a floor process died, ...)."""


# ---------------------------------------------------------------------- statistics
def percentile(sorted_xs, q):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_xs:
        return float("nan")
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q / 100 * len(sorted_xs)) - 1))
    return sorted_xs[k]


def placement() -> str:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) == 1:
        return f"pinned to cpu {cpus[0]}"
    return "unpinned (CPUs " + ",".join(map(str, cpus)) + ")"


# ---------------------------------------------------------------------- floor processes
def _fork(fn, keep, *args) -> int:
    """Fork a child running ``fn(*args)`` with only ``keep`` fds (+ stdio) open.

    The child dies with this process (PR_SET_PDEATHSIG), ignores ^C (the parent
    stops it by closing its sockets), dies quietly of SIGTERM and never returns into
    the caller's code.
    """
    from ._progress import LOCK
    parent = os.getpid()
    with LOCK:                          # not while the progress line is being written
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # not the parent's unwinding one
        lo = 3
        for fd in sorted(keep):
            os.closerange(lo, fd)
            lo = fd + 1
        os.closerange(lo, 1 << 20)
        gc.disable()
        fn(*args)
        code = 0
    except BaseException:
        try:
            import traceback
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        os._exit(code)


def _relay_proc(client: socket.socket, server: socket.socket) -> None:
    """The blocking relay: recv client, validate, send server, recv, validate, send back."""
    unpackb = msgpack.unpackb
    crecv, csend, srecv, ssend = client.recv, client.send, server.recv, server.send
    while True:
        d = crecv(65536)
        if not d:
            return
        unpackb(d)
        ssend(d)
        d = srecv(65536)
        if not d:
            return
        unpackb(d)
        csend(d)


def _relay_server_proc(sock: socket.socket) -> None:
    unpackb, packb = msgpack.unpackb, msgpack.packb
    recv, send = sock.recv, sock.send
    while True:
        d = recv(65536)
        if not d:
            return
        m = unpackb(d)
        m["resp_val"] = m["req_arg"] + 1
        send(packb(m))


def _copy_server_proc(sock: socket.socket, size: int) -> None:
    """Receive ``size`` bytes into a warm buffer, touch them as bench-server does, send
    them all back."""
    buf = bytearray(size)
    mv = memoryview(buf)
    mv[::PAGE] = b"\1" * len(mv[::PAGE])        # fault the buffer in once
    pages = mv[::PAGE]
    npages = len(pages)
    recv_into, sendall = sock.recv_into, sock.sendall
    while True:
        got = 0
        while got < size:
            k = recv_into(mv[got:], size - got)
            if not k:
                return
            got += k
        if size <= PAGE:
            mv[0] = (mv[0] + 1) & 0xFF
        else:
            seen = bytes(pages)
            pages[:] = bytes(((seen[0] + 1) & 0xFF,)) * npages
        sendall(mv)


def _reap(pids, timeout: float) -> None:
    """Wait for ``pids`` to exit (they were told to), SIGKILL the ones still there at
    ``timeout`` seconds, reap them all."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while True:
            try:
                got, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if got:
                break
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
                break
            time.sleep(0.002)


def relay_client(sock: socket.socket, n: int, what: str = "relay floor") -> list[int]:
    """The relay floor's client: ``n`` round trips of a 6-field msgpack map through
    ``sock``; ns each.  Raises :class:`BenchError` on a wrong answer."""
    send, recv = sock.send, sock.recv
    packb, unpackb = msgpack.packb, msgpack.unpackb
    perf = time.perf_counter_ns
    out = [0] * n
    msg = {"req_arg": 0, "resp_val": 0, "req_vaddr": 0x7F3A_5C00_0000,
           "req_size": 0x1000, "resp_vaddr": 0x7F3A_5C40_0000, "resp_size": 0x1000}
    for i in range(n):
        msg["req_arg"] = i
        t0 = perf()
        send(packb(msg))
        r = unpackb(recv(65536))
        t1 = perf()
        out[i] = t1 - t0
        if r["resp_val"] != i + 1:
            raise BenchError(f"{what}: bad reply {r!r}")
    return out


class Floors:
    """The floor processes and their clients.  The relay and the 4 KiB / 64 MiB copy
    servers start in :meth:`start` (before any tvmrt process); a copy server of another
    size starts on its first :meth:`copy_block`, and one larger than 64 MiB is stopped
    again after its block (:meth:`drop_copy`), so that its buffers are not held while
    the rest runs.  :meth:`stop` ends every process."""

    KEEP = (SMALL, BIG)                 # copy servers that live for the whole run

    def __init__(self):
        self.pids: list[int] = []
        self.relay: socket.socket | None = None
        self.copy: dict[int, socket.socket] = {}
        self.copy_pid: dict[int, int] = {}
        self.bufs: dict[int, tuple[memoryview, memoryview]] = {}

    def start(self) -> Floors:
        cli, rel_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.relay = cli
        rel_s, srv = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pids.append(_fork(_relay_server_proc, [srv.fileno()], srv))
            self.pids.append(_fork(_relay_proc, [rel_c.fileno(), rel_s.fileno()],
                                   rel_c, rel_s))
        finally:
            for s in (rel_c, rel_s, srv):
                s.close()
        for size in self.KEEP:
            self._start_copy(size)
        return self

    def _start_copy(self, size: int) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.copy[size] = a
        try:
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
            pid = _fork(_copy_server_proc, [b.fileno()], b, size)
            self.pids.append(pid)
            self.copy_pid[size] = pid
        finally:
            b.close()
        snd = memoryview(bytearray(size))
        snd[::PAGE] = b"\1" * len(snd[::PAGE])
        if size > BIG:                  # one buffer: sent from, received into
            rcv = snd
        else:
            rcv = memoryview(bytearray(size))
            rcv[::PAGE] = b"\1" * len(rcv[::PAGE])
        self.bufs[size] = (snd, rcv)

    def drop_copy(self, size: int) -> None:
        """Stop the copy server of ``size`` and free its buffers (a no-op for the ones
        kept for the whole run)."""
        if size in self.KEEP or size not in self.copy:
            return
        self.copy.pop(size).close()     # the server sees EOF and exits
        self.bufs.pop(size, None)
        pid = self.copy_pid.pop(size)
        _reap([pid], 5.0)
        self.pids.remove(pid)

    def relay_block(self, n: int) -> list[int]:
        return relay_client(self.relay, n)

    def copy_block(self, size: int, n: int, warm: int) -> tuple[list[int], int]:
        if size not in self.copy:
            self._start_copy(size)
        sock = self.copy[size]
        snd, rcv = self.bufs[size]
        sendall, recv_into = sock.sendall, sock.recv_into
        perf = time.perf_counter_ns
        out = [0] * n
        pages = snd[::PAGE]
        npages = len(pages)
        prewrite = 0
        for i in range(n):
            v = i & 0xFF
            if size > PAGE:
                w0 = perf()
                pages[:] = bytes((v,)) * npages
                if i >= warm:
                    prewrite += perf() - w0
            else:
                snd[0] = v
            t0 = perf()
            sendall(snd)
            got = 0
            while got < size:
                k = recv_into(rcv[got:], size - got)
                if not k:
                    raise BenchError("copy floor: the server closed the connection")
                got += k
            t1 = perf()
            out[i] = t1 - t0
            if rcv[0] != (v + 1) & 0xFF or rcv[size - PAGE] != (v + 1) & 0xFF:
                raise BenchError("copy floor: the server did not touch the data")
        return out, prewrite

    def stop(self, timeout: float = 5.0) -> None:
        """Close the client ends (the children see EOF and exit), reap; SIGKILL laggards."""
        for s in [self.relay, *self.copy.values()]:
            if s is not None:
                s.close()
        self.relay = None
        self.copy.clear()
        self.copy_pid.clear()
        self.bufs.clear()
        _reap(self.pids, timeout)
        self.pids.clear()


# ---------------------------------------------------------------------- tvmrt side
class Tvm:
    """A private embedded monitor, bench-server and a shm region for the samples."""

    def __init__(self, max_n: int, sandbox: bool = True, isolation: str = "mprotect"):
        self.max_n = max_n
        self.sandbox = sandbox
        self.isolation = isolation
        self.state = None               # the enclaves' sandbox, as ps shows it
        self.host = None
        self.shm = None
        self.blocks = 0
        self.caller_cpu_ns = 0          # CPU time of the last block's caller loop

    def start(self, prelude: str = "") -> Tvm:
        """Start the monitor (with ``prelude``: see
        :attr:`tvmrt._embedded.EmbeddedMonitor.prelude`), the server and the shm."""
        from ._embedded import EmbeddedMonitor
        from .host import SERVER, Host
        self.host = Host._owning(EmbeddedMonitor(sandbox=self.sandbox,
                                                isolation=self.isolation, prelude=prelude))
        self.state = self.host.ps().get("sandbox")
        self.shm = self.host.shmget(page_round(HDR.size + 8 * self.max_n))
        self.host.create("bench_server", name=SERVER_NAME, type=SERVER)
        return self

    def block(self, config: str, n: int, warm: int) -> tuple[list[int], int]:
        """Run one caller enclave doing ``n`` calls of ``config``; returns (ns per call,
        ns spent writing the pages before the calls after the first ``warm``).  The
        ``create`` config times ``n`` creates instead (no prewrite)."""
        if config == "create":
            from . import _scale
            self.blocks += 1
            return _scale.create_to_ready(self.host, n, prefix=f"ready{self.blocks}"), 0
        return self.calls(MODE[config], CONFIGS[config][1], n, warm, config)

    def live_done(self) -> int:
        """Calls the running block's caller has made so far (it writes the count every
        128 calls), for the progress display; another thread may call this."""
        return struct.unpack_from("<Q", self.shm.view, 5 * 8)[0]

    def burst(self, n: int, live=None) -> float:
        """Create ``n`` idle enclaves back to back; the seconds it took.  They are all
        destroyed again before this returns (also when a create fails)."""
        from . import _scale
        made: list = []
        try:
            return _scale.create_idle(self.host, n, made, prefix="burst", live=live)
        finally:
            _scale.cleanup(made)

    def calls(self, mode: int, size: int, n: int, warm: int,
              config: str = "calls") -> tuple[list[int], int]:
        """:meth:`block` for any bench_caller ``mode`` (:data:`MODE`) and region size."""
        view = self.shm.view
        HDR.pack_into(view, 0, MAGIC, mode, n, size, 0, 0, 0, warm, *[0] * 8)
        self.blocks += 1
        enc = self.host.create("bench_caller", name=f"bench-c{self.blocks % 100000}",
                               shm=self.shm)
        rv = enc.run()
        hdr = HDR.unpack_from(view, 0)
        status, done, prewrite, self.caller_cpu_ns = hdr[4], hdr[5], hdr[6], hdr[8]
        if status:
            code = status - (1 << 64) if status >= 1 << 63 else status
            if status == 1 << 63 | 0xDA7A:
                raise BenchError(f"{config}: the data did not move as expected "
                                 f"(after {done} calls)")
            raise BenchError(f"{config}: call_enclave failed with {code} after {done} calls")
        if rv != 0 or done != n:
            raise BenchError(f"{config}: the caller exited {rv} after {done}/{n} calls")
        samples = view[HDR.size:HDR.size + 8 * n].cast("Q").tolist()
        return samples, prewrite

    def stop(self) -> None:
        if self.host is not None:
            self.host.close()           # stops the embedded monitor: enclaves die with it
            self.host = None


# ---------------------------------------------------------------------- the run
def counts(ns) -> dict:
    """The counts of a run from the command line's options (``--quick``: small ones)."""
    c = {"calls": getattr(ns, "calls", 20000), "big_calls": getattr(ns, "big_calls", 20),
         "rounds": getattr(ns, "rounds", 3), "creates": getattr(ns, "creates", 50),
         "burst": 200}
    if getattr(ns, "quick", False):
        c = dict(QUICK)
    if getattr(ns, "burst", None) is not None:
        c["burst"] = ns.burst
    if c["calls"] < 1 or c["big_calls"] < 1 or c["rounds"] < 1 or c["creates"] < 1:
        raise BenchError("--calls, --big-calls, --creates and --rounds must be at least 1")
    if not 0 <= c["burst"] <= 1000:
        raise BenchError("--burst must be 0 .. 1000 (a host may have 1024 enclaves)")
    return c


#: a pseudo transfer mode for ``--sandbox-cost``: the default (mprotect) transfers with
#: the enclaves unsandboxed, so that the sandbox's cost is a ratio of the same run
NOSANDBOX = "nosandbox"


def row_key(k: str, mode: str) -> str:
    """The row of tvmrt config ``k`` in transfer mode ``mode``."""
    return k if mode == "mprotect" else f"{mode}_{k}"


SHORT = {"relay_floor": "relay", "copy_4k": "4 KiB copy", "copy_64m": "64 MiB copy",
         "copy_256m": "256 MiB copy", "loan_4k": "4 KiB loan"}


def check_goal(k: str, mode: str, stats: dict) -> dict | None:
    """The goal of tvmrt config ``k`` in ``mode`` checked against ``stats`` (row ->
    (n, median µs, p99 µs)): {"goal": text, "goal_short": as the table says it,
    "checks": [{"kind", "stat", "ref", "limit", "value", "met"}...], "met": bool}, or None when
    ``k`` has no goal (see :data:`GOALS`)."""
    if k not in GOALS:
        return None
    short, text, checks = GOALS[k]
    _n, med, p99 = stats[row_key(k, mode)]
    mine = {"median": med, "p99": p99}
    out = []
    for kind, stat, ref, limit in checks:
        if kind == "ms":
            value = mine[stat] / 1000
            met = value <= limit
        else:
            rkey = row_key(ref, mode) if ref in FLOORS else ref
            theirs = stats[rkey][1 if stat == "median" else 2]
            value = mine[stat] / theirs if kind == "ratio" else theirs / mine[stat]
            met = value <= limit if kind == "ratio" else value >= limit
        out.append({"kind": kind, "stat": stat, "ref": ref, "limit": limit,
                    "value": round(value, 3), "met": met})
    return {"goal": text, "goal_short": short, "checks": out,
            "met": all(c["met"] for c in out)}


def measure(c: dict, progress=None, sandbox: bool = True,
            isolations: tuple[str, ...] = ("mprotect",)) -> dict:
    """Run every config ``c["rounds"]`` times; returns the result dict (see :func:`main`).
    ``progress``: a :class:`tvmrt._progress.Progress` (or None).  ``sandbox=False``: the
    embedded monitor runs the enclaves unsandboxed.  The tvmrt configs run in each mode
    of ``isolations`` (rows :func:`row_key`), one embedded monitor per mode and round (a
    process maps the regions of one monitor at a time), the floors between them; the
    creation burst (``c["burst"]`` enclaves, 0: none) runs once, in the first mode, in
    the last round."""
    rounds = c["rounds"]
    tvm_keys = [k for k in CONFIGS if k in FLOORS]
    floor_keys = [k for k in CONFIGS if k not in FLOORS]

    def split(total, r):
        """Measured calls of round ``r``: ``total`` spread over the rounds (at least 1)."""
        return max(1, total // rounds + (r < total % rounds))

    def plan(k, r):
        if k in BIG_CONFIGS:
            return split(c["big_calls"], r), WARMUP_BIG
        if k == "loan_256m":            # cheap when untouched: more calls, still few
            return split(max(c["big_calls"], c["calls"] // 20), r), 5
        if k == "create":
            return split(c["creates"], r), WARMUP_CREATE
        return split(c["calls"], r), WARMUP_SMALL

    max_n = max(n + w for n, w in (plan(k, 0) for k in CONFIGS))
    keys = floor_keys + [row_key(k, m) for m in isolations for k in tvm_keys]
    pooled: dict[str, list] = {k: [] for k in keys}
    prewrite = {row_key(k, m): [0, 0] for k in BIG_CONFIGS if k in FLOORS
                for m in isolations}
    floors = tvm = None
    state = None
    burst = None
    t_start = time.monotonic()
    if progress is not None:
        progress.total = sum(sum(plan(k, r)) * (len(isolations) if k in FLOORS else 1)
                             for r in range(rounds) for k in CONFIGS) + c["burst"]

    def show(key, n, warm, r):
        if progress is not None:
            progress.show(f"{key} ({n}+{warm})", f"round {r + 1}/{rounds}")

    def record(key, s, pw, n, warm):
        pooled[key].extend(s[warm:])
        if key in prewrite:
            prewrite[key][0] += pw
            prewrite[key][1] += n
        if progress is not None:
            progress.done += n + warm

    try:
        floors = Floors()
        floors.start()                  # before the host: they inherit no tvmrt fd
        for r in range(rounds):
            rng = random.Random(r)
            modes = list(isolations[r % len(isolations):] + isolations[:r % len(isolations)])
            fl = list(floor_keys)
            rng.shuffle(fl)
            # floors spread between the modes' blocks: [f..] mode [f..] mode [f..]
            gaps = len(modes) + 1
            chunks = [fl[i::gaps] for i in range(gaps)]
            for step in range(gaps):
                for k in chunks[step]:
                    n, warm = plan(k, r)
                    show(k, n, warm, r)
                    gc.collect()
                    gc.disable()
                    try:
                        if k == "relay_floor":
                            s, pw = floors.relay_block(n + warm), 0
                        else:
                            s, pw = floors.copy_block(CONFIGS[k][1], n + warm, warm)
                    finally:
                        gc.enable()
                        if k != "relay_floor":
                            floors.drop_copy(CONFIGS[k][1])
                    record(k, s, pw, n, warm)
                if step == len(modes):
                    break
                mode = modes[step]
                if mode == NOSANDBOX:
                    tvm = Tvm(max_n, False, "mprotect")
                else:
                    tvm = Tvm(max_n, sandbox, mode)
                tvm.start()
                if mode != NOSANDBOX or state is None:
                    state = tvm.state
                order = list(tvm_keys)
                rng.shuffle(order)
                for k in order:
                    n, warm = plan(k, r)
                    key = row_key(k, mode)
                    show(key, n, warm, r)
                    gc.collect()
                    gc.disable()
                    if progress is not None and k != "create":
                        progress.poll = tvm.live_done
                    try:
                        s, pw = tvm.block(k, n + warm, warm)
                    finally:
                        gc.enable()
                        if progress is not None:
                            progress.poll = None
                    record(key, s, pw, n, warm)
                if r == rounds - 1 and mode == isolations[0] and c["burst"]:
                    nb = c["burst"]
                    done0 = progress.done if progress is not None else 0

                    def live(done, total, done0=done0):
                        if progress is not None:
                            progress.done = done0 + done
                            progress.show(f"burst of {total} creates", "last round")
                    live(0, nb)
                    took = tvm.burst(nb, live)
                    burst = {"n": nb, "seconds": round(took, 3),
                             "per_s": round(nb / took, 1), "isolation": mode}
                    if progress is not None:
                        progress.done = done0 + nb
                tvm.stop()
                tvm = None
    finally:
        if tvm is not None:
            tvm.stop()
        if floors is not None:
            floors.stop()
    elapsed = time.monotonic() - t_start

    stats = {}
    for k, xs in pooled.items():
        xs.sort()
        stats[k] = (len(xs), statistics.median(xs) / 1000, percentile(xs, 99) / 1000)
    rows = []
    met = []
    for k, (label, _size) in CONFIGS.items():
        for mode in (isolations if k in FLOORS else (None,)):
            key = k if mode is None else row_key(k, mode)
            n, med, p99 = stats[key]
            lab = label if mode in (None, "mprotect") else \
                f"{label} [{'no sandbox' if mode == NOSANDBOX else mode}]"
            row = {"config": key, "label": lab, "n": n, "median_us": round(med, 3),
                   "p99_us": round(p99, 3), "floor": None, "ratio": None,
                   "goal": None, "met": None}
            if mode is not None:
                row["isolation"] = mode
            fl = FLOORS.get(k)
            if fl:
                refs = {f: row_key(f, mode) if f in FLOORS else f for f in fl}
                ratios = {f: round(med / stats[refs[f]][1], 3) for f in fl}
                row["floor"], row["ratio"] = refs[fl[0]], ratios[fl[0]]
                row["ratios"] = ratios
            if mode is not None and mode != isolations[0]:
                # the same call in the first mode of the run: strict's cost, shown
                base = stats[row_key(k, isolations[0])][1]
                row["vs_" + isolations[0]] = round(med / base, 3)
            g = check_goal(k, mode, stats) if mode is not None else None
            if g is not None:
                row.update(g)
                met.append((key, g["met"]))
            if key in prewrite and prewrite[key][1]:
                row["prewrite_mean_us"] = round(prewrite[key][0] / prewrite[key][1] / 1000,
                                                3)
            rows.append(row)
    return {
        "placement": placement(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "rounds": rounds,
        "sandbox": state,
        "isolations": list(isolations),
        "warmup_per_block": {k: plan(k, 0)[1] for k in CONFIGS},
        "rows": rows,
        "goals": {"met": sum(m for _k, m in met), "total": len(met),
                  "not_met": [k for k, m in met if not m]},
        "burst": burst,
        "elapsed_s": round(elapsed, 2),
    }


def _measured(row: dict) -> str:
    """What the goal's checks measured, as the met column shows it."""
    out = []
    for ch in row.get("checks", ()):
        if ch["kind"] == "ms":
            out.append(f"{ch['value']:.2f} ms")
        elif ch["kind"] == "speedup":
            out.append(f"copy {ch['value']:.1f}×")
        else:
            p = "p99 " if ch["stat"] == "p99" else ""
            out.append(f"{p}{ch['value']:.2f}×")
    return ", ".join(out)


def format_table(res: dict) -> str:
    lines = [f"tvmrt bench: {res['placement']}, {res['implementation']} {res['python']}, "
             f"isolation {'+'.join(res.get('isolations', ['mprotect']))}, "
             f"{res['rounds']} rounds, {res['elapsed_s']:.1f} s, sandbox {res['sandbox']}",
             "",
             f"{'row':34} {'n':>6} {'median µs':>11} {'p99 µs':>11}  {'goal':30} "
             f"{'met':26} ratio"]
    for r in res["rows"]:
        ratio = ""
        if r.get("ratios"):
            ratio = ", ".join(f"{v:.2f}× {SHORT.get(f, f)}" for f, v in r["ratios"].items())
        for k, v in r.items():
            if k.startswith("vs_"):
                ratio += f"{'; ' if ratio else ''}{v:.2f}× {k[3:]}"
        met = ""
        if r["met"] is not None:
            met = f"{'met' if r['met'] else 'NOT met'} ({_measured(r)})"
        lines.append(f"{r['label']:34} {r['n']:>6} {r['median_us']:>11.1f} "
                     f"{r['p99_us']:>11.1f}  {r.get('goal_short') or '':30} {met:26} "
                     f"{ratio}".rstrip())
    g = res["goals"]
    lines.append("")
    lines.append(f"goals: {g['met']} of {g['total']} met" +
                 (f"; not met: {', '.join(g['not_met'])}" if g["not_met"] else "") +
                 " (medians against this run's medians, p99 against the relay floor's "
                 "p99; docs/performance.md)")
    b = res.get("burst")
    if b:
        lines.append(f"burst: {b['n']} enclaves created back to back in {b['seconds']:.2f} s, "
                     f"{b['per_s']:.0f} enclaves/s ({b['isolation']})")
    notes = [r for r in res["rows"] if "prewrite_mean_us" in r]
    if notes:
        lines.append("not timed, before each touched call: writing 1 byte per page took " +
                     ", ".join(f"{r['prewrite_mean_us'] / 1000:.2f} ms ({r['config']})"
                               for r in notes))
    return "\n".join(lines)


_interrupted = []


def _sigterm(signum, frame):
    _interrupted.append(signum)
    raise SystemExit(128 + signum)      # unwinds through measure()'s finally: clean up


def _sigint(signum, frame):
    _interrupted.append(signum)
    raise KeyboardInterrupt


def main(ns) -> int:
    """``tvmrt bench``: run, print the table (or JSON); ``--peers`` and ``--plot`` add
    their tables (JSON: ``peers``, ``plot``) to the main one's, in the same run;
    0 whether the goals are met or not, 1 if it could not measure, 130 on ^C.  Every
    process and file it made is gone when it returns, also on ^C/SIGTERM."""
    old = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, _sigterm),
                                               (signal.SIGINT, _sigint))}
    try:
        return _main(ns)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _main(ns) -> int:
    from ._progress import Progress
    as_json = getattr(ns, "json", False)
    try:
        c = counts(ns)
        sandbox = not getattr(ns, "no_sandbox", False)
        with Progress(enabled=not as_json) as progress:
            plot = getattr(ns, "plot", None)
            if plot:
                from . import _plot
                _plot.require(plot)             # before the run, not after it
            # the main table always; --peers and --plot add theirs, in the same run
            iso = getattr(ns, "isolation", "both") or "both"
            isolations = ("mprotect", "strict") if iso == "both" else (iso,)
            if getattr(ns, "sandbox_cost", False) and sandbox:
                isolations += (NOSANDBOX,)
            res = measure(c, progress, sandbox=sandbox, isolations=isolations)
            tables = [format_table(res)]
            if getattr(ns, "peers", False):
                from . import _peers
                progress.next_phase()
                calls = c["calls"] if c["calls"] != 20000 else 5000
                res["peers"] = _peers.measure(n=calls, rounds=c["rounds"], sandbox=sandbox,
                                              big_calls=c["big_calls"], progress=progress)
                tables.append(_peers.format_table(res["peers"]))
            if plot:
                progress.next_phase()
                res["plot"] = _plot.sweep(quick=getattr(ns, "quick", False),
                                          sandbox=sandbox, progress=progress)
                _plot.draw(res["plot"], plot)
                res["plot"]["file"] = plot
                tables.append(_plot.format_table(res["plot"]) + f"\nwrote {plot}")
            if not as_json:
                progress.clear()
                print("\n\n".join(tables), flush=True)
            if getattr(ns, "throughput", False) or getattr(ns, "scale", None):
                progress.next_phase()
                res.update(_scale_sections(ns, progress, as_json, sandbox))
    except KeyboardInterrupt:
        print("tvmrt bench: interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"tvmrt bench: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from .errors import TvmError
        if _interrupted:            # ^C reached the monitor first: it closed on us
            print("tvmrt bench: interrupted", file=sys.stderr)
            return 130
        if isinstance(exc, TvmError):
            print(f"tvmrt bench: {type(exc).__name__}: {exc.reason}", file=sys.stderr)
            return 1
        raise
    if as_json:
        print(json.dumps(res, default=str))
    return 0


def _scale_sections(ns, live, as_json: bool, sandbox: bool) -> dict:
    """``--throughput`` / ``--scale N`` (see :mod:`tvmrt._scale`), on a private monitor
    of their own: their lines printed as they come (unless ``as_json``); returns their
    figures (``pairs``, ``instances``, ``scale``) for the JSON."""
    from . import _scale
    from .cli import _size
    from .host import Host
    out: dict = {}
    with Host.connect(embedded=True, sandbox=sandbox) as host:
        def say(*a):
            if not as_json:
                live.clear()
                print(*a, flush=True)

        shown = ["scale"]

        def step(text):                 # a line of the table, then the live line again
            say(text)
            live.show(shown[0])

        def now(what):
            shown[0] = what
            live.show(what)

        if getattr(ns, "throughput", False):
            say("\nthroughput (aggregate calls/s, callers start together):")
            calls = getattr(ns, "calls", 20000)
            t = _scale.throughput(host, calls=calls if calls != 20000 else 4000,
                                  progress=step, live=now)
            out["pairs"] = t["pairs"]
            out["instances"] = {f"{k} instances, {w} us work": v
                                for (k, w), v in t["instances"].items()}
        n = getattr(ns, "scale", None)
        if n:
            say(f"\nscale ({n} live enclaves):")
            now("scale: the rate with 10 live enclaves")
            then = [f"scale: creating {n - 10} enclaves",
                    f"scale: the rate with {n} live enclaves", "scale: memory"]

            def scale_step(text):       # scale() says three lines: what comes after each
                shown[0] = then.pop(0) if then else shown[0]
                step(text)

            r = out["scale"] = _scale.scale(
                host, n, progress=scale_step,
                live=lambda done, total: live.show("scale: creating enclaves", "", done,
                                                   total, "enclaves"))
            mib = 2 ** 20
            say(f"  one pair at {n} live: {r['rate_n'] / r['rate_10']:.0%} of its "
                f"rate at 10; monitor RSS {r['monitor_rss'] / mib:.1f} MiB; per enclave "
                f"RSS {_size(r['enclave_rss'])}, USS {_size(r['enclave_uss'])}")
    return out

