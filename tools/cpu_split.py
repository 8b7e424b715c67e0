"""Where the CPU goes per call: CPU time of the caller, the monitor and bench-server.

    taskset -c 0 python tools/cpu_split.py null 20000 [blocks]

Times are exact (``/proc/PID/schedstat`` run time, and the caller's own thread CPU
clock over its loop).  Run pinned to one CPU: then one process runs at a time and the
three add up to about the wall time; what is left is switching and the other processes.
"""
import statistics
import sys
import time

import psutil

from tvmrt.bench import Tvm


def us(x):
    """Nanoseconds for n calls -> microseconds per call."""
    return x / n / 1000


def runtime_ns(pid):
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


config = sys.argv[1] if len(sys.argv) > 1 else "null"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
blocks = int(sys.argv[3]) if len(sys.argv) > 3 else 1
tvm = Tvm(n).start()
try:
    tvm.block(config, 2000, 20)                      # warm up; the server exists now
    mon = psutil.Process(tvm.host.embedded.pid)
    zyg = mon.children()[0]
    srv = min(zyg.children(), key=lambda p: p.pid)
    for _ in range(blocks):
        b = {k: runtime_ns(p.pid) for k, p in (("monitor", mon), ("server", srv))}
        t0 = time.perf_counter_ns()
        s, _ = tvm.block(config, n, 20)
        wall = time.perf_counter_ns() - t0
        cpu = {k: runtime_ns(p.pid) - b[k] for k, p in (("monitor", mon), ("server", srv))}
        cpu["caller"] = tvm.caller_cpu_ns
        parts = "  ".join(f"{k} {us(v):5.1f}" for k, v in cpu.items())
        print(f"{config}: median {statistics.median(s[20:]) / 1000:5.1f} µs/call; CPU µs/call: "
              f"{parts}  sum {us(sum(cpu.values())):5.1f}  (wall/call {us(wall):5.1f})",
              flush=True)
finally:
    tvm.stop()
