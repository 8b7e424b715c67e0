"""iceoryx2 (PyPI ``iceoryx2``) as a ``tvmrt bench --peers`` row: request-response in
two processes, woken by iceoryx2 events (no polling loop).

What is used, iceoryx2 0.10 Python API:

* a ``request_response`` service per figure: ``c_uint64`` both ways for the null round
  trip; ``Slice[c_uint8]`` both ways for the 64 MiB loan, the client loaning the
  request (``Client.loan_slice_uninit``) and the server loaning the response
  (``ActiveRequest.loan_slice_uninit``) from iceoryx2's shared-memory data segments,
  at most one request and one response in flight (the service's limits say so, which
  keeps its segments at a few times 64 MiB);
* two ``event`` services per figure, "request sent" and "response sent": the sender
  ``Notifier.notify()``s after ``send``, the receiver sleeps in
  ``Listener.blocking_wait()`` (the client in ``timed_wait`` of a second, to notice a
  dead server) and then drains ``Server.receive()`` /
  ``PendingResponse.receive()``.  (iceoryx2's request-response ports have no wake-up of
  their own in Python; events are its documented way to wait, see its
  ``event_based_communication`` example.)

Timed as tvmrt's rows are: the null round trip from ``send_copy`` until the reply is in
hand; the 64 MiB call from ``send`` until the response is read, with the server reading
one byte of every request page and writing one byte into every response page inside it;
the client's loan and page writes before it are not timed (tvmrt's caller writes its
pages before the call, untimed, too).

Ownership: the server is a child process forked (:func:`tvmrt.bench._fork`: it dies
with this process, ignores ^C) *before* this process makes any iceoryx2 node.  Every
file iceoryx2 makes goes under a private root directory (``config.global_cfg.
root_path``) and carries a private prefix (``global_cfg.prefix``), in ``/dev/shm`` too;
:meth:`Iox2.stop` kills and reaps the server, drops this side's ports and node, then
removes the root directory and every ``/dev/shm`` entry with the prefix, so nothing is
left whatever state the run ended in.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import tempfile
import time

from . import bench
from ._memory import PAGE

SHM = "/dev/shm"
READY_TIMEOUT = 20.0


def available() -> str | None:
    """None if iceoryx2 can be imported, else why not (for the "not installed" row)."""
    try:
        import iceoryx2  # noqa: F401
    except ImportError:
        return "iceoryx2 not installed: pip install 'tvmrt[peers]'"
    return None


def _config(iox, root: str, prefix: str):
    cfg = iox.config.default()
    g = cfg.global_cfg                  # a live reference: set in place
    g.root_path = iox.Path.new(root)
    g.prefix = iox.FileName.new(prefix)
    return cfg


class _Side:
    """One side's node, services and event ports for one figure."""

    def __init__(self, iox, cfg, name: str, size: int):
        self.node = (iox.NodeBuilder.new().config(cfg)
                     .signal_handling_mode(iox.SignalHandlingMode.Disabled)
                     .create(iox.ServiceType.Ipc))
        t = iox.Slice[ctypes.c_uint8] if size else ctypes.c_uint64
        b = self.node.service_builder(iox.ServiceName.new(name)).request_response(t, t)
        self.rr = (b.max_active_requests_per_client(1).max_loaned_requests(1)
                   .max_response_buffer_size(1).max_borrowed_responses_per_pending_response(1)
                   .max_clients(1).max_servers(1).max_nodes(2).open_or_create())
        self.req = self.node.service_builder(
            iox.ServiceName.new(name + "/request")).event().open_or_create()
        self.resp = self.node.service_builder(
            iox.ServiceName.new(name + "/response")).event().open_or_create()
        self.ports: list = []

    def close(self) -> None:
        for p in reversed(self.ports):
            try:
                p.delete()
            except Exception:
                pass
        self.ports.clear()
        self.rr = self.req = self.resp = self.node = None


def _pages(x):
    """A writable byte view of one in every PAGE bytes of a loaned slice."""
    p = x.payload()
    return memoryview((ctypes.c_uint8 * p.len()).from_address(p.as_ptr())).cast("B")[::PAGE]


def _server_proc(root: str, prefix: str, name: str, size: int, ready_w: int) -> None:
    """The server: answer every request (null: ``v + 1``; slice: check the request's
    pages and write the next value into every page of a loaned response), until it is
    killed (:meth:`Iox2.stop`)."""
    import iceoryx2 as iox
    iox.set_log_level(iox.LogLevel.Error)
    side = _Side(iox, _config(iox, root, prefix), name, size)
    b = side.rr.server_builder()
    if size:
        b = b.initial_max_slice_len(size).max_loaned_responses_per_request(1)
    srv = b.create()
    lis = side.req.listener_builder().create()
    ntf = side.resp.notifier_builder().create()
    side.ports += [srv, lis, ntf]
    os.write(ready_w, b"r")
    os.close(ready_w)
    while True:
        lis.blocking_wait()
        while True:
            a = srv.receive()
            if a is None:
                break
            if not size:
                v = a.payload().contents.value
                a.send_copy(ctypes.c_uint64(v + 1))
            else:
                seen = bytes(_pages(a))
                v = seen[0]
                w = (v + 1) & 0xFF if seen.count(v) == len(seen) else v
                r = a.loan_slice_uninit(size)
                out = _pages(r)
                out[:] = bytes((w,)) * len(out)
                del out
                r.assume_init().send()
            a.delete()
            ntf.notify()


class Iox2:
    """An iceoryx2 server process and this process's client for one figure: ``size`` 0
    is the null round trip, else a ``size``-byte loan both ways.  :meth:`stop` ends
    everything it made (see the module docstring); use it in a ``finally``."""

    def __init__(self, size: int = 0):
        self.size = size
        self.pid: int | None = None
        self.side: _Side | None = None
        self.root = tempfile.mkdtemp(prefix="tvmrt-iox2-")
        self.prefix = f"tvmrt{os.getpid()}x{secrets.token_hex(4)}_"
        self.name = f"tvmrt/bench/{'null' if not size else size}"

    def start(self) -> Iox2:
        """:meth:`spawn` and :meth:`connect`."""
        return self.spawn().connect()

    def spawn(self) -> Iox2:
        """Fork the server and wait until it is ready.  Fork every server before any
        :meth:`connect` (a child should not inherit a live iceoryx2 node)."""
        r, w = os.pipe()
        try:
            self.pid = bench._fork(_server_proc, [w], self.root + "/", self.prefix,
                                   self.name, self.size, w)
        finally:
            os.close(w)
        try:
            import select
            ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
            if not ready or os.read(r, 1) != b"r":
                raise bench.BenchError("iceoryx2: the server did not start")
        finally:
            os.close(r)
        return self

    def connect(self) -> Iox2:
        """This process's node, client and event ports."""
        import iceoryx2 as iox
        iox.set_log_level(iox.LogLevel.Error)
        self.iox = iox
        self.side = _Side(iox, _config(iox, self.root + "/", self.prefix), self.name,
                          self.size)
        b = self.side.rr.client_builder()
        if self.size:
            b = b.initial_max_slice_len(self.size)
        self.client = b.create()
        self.tick = iox.Duration.from_secs(1)
        self.ntf = self.side.req.notifier_builder().create()
        self.lis = self.side.resp.listener_builder().create()
        self.side.ports += [self.client, self.ntf, self.lis]
        return self

    def _wait(self, pending):
        """The response to ``pending``: sleep in the listener until the server's event,
        waking once a second to see that the server is still there (a dead server must
        not hang the bench, and ^C is seen within a second)."""
        wait = self.lis.timed_wait
        while True:
            wait(self.tick)
            r = pending.receive()
            if r is not None:
                return r
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                self.pid = None
                raise bench.BenchError("iceoryx2: the server process died")

    def null_block(self, n: int) -> list[int]:
        """``n`` null round trips, ns each."""
        client, notify, wait = self.client, self.ntf.notify, self._wait
        u64 = ctypes.c_uint64
        clock = time.perf_counter_ns
        out = [0] * n
        for i in range(n):
            t0 = clock()
            p = client.send_copy(u64(i))
            notify()
            r = wait(p)
            v = r.payload().contents.value
            out[i] = clock() - t0
            r.delete()
            p.delete()
            if v != i + 1:
                raise bench.BenchError(f"iceoryx2: bad reply {v} to {i}")
        return out

    def loan_block(self, n: int, warm: int) -> tuple[list[int], int]:
        """``n`` calls loaning ``size`` bytes both ways, every page touched on both
        sides; (ns each, ns spent loaning and writing requests after ``warm``)."""
        size, client, notify, wait = self.size, self.client, self.ntf.notify, self._wait
        clock = time.perf_counter_ns
        out = [0] * n
        prewrite = 0
        for i in range(n):
            v = i & 0xFF
            w0 = clock()
            q = client.loan_slice_uninit(size)
            pages = _pages(q)
            pages[:] = bytes((v,)) * len(pages)
            del pages
            q = q.assume_init()
            t0 = clock()
            if i >= warm:
                prewrite += t0 - w0
            p = q.send()
            notify()
            r = wait(p)
            pages = _pages(r)
            first, last = pages[0], pages[-1]
            del pages
            out[i] = clock() - t0
            r.delete()
            p.delete()
            if first != (v + 1) & 0xFF or last != first:
                raise bench.BenchError("iceoryx2: the server did not touch the data")
        return out, prewrite

    def stop(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            bench._reap([self.pid], 5.0)
            self.pid = None
        if self.side is not None:
            self.side.close()
            self.side = None
        self.client = self.ntf = self.lis = None
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            names = os.listdir(SHM)
        except OSError:
            names = []
        for f in names:
            if f.startswith(self.prefix):
                try:
                    os.unlink(os.path.join(SHM, f))
                except OSError:
                    pass
