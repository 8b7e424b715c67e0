"""``tvmrt bench``: call_enclave latency against floors measured in the same run.

Three tvmrt call shapes, each timed call by call inside a caller enclave
(``eapps/bench_caller.py``) calling ``bench-server`` (``eapps/bench_server.py``)
through a private embedded monitor:

* ``null``      call_enclave with req_vaddr = 0 (registers only);
* ``loan_4k``   a 4 KiB ``eapp_mmap`` region loaned on every call, the server touches
                one byte;
* ``loan_64m``  a 64 MiB region loaned on every call; before each call the caller
                writes one byte in every page (not timed), the server reads and writes
                one byte in every page (timed, it is inside the call).

Floors, written without tvmrt (plain ``socket``, ``msgpack``, ``os.fork``):

* ``relay_floor``  client -> relay -> server -> relay -> client over SOCK_SEQPACKET,
                   three processes, a blocking relay that ``msgpack.unpackb``s every
                   frame it forwards; 6-field dict packed/unpacked at both ends
                   (floors.md 1b, "blocking relay thread, SEQPACKET");
* ``copy_4k`` / ``copy_64m``  the same bytes copied through an AF_UNIX SOCK_STREAM
                   socketpair (4 MiB buffers) to a server that ``recv_into``s a
                   preallocated buffer, touches it like bench-server does, and sends
                   it all back into the client's preallocated buffer.

The tvmrt rows run in each transfer mode asked for (``--isolation``: both by default,
the default ``mprotect`` mode's rows keep their names, strict mode's are ``strict_null``
etc.), against the same floors: one embedded monitor per mode and round, the floors
interleaved between the modes' blocks.

Every config runs one block per round, rounds in a shuffled order (seeded by the
round number); the first samples of every block are dropped as warm-up and the rest
are pooled.  Every process inherits this process's CPU affinity, so
``taskset -c 0 tvmrt bench`` measures co-located processes.
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
SMALL, BIG = 4 * KiB, 64 * MiB
WARMUP_SMALL = 20           # samples dropped per block, null / 4 KiB configs
WARMUP_BIG = 1              # samples dropped per block, 64 MiB configs
TARGET = 1.5                # null call <= TARGET x relay floor

# shared-memory header of the caller eapp (see eapps/bench_caller.py)
HDR = struct.Struct("<16Q")
MAGIC = 0x31424D5654
MODE = {"null": 0, "loan_4k": 1, "loan_64m": 2}
SERVER_NAME = "bench-server"

QUICK = {"calls": 400, "big_calls": 2, "rounds": 2}

#: config -> (label, size); the order is the order of the table
CONFIGS = {
    "null": ("null call", 0),
    "loan_4k": ("4 KiB loan", SMALL),
    "loan_64m": ("64 MiB loan, both touch", BIG),
    "relay_floor": ("floor: raw 4-hop relay", 0),
    "copy_4k": ("floor: 4 KiB socket copy", SMALL),
    "copy_64m": ("floor: 64 MiB socket copy", BIG),
}
#: tvmrt config -> its floors, the first one is the primary one
FLOORS = {
    "null": ("relay_floor",),
    "loan_4k": ("relay_floor", "copy_4k"),
    "loan_64m": ("copy_64m",),
}
BIG_CONFIGS = ("loan_64m", "copy_64m")


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
    stops it by closing its sockets) and never returns into the caller's code.
    """
    parent = os.getpid()
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


class Floors:
    """The floor processes (started once, before any tvmrt process) and their clients."""

    def __init__(self):
        self.pids: list[int] = []
        self.relay: socket.socket | None = None
        self.copy: dict[int, socket.socket] = {}
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
        for size in (SMALL, BIG):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.copy[size] = a
            try:
                for s in (a, b):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
                self.pids.append(_fork(_copy_server_proc, [b.fileno()], b, size))
            finally:
                b.close()
            snd, rcv = memoryview(bytearray(size)), memoryview(bytearray(size))
            snd[::PAGE] = b"\1" * len(snd[::PAGE])
            rcv[::PAGE] = b"\1" * len(rcv[::PAGE])
            self.bufs[size] = (snd, rcv)
        return self

    def relay_block(self, n: int) -> list[int]:
        sock = self.relay
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
                raise BenchError(f"relay floor: bad reply {r!r}")
        return out

    def copy_block(self, size: int, n: int, warm: int) -> tuple[list[int], int]:
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
        self.bufs.clear()
        deadline = time.monotonic() + timeout
        for pid in self.pids:
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

    def start(self) -> Tvm:
        from .host import SERVER, Host
        self.host = Host.connect(embedded=True, sandbox=self.sandbox,
                                 isolation=self.isolation)
        self.state = self.host.ps().get("sandbox")
        self.shm = self.host.shmget(page_round(HDR.size + 8 * self.max_n))
        self.host.create("bench_server", name=SERVER_NAME, type=SERVER)
        return self

    def block(self, config: str, n: int, warm: int) -> tuple[list[int], int]:
        """Run one caller enclave doing ``n`` calls; returns (ns per call, ns spent
        writing the pages before the calls after the first ``warm``)."""
        mode = MODE[config]
        size = CONFIGS[config][1]
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
    c = {"calls": getattr(ns, "calls", 20000), "big_calls": getattr(ns, "big_calls", 20),
         "rounds": getattr(ns, "rounds", 3)}
    if getattr(ns, "quick", False):
        c = dict(QUICK)
    if c["calls"] < 1 or c["big_calls"] < 1 or c["rounds"] < 1:
        raise BenchError("--calls, --big-calls and --rounds must be at least 1")
    return c


def row_key(k: str, mode: str) -> str:
    """The row of tvmrt config ``k`` in transfer mode ``mode``."""
    return k if mode == "mprotect" else f"{mode}_{k}"


def measure(c: dict, progress=None, sandbox: bool = True,
            isolations: tuple[str, ...] = ("mprotect",)) -> dict:
    """Run every config ``c["rounds"]`` times; returns the result dict (see :func:`main`).
    ``sandbox=False``: the embedded monitor runs the enclaves unsandboxed.  The tvmrt
    configs run in each mode of ``isolations`` (rows :func:`row_key`), one embedded
    monitor per mode and round (a process maps the regions of one monitor at a time),
    the floors between them."""
    rounds = c["rounds"]
    tvm_keys = [k for k in CONFIGS if k in FLOORS]
    floor_keys = [k for k in CONFIGS if k not in FLOORS]

    def split(total, r):
        """Measured calls of round ``r``: ``total`` spread over the rounds (at least 1)."""
        return max(1, total // rounds + (r < total % rounds))

    def plan(k, r):
        if k in BIG_CONFIGS:
            return split(c["big_calls"], r), WARMUP_BIG
        return split(c["calls"], r), WARMUP_SMALL

    max_n = max(n + w for n, w in (plan(k, 0) for k in CONFIGS))
    keys = floor_keys + [row_key(k, m) for m in isolations for k in tvm_keys]
    pooled: dict[str, list] = {k: [] for k in keys}
    prewrite = {row_key(k, m): [0, 0] for k in BIG_CONFIGS if k in FLOORS
                for m in isolations}
    floors = tvm = None
    state = None
    t_start = time.monotonic()

    def record(key, k, s, pw, n, warm, r):
        pooled[key].extend(s[warm:])
        if key in prewrite:
            prewrite[key][0] += pw
            prewrite[key][1] += n
        if progress:
            progress(f"round {r + 1}/{rounds}: {key} {n}+{warm} calls, "
                     f"median {statistics.median(s[warm:]) / 1000:.1f} µs")

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
                    gc.collect()
                    gc.disable()
                    try:
                        if k == "relay_floor":
                            s, pw = floors.relay_block(n + warm), 0
                        else:
                            s, pw = floors.copy_block(CONFIGS[k][1], n + warm, warm)
                    finally:
                        gc.enable()
                    record(k, k, s, pw, n, warm, r)
                if step == len(modes):
                    break
                mode = modes[step]
                tvm = Tvm(max_n, sandbox, mode)
                tvm.start()
                state = tvm.state
                order = list(tvm_keys)
                rng.shuffle(order)
                for k in order:
                    n, warm = plan(k, r)
                    gc.collect()
                    gc.disable()
                    try:
                        s, pw = tvm.block(k, n + warm, warm)
                    finally:
                        gc.enable()
                    record(row_key(k, mode), k, s, pw, n, warm, r)
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
    for k, (label, _size) in CONFIGS.items():
        for mode in (isolations if k in FLOORS else (None,)):
            key = k if mode is None else row_key(k, mode)
            n, med, p99 = stats[key]
            lab = label if mode in (None, "mprotect") else f"{label} [{mode}]"
            row = {"config": key, "label": lab, "n": n, "median_us": round(med, 3),
                   "p99_us": round(p99, 3), "floor": None, "ratio": None}
            if mode is not None:
                row["isolation"] = mode
            fl = FLOORS.get(k)
            if fl:
                ratios = {f: round(med / stats[f][1], 3) for f in fl}
                row["floor"], row["ratio"] = fl[0], ratios[fl[0]]
                row["ratios"] = ratios
                if mode != isolations[0]:
                    # the same call in the first mode of the run: strict's cost, shown
                    base = stats[row_key(k, isolations[0])][1]
                    row["vs_" + isolations[0]] = round(med / base, 3)
            if key in prewrite and prewrite[key][1]:
                row["prewrite_mean_us"] = round(prewrite[key][0] / prewrite[key][1] / 1000,
                                                3)
            rows.append(row)
    null_ratio = stats[row_key("null", isolations[0])][1] / stats["relay_floor"][1]
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
        "target": {"what": f"null call ({isolations[0]}) median <= 1.5 x relay floor "
                           f"median",
                   "limit": TARGET, "ratio": round(null_ratio, 3),
                   "met": null_ratio <= TARGET},
        "elapsed_s": round(elapsed, 2),
    }


def format_table(res: dict) -> str:
    lines = [f"tvmrt bench: {res['placement']}, {res['implementation']} {res['python']}, "
             f"isolation {'+'.join(res.get('isolations', ['mprotect']))}, "
             f"{res['rounds']} rounds, {res['elapsed_s']:.1f} s, sandbox {res['sandbox']}",
             "",
             f"{'config':36} {'n':>7} {'median µs':>11} {'p99 µs':>11}  ratio"]
    for r in res["rows"]:
        ratio = ""
        if r.get("ratios"):
            ratio = ", ".join(f"{v:.2f}× {CONFIGS[f][0].removeprefix('floor: ')}"
                              for f, v in r["ratios"].items())
            vs = [(k, v) for k, v in r.items() if k.startswith("vs_")]
            for k, v in vs:
                ratio += f"; {v:.2f}× {k[3:]}"
        lines.append(f"{r['label']:36} {r['n']:>7} {r['median_us']:>11.1f} "
                     f"{r['p99_us']:>11.1f}  {ratio}")
    t = res["target"]
    lines.append("")
    lines.append(f"target: null call ≤ {t['limit']}× relay floor: "
                 f"{'met' if t['met'] else 'not met'} ({t['ratio']:.2f}×)")
    notes = [r for r in res["rows"] if "prewrite_mean_us" in r]
    if notes:
        lines.append("not timed, before each 64 MiB call: writing 1 byte per page took " +
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
    """``tvmrt bench``: run, print the table (or JSON); 0, or 1 if it could not measure,
    130 on ^C.  Every process it started is gone when it returns, also on ^C/SIGTERM."""
    old = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, _sigterm),
                                               (signal.SIGINT, _sigint))}
    try:
        return _main(ns)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _main(ns) -> int:
    try:
        c = counts(ns)
        progress = None
        if not getattr(ns, "json", False) and sys.stderr.isatty():
            def progress(text):
                print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
        try:
            iso = getattr(ns, "isolation", "both") or "both"
            isolations = ("mprotect", "strict") if iso == "both" else (iso,)
            res = measure(c, progress, sandbox=not getattr(ns, "no_sandbox", False),
                          isolations=isolations)
        finally:
            if progress:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
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
    if getattr(ns, "json", False):
        print(json.dumps(res))
    else:
        print(format_table(res))
    return 0
