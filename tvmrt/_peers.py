"""``tvmrt bench --peers``: the null request-response of the Python IPC people use today,
measured in the same run as tvmrt's null ``call_enclave`` and the raw relay floor, and
iceoryx2's 64 MiB loan next to tvmrt's.

Each peer is a client in this process and a server process answering an 8-byte request
with an 8-byte reply: ``multiprocessing.Pipe``, pyzmq REQ/REP over ``ipc://`` directly,
pyzmq REQ -> ``zmq.proxy`` (ROUTER/DEALER) -> REP, a broker like tvmrt's monitor, and
iceoryx2 request-response woken by iceoryx2 events (:mod:`tvmrt._iox2`).  The 64 MiB
rows: tvmrt's ``loan_64m`` (:mod:`tvmrt.bench`) and iceoryx2 loaning 64 MiB both ways,
every page touched on both sides.  pyzmq and iceoryx2 are optional (``pip install
'tvmrt[peers]'``); without them their rows say "not installed".  Rounds are interleaved
(relay, tvmrt, peers, relay, ...) so that a slow moment of the machine hits every row
alike.

Every row has its ratio to the same run's relay floor (median to median); the goals of
issue 8 shown under the table: tvmrt's null call faster (median) than iceoryx2's and
pyzmq's direct request-response, and tvmrt's 64 MiB loan's ratio to iceoryx2's.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time

from . import _iox2, bench
from ._memory import set_pdeathsig
from ._progress import LOCK

MSG = b"\0" * 8
IOX_NULL = "iceoryx2 request-response"
IOX_64M = "iceoryx2 64 MiB loan both ways"
TVM_NULL = "tvmrt null call_enclave"
TVM_64M = "tvmrt 64 MiB loan, both touch"


def _timed(fn, n):
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        fn()
        out.append(clock() - t)
    return out


def _pipe_server(conn):
    while True:
        m = conn.recv_bytes()
        if not m:
            return
        conn.send_bytes(m)


def _zmq_rep(addr, bind):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    (s.bind if bind else s.connect)(addr)
    while True:
        m = s.recv()
        s.send(m)
        if m == b"":
            return


def _zmq_proxy(front, back):
    import zmq
    ctx = zmq.Context()
    f, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    f.bind(front)
    b.bind(back)
    try:
        zmq.proxy(f, b)
    finally:
        f.close(0)
        b.close(0)


def _child(fn, *args):
    """A peer server process: it dies with this process and ignores ^C (:meth:`Peers.stop`
    ends it), like the floors' processes."""
    set_pdeathsig(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fn(*args)


class Peers:
    """The peer servers (processes) and their clients; :meth:`block` times ``n`` calls
    of one peer; :meth:`stop` ends every process and removes every file they made."""

    def __init__(self):
        self.procs: list = []
        self.clients: dict = {}
        self.missing: dict[str, str] = {}
        self.iox: dict[str, _iox2.Iox2] = {}
        self.dir = tempfile.mkdtemp(prefix="tvmrt-peers-")
        self.ctx = multiprocessing.get_context("fork")

    def _proc(self, fn, *args):
        p = self.ctx.Process(target=_child, args=(fn, *args), daemon=True)
        with LOCK:                      # not while the progress line is being written
            p.start()
        self.procs.append(p)

    def start(self) -> Peers:
        why = _iox2.available()
        if why:
            self.missing[IOX_NULL] = self.missing[IOX_64M] = why
        else:
            # forked before this process makes any iceoryx2 node or zmq context
            self.iox[IOX_NULL] = _iox2.Iox2(0)
            self.iox[IOX_64M] = _iox2.Iox2(bench.BIG)
            for name, x in list(self.iox.items()):
                try:
                    x.spawn()
                except Exception as exc:     # e.g. no /dev/shm: a row saying so
                    self._iox_failed(name, exc)
        a, b = self.ctx.Pipe()
        self._proc(_pipe_server, b)
        b.close()
        self.clients["multiprocessing.Pipe"] = (lambda: (a.send_bytes(MSG),
                                                         a.recv_bytes()), a)
        try:
            import zmq
        except ImportError:
            for name in ("pyzmq REQ/REP", "pyzmq REQ/REP via zmq.proxy"):
                self.missing[name] = "pyzmq not installed: pip install 'tvmrt[peers]'"
        else:
            direct = f"ipc://{self.dir}/direct"
            self._proc(_zmq_rep, direct, True)
            front, back = f"ipc://{self.dir}/front", f"ipc://{self.dir}/back"
            self._proc(_zmq_proxy, front, back)
            self._proc(_zmq_rep, back, False)
            ctx = self.zctx = zmq.Context()
            for name, addr in (("pyzmq REQ/REP", direct),
                               ("pyzmq REQ/REP via zmq.proxy", front)):
                s = ctx.socket(zmq.REQ)
                s.connect(addr)
                s.send(MSG)                 # wait until the server answers
                s.recv()
                self.clients[name] = ((lambda s=s: (s.send(MSG), s.recv())), s)
        for name, x in list(self.iox.items()):
            try:
                x.connect()
            except Exception as exc:
                self._iox_failed(name, exc)
        if IOX_NULL in self.iox:
            x = self.iox[IOX_NULL]
            self.clients[IOX_NULL] = (None, x)
        return self

    def _iox_failed(self, name: str, exc: Exception) -> None:
        """iceoryx2 is installed but could not start: stop what it made, say why."""
        self.iox.pop(name).stop()
        self.missing[name] = f"iceoryx2 failed: {type(exc).__name__}: {exc}"[:120]

    def block(self, name: str, n: int) -> list[int]:
        if name == IOX_NULL:
            return self.iox[IOX_NULL].null_block(n)
        return _timed(self.clients[name][0], n)

    def stop(self) -> None:
        for name, (_fn, s) in self.clients.items():
            if name == IOX_NULL:
                continue
            try:
                s.close(0) if "zmq" in name else s.close()
            except Exception:
                pass
        if hasattr(self, "zctx"):
            self.zctx.term()
        for p in self.procs:
            p.kill()
            p.join(5)
        for x in self.iox.values():
            x.stop()
        for f in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, f))
        os.rmdir(self.dir)


def measure(n: int = 5000, rounds: int = 3, sandbox: bool = True, big_calls: int = 20,
            progress=None) -> dict:
    """{"rows": {row: {"median": µs, "p99": µs, "ratio": to the relay floor's median}
    (a peer that is not installed: {"missing": why})}, "goals": [...]}; ``big_calls``
    64 MiB calls in all (spread over the rounds, one more per round as warm-up);
    ``progress`` a :class:`tvmrt._progress.Progress` or None."""
    big = max(1, big_calls // rounds)
    warm = bench.WARMUP_BIG
    floors = bench.Floors()
    tvm = peers = None
    samples: dict[str, list[int]] = {}

    def add(name, xs):
        samples.setdefault(name, []).extend(xs)
        if progress is not None:
            progress.done += len(xs)

    try:
        # each one is assigned before it starts: one failing half way is still stopped
        floors.start()
        tvm = bench.Tvm(max(n, big + warm), sandbox=sandbox)
        tvm.start()
        peers = Peers()
        peers.start()
        names = list(peers.clients)
        if progress is not None:
            progress.total = rounds * (n * (2 + len(names)) + (big + warm) *
                                       (1 + (IOX_64M in peers.iox)))
        for r in range(rounds):
            rnd = f"round {r + 1}/{rounds}"
            for name in ["relay floor", TVM_NULL, *names, TVM_64M, IOX_64M]:
                if progress is not None:
                    progress.show(name, rnd)
                if progress is not None:
                    progress.poll = tvm.live_done if name in (TVM_NULL, TVM_64M) else None
                if name == "relay floor":
                    add(name, floors.relay_block(n))
                elif name == TVM_NULL:
                    add(name, tvm.block("null", n, 0)[0])
                elif name == TVM_64M:
                    add(name, tvm.block("loan_64m", big + warm, warm)[0][warm:])
                    if progress is not None:
                        progress.done += warm
                elif name == IOX_64M:
                    if IOX_64M in peers.iox:
                        add(name, peers.iox[IOX_64M].loan_block(big + warm, warm)[0][warm:])
                        if progress is not None:
                            progress.done += warm
                else:
                    add(name, peers.block(name, n))
    finally:
        if peers is not None:
            peers.stop()
        if tvm is not None:
            tvm.stop()
        floors.stop()
    rows: dict = {}
    for xs in samples.values():
        xs.sort()
    floor = bench.percentile(samples["relay floor"], 50) / 1000
    for name, xs in samples.items():
        med = bench.percentile(xs, 50) / 1000
        rows[name] = {"median": med, "p99": bench.percentile(xs, 99) / 1000,
                      "ratio": med / floor, "n": len(xs)}
    for name, why in (peers.missing if peers else {}).items():
        rows[name] = {"missing": why}
    goals = []
    for peer in (IOX_NULL, "pyzmq REQ/REP"):
        if "median" in rows.get(peer, {}):
            x = rows[TVM_NULL]["median"] / rows[peer]["median"]
            goals.append({"what": f"tvmrt null call faster than {peer}",
                          "ratio": round(x, 3), "met": x < 1.0})
        else:
            goals.append({"what": f"tvmrt null call faster than {peer}", "ratio": None,
                          "met": None})
    if "median" in rows.get(IOX_64M, {}):
        x = rows[TVM_64M]["median"] / rows[IOX_64M]["median"]
        rows[TVM_64M]["vs_iceoryx2"] = round(x, 3)
        goals.append({"what": "tvmrt 64 MiB loan / iceoryx2 64 MiB loan (reported)",
                      "ratio": round(x, 3), "met": None})
    return {"rows": rows, "goals": goals}


def format_table(res: dict) -> str:
    lines = [f"{'request-response':34} {'median':>10} {'p99':>10} {'x relay floor':>14}"]
    for name, r in res["rows"].items():
        if "missing" in r:
            lines.append(f"{name:34} {r['missing']}")
        else:
            extra = (f"   {r['vs_iceoryx2']:.2f}× iceoryx2's" if "vs_iceoryx2" in r else "")
            lines.append(f"{name:34} {r['median']:8.1f}µs {r['p99']:8.1f}µs "
                         f"{r['ratio']:13.2f}x{extra}")
    lines.append("")
    for g in res["goals"]:
        if g["ratio"] is None:
            lines.append(f"{g['what']}: not measured (not installed)")
        elif g["met"] is None:
            lines.append(f"{g['what']}: {g['ratio']:.2f}×")
        else:
            lines.append(f"{g['what']}: {'met' if g['met'] else 'NOT met'} "
                         f"({g['ratio']:.2f}× its median)")
    return "\n".join(lines)
