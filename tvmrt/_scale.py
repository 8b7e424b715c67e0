"""``tvmrt bench --throughput`` and ``tvmrt bench --scale N``: aggregate call rates and
many live enclaves.

Throughput: for 1, 2, 4, 16, 64 caller/server pairs (each caller calls its own server),
and for one server of 1, 2, 4 instances called by 4 callers (null calls, and calls that
ask 200 µs of work of the server), every caller makes its calls at the same time (they
wait for a go flag); the rate is all calls over the span from the first caller's start
to the last one's end.

Scale: the null-call rate of one pair with 10 live enclaves, then with ``N`` (idle
servers make up the number), the monitor's RSS (from its own ``ps``) and the RSS and USS
of a sample of enclaves.

Creation (shared with ``tvmrt bench``'s create-to-ready row): :func:`create_idle` makes
idle servers back to back, :func:`create_to_ready` times single creates.
"""
from __future__ import annotations

import statistics
import threading
import time

from tvmrt import SERVER

#: the small eapp that creation figures create (an idle server: created, ready, waiting)
IDLE_EAPP = "tput_server"


def create_idle(host, n: int, into: list, prefix: str = "idle", live=None) -> float:
    """Create idle servers until ``into`` holds ``n``, back to back; returns the seconds
    it took.  Each enclave is appended to ``into`` as soon as it exists, so the caller
    owns (and destroys, e.g. with :func:`cleanup`) whatever was made, also when a create
    fails half way.  ``live(done, total)`` is called every 25 creates and after the last."""
    start = len(into)
    t0 = time.monotonic()
    while len(into) < n:
        into.append(host.create(IDLE_EAPP, name=f"{prefix}-{len(into)}", type=SERVER))
        done = len(into) - start
        if live is not None and (done % 25 == 0 or len(into) == n):
            live(done, n - start)
    return time.monotonic() - t0


def ps_with_pool_full(host, timeout: float) -> dict:
    """``host.ps()`` once the monitor holds its full pool of warm processes (forked
    ahead to become enclaves: monitor/zygote.py), or after ``timeout`` seconds: the
    state it is in whenever it has not just created an enclave (their channels are
    among its idle fds, a create takes one)."""
    from tvmrt.monitor.zygote import POOL_SIZE
    deadline = time.monotonic() + timeout
    while True:
        info = host.ps()
        if info["monitor"].get("warm", POOL_SIZE) >= POOL_SIZE or time.monotonic() > deadline:
            return info
        time.sleep(0.001)


def create_to_ready(host, n: int, prefix: str = "ready") -> list[int]:
    """Time ``n`` single creates of an idle server, ns each: from ``host.create()`` until
    it returns, which is when the enclave has reported ready (its module code ran).

    Each one is destroyed before the next, and the next starts once the monitor holds
    its full pool of warm processes again (``ps``; untimed), as it does whenever it has
    not just created one: this is one create's latency.  Creates back to back, each
    paying for the refill of the one before, are what the burst measures
    (:func:`create_idle`)."""
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        ps_with_pool_full(host, 5.0)
        t0 = clock()
        e = host.create(IDLE_EAPP, name=f"{prefix}-{i}", type=SERVER)
        out.append(clock() - t0)
        e.destroy()
    return out


def _callers(host, ks, calls, work_us=0):
    """Create one tput caller per server number in ``ks``; returns (enclaves, shms)."""
    encs, shms = [], []
    for i, k in enumerate(ks):
        shm = host.shmget(0x1000)
        v = shm.view.cast("Q")
        v[0], v[1], v[7] = calls, k, work_us
        shms.append(shm)
        encs.append(host.create("tput_caller", name=f"tput-c{i}", shm=shm))
    return encs, shms


def _go(encs, shms) -> float:
    """Run the callers together; aggregate calls/s."""
    errs: list = []

    def run(e):
        try:
            e.run(timeout=600)
        except Exception as exc:        # reported, not raised from a thread
            errs.append(exc)

    threads = [threading.Thread(target=run, args=(e,), daemon=True) for e in encs]
    for t in threads:
        t.start()
    views = [s.view.cast("Q") for s in shms]
    while not all(v[6] for v in views):
        time.sleep(0.001)
    for v in views:
        v[2] = 1
    for t in threads:
        t.join()
    if errs or any(v[5] for v in views):
        raise RuntimeError(f"a caller failed: {errs or [v[5] for v in views]}")
    span = max(v[4] for v in views) - min(v[3] for v in views)
    total = sum(v[0] for v in views)
    del views
    return total / (span / 1e9)


def cleanup(encs, shms=(), servers=()):
    """Destroy the enclaves, remove the shared memory; errors (already gone) ignored."""
    for e in list(encs) + list(servers):
        try:
            e.destroy()
        except Exception:
            pass
    for s in shms:
        s.remove()


def throughput(host, calls: int = 2000, pairs=(1, 2, 4, 16, 64),
               instances=(1, 2, 4), progress=print, live=None) -> dict:
    """The throughput tables (see the module docstring); ``progress(line)`` after each
    figure, ``live(what)`` before each one starts."""
    out: dict = {"pairs": {}, "instances": {}}
    live = live or (lambda what: None)
    for n in pairs:
        live(f"throughput: {n} caller/server pairs")
        servers = [host.create("tput_server", name=f"tput-{k}", type=SERVER)
                   for k in range(n)]
        encs, shms = _callers(host, range(n), max(200, calls // n))
        try:
            out["pairs"][n] = _go(encs, shms)
        finally:
            cleanup(encs, shms, servers)
        progress(f"  {n:>3} pairs: {out['pairs'][n]:9.0f} calls/s")
    for work in (0, 200):
        for k in instances:
            live(f"throughput: 1 server of {k} instances, 4 callers, {work} µs of work")
            server = host.create("tput_server", name="tput-0", type=SERVER, instances=k)
            encs, shms = _callers(host, [0] * 4, max(200, calls // 4), work)
            try:
                out["instances"][(k, work)] = _go(encs, shms)
            finally:
                cleanup(encs, shms, [server])
            progress(f"  1 server of {k} instances, 4 callers, {work} µs of work: "
                     f"{out['instances'][(k, work)]:9.0f} calls/s")
    return out


def scale(host, n: int, calls: int = 3000, progress=print, live=None) -> dict:
    """The rate of one pair with 10 and with ``n`` live enclaves, and memory figures.
    ``live(done, total)`` follows the creation of the ``n`` enclaves."""
    import psutil

    server = host.create("tput_server", name="tput-0", type=SERVER)
    idle: list = []
    res: dict = {}

    def rate():
        encs, shms = _callers(host, [0], calls)
        try:
            return _go(encs, shms)
        finally:
            cleanup(encs, shms)

    try:
        create_idle(host, 8, idle)      # 10 live with the caller and its server
        res["rate_10"] = statistics.median(rate() for _ in range(3))
        progress(f"  10 live enclaves: {res['rate_10']:.0f} calls/s")
        took = create_idle(host, n - 2, idle, live=live)
        res["create_per_s"] = (n - 10) / took
        progress(f"  created {n - 10} more: {res['create_per_s']:.0f} enclaves/s")
        res["rate_n"] = statistics.median(rate() for _ in range(3))
        progress(f"  {n} live enclaves: {res['rate_n']:.0f} calls/s")
        info = host.ps()
        res["monitor_rss"] = info["monitor"]["rss"]
        pids = [e["pid"] for e in info["enclaves"] if e["pid"]][:: max(1, n // 20)]
        rss, uss = [], []
        for pid in pids:
            try:
                m = psutil.Process(pid).memory_full_info()
                rss.append(m.rss)
                uss.append(m.uss)
            except (psutil.Error, OSError):
                pass                    # not root: an enclave's smaps is not ours to read
        res["enclave_rss"] = statistics.median(rss) if rss else None
        res["enclave_uss"] = statistics.median(uss) if uss else None
        res["live"] = len(info["enclaves"]) + 1     # and the caller of the measurement
    finally:
        cleanup([], [], idle + [server])
    return res
