"""Create-to-ready of a trivial enclave on a private monitor, and where the time goes.

    python tools/create_budget.py [-n 200] [--burst 0] [--no-sandbox] [--trace]

Creates and destroys a trivial enclave ``n`` times and prints the median and p99 of
``create()`` (host send to host reply: the monitor answers a create when the enclave
said ``ready``).  ``--trace`` sets ``TVMRT_TRACE_CREATE`` for the private monitor, so
that the monitor, the zygote and each enclave append a CLOCK_MONOTONIC stamp per step
to one file (:mod:`tvmrt._trace`), and prints the median of every step's share.
``--burst N`` creates N enclaves back to back (all alive at once), then destroys them,
and prints enclaves/s.  ``--json`` prints the figures as one JSON line (for A/B runs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

CODE = b"def main(args):\n    return 0\n"

#: the first and last step of every create; the steps between are whatever the code
#: stamps (see where tvmrt._trace.mark is called), ordered by when they happen
FIRST, LAST = "h_send", "h_reply"


def read_trace(path):
    """{seq: {step: ns}}: the stamps of each create, in order (the n-th h_send begins
    create n; every other stamp belongs to the create whose h_send precedes it)."""
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                rows.append((int(parts[2]), parts[0]))
    rows.sort()
    out: list[dict] = []
    for t, step in rows:
        if step == "h_send":
            out.append({})
        if out and step not in out[-1]:
            out[-1][step] = t
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--gap", type=float, default=0.0,
                    help="ms to wait after each destroy (0: back to back)")
    ap.add_argument("--burst", type=int, default=0)
    ap.add_argument("--no-sandbox", action="store_true")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    trace = None
    if ns.trace:
        fd, trace = tempfile.mkstemp(prefix="create-trace-")
        os.close(fd)
        os.environ["TVMRT_TRACE_CREATE"] = trace
    from tvmrt import _trace
    from tvmrt.bench import percentile
    from tvmrt.host import Host
    _trace.reopen()
    out: dict = {}
    try:
        with Host.connect(embedded=True, sandbox=not ns.no_sandbox) as host:
            for _ in range(10):                      # warm up (pool filled, caches hot)
                host.create(CODE, name="warm").destroy()
            if trace:
                open(trace, "w").close()
            lat = []
            cpu0 = os.times()
            for _ in range(ns.n):
                t0 = time.monotonic_ns()
                _trace.mark("h_send")
                e = host.create(CODE, name="t")
                _trace.mark("h_reply")
                lat.append(time.monotonic_ns() - t0)
                e.destroy()
                if ns.gap:
                    time.sleep(ns.gap / 1e3)
            cpu1 = os.times()
            out["median_us"] = statistics.median(lat) / 1e3
            out["p99_us"] = percentile(sorted(lat), 99) / 1e3
            out["host_cpu_us"] = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) \
                / ns.n * 1e6
            if ns.burst:
                encs = []
                t0 = time.monotonic()
                for i in range(ns.burst):
                    encs.append(host.create(CODE, name=f"b{i}"))
                out["burst_per_s"] = ns.burst / (time.monotonic() - t0)
                for e in encs:
                    e.destroy()
        if trace:
            creates = [c for c in read_trace(trace) if FIRST in c and LAST in c]
            names = set.intersection(*(set(c) for c in creates))
            steps = sorted(names, key=lambda s: statistics.median(c[s] - c[FIRST]
                                                                 for c in creates))
            budget = {}
            for a, b in zip(steps, steps[1:], strict=False):
                budget[f"{a}->{b}"] = statistics.median(c[b] - c[a] for c in creates) / 1e3
            budget["total"] = statistics.median(c[LAST] - c[FIRST] for c in creates) / 1e3
            out["budget_us"] = budget
            out["traced"] = len(creates)
    finally:
        if trace:
            os.unlink(trace)
    if ns.json:
        print(json.dumps(out))
        return 0
    print(f"create-to-ready: median {out['median_us']:.0f} µs, p99 {out['p99_us']:.0f} µs "
          f"(n={ns.n}, gap {ns.gap:g} ms); host CPU {out['host_cpu_us']:.0f} µs per create+destroy")
    if "burst_per_s" in out:
        print(f"burst of {ns.burst}: {out['burst_per_s']:.0f} enclaves/s")
    if "budget_us" in out:
        print(f"per-step median ({out['traced']} creates traced):")
        for k, v in out["budget_us"].items():
            print(f"  {k:24} {v:8.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
