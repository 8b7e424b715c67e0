"""``tvmrt bench --peers``: the null request-response of the Python IPC people use today,
measured in the same run as tvmrt's null ``call_enclave`` and the raw relay floor.

Each peer is a client in this process and a server process answering an 8-byte request
with an 8-byte reply: ``multiprocessing.Pipe``, pyzmq REQ/REP over ``ipc://`` directly,
and pyzmq REQ -> ``zmq.proxy`` (ROUTER/DEALER) -> REP, a broker like tvmrt's monitor.
pyzmq is optional (``pip install 'tvmrt[peers]'``); without it its rows say so.  Rounds
are interleaved (relay, tvmrt, peers, relay, ...) so that a slow moment of the machine
hits every row alike.
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time

from . import bench

MSG = b"\0" * 8


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


class Peers:
    """The peer servers (processes) and their clients; :meth:`block` times ``n`` calls
    of one peer; :meth:`stop` ends every process."""

    def __init__(self):
        self.procs: list = []
        self.clients: dict = {}
        self.missing: dict[str, str] = {}
        self.dir = tempfile.mkdtemp(prefix="tvmrt-peers-")
        self.ctx = multiprocessing.get_context("fork")

    def _proc(self, fn, *args):
        p = self.ctx.Process(target=fn, args=args, daemon=True)
        p.start()
        self.procs.append(p)

    def start(self) -> Peers:
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
            return self
        ctx = self.zctx = zmq.Context()
        direct = f"ipc://{self.dir}/direct"
        self._proc(_zmq_rep, direct, True)
        front, back = f"ipc://{self.dir}/front", f"ipc://{self.dir}/back"
        self._proc(_zmq_proxy, front, back)
        self._proc(_zmq_rep, back, False)
        for name, addr in (("pyzmq REQ/REP", direct),
                           ("pyzmq REQ/REP via zmq.proxy", front)):
            s = ctx.socket(zmq.REQ)
            s.connect(addr)
            s.send(MSG)                 # wait until the server answers
            s.recv()
            self.clients[name] = ((lambda s=s: (s.send(MSG), s.recv())), s)
        return self

    def block(self, name: str, n: int) -> list[int]:
        return _timed(self.clients[name][0], n)

    def stop(self) -> None:
        for name, (_fn, s) in self.clients.items():
            try:
                s.close(0) if "zmq" in name else s.close()
            except Exception:
                pass
        if hasattr(self, "zctx"):
            self.zctx.term()
        for p in self.procs:
            p.kill()
            p.join(5)
        for f in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, f))
        os.rmdir(self.dir)


def measure(n: int = 5000, rounds: int = 3, sandbox: bool = True) -> dict:
    """{row: {"median": µs, "p99": µs, "ratio": to the relay floor's median}} (rows of a
    peer that is not installed: {"missing": why})."""
    floors = bench.Floors().start()
    tvm = peers = None
    samples: dict[str, list[int]] = {}
    try:
        tvm = bench.Tvm(n, sandbox=sandbox).start()
        peers = Peers().start()
        for _ in range(rounds):
            samples.setdefault("relay floor", []).extend(floors.relay_block(n))
            samples.setdefault("tvmrt null call_enclave", []).extend(
                tvm.block("null", n, 0)[0])
            for name in peers.clients:
                samples.setdefault(name, []).extend(peers.block(name, n))
    finally:
        if peers is not None:
            peers.stop()
        if tvm is not None:
            tvm.stop()
        floors.stop()
    out: dict = {}
    for xs in samples.values():
        xs.sort()
    floor = bench.percentile(samples["relay floor"], 50) / 1000
    for name, xs in samples.items():
        med = bench.percentile(xs, 50) / 1000
        out[name] = {"median": med, "p99": bench.percentile(xs, 99) / 1000,
                     "ratio": med / floor}
    for name, why in (peers.missing if peers else {}).items():
        out[name] = {"missing": why}
    return out


def format_table(res: dict) -> str:
    lines = [f"{'request-response, 8 bytes':32} {'median':>9} {'p99':>9} {'x relay floor':>14}"]
    for name, r in res.items():
        if "missing" in r:
            lines.append(f"{name:32} {r['missing']}")
        else:
            lines.append(f"{name:32} {r['median']:7.1f}µs {r['p99']:7.1f}µs "
                         f"{r['ratio']:13.2f}x")
    return "\n".join(lines)
