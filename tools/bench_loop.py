"""Run one tvmrt bench config in a loop, for profiling the monitor or the eapps.

    python tools/bench_loop.py null 50000 [blocks]

prints the pids of the monitor, the zygote and bench-server on stderr first, then
waits 2 s (time to attach ``py-spy record -p PID`` or ``strace -c -p PID``), then runs
``blocks`` caller blocks of ``n`` calls each and prints the median of every block.
"""
import statistics
import sys
import time

import psutil

from tvmrt.bench import Tvm

config = sys.argv[1] if len(sys.argv) > 1 else "null"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
blocks = int(sys.argv[3]) if len(sys.argv) > 3 else 1
tvm = Tvm(n).start()
try:
    time.sleep(0.3)
    mon = psutil.Process(tvm.host.embedded.pid)
    kids = mon.children(recursive=True)
    print(f"monitor {mon.pid}",
          *(f"{k.name()} {k.pid} ({' '.join(k.cmdline()[:3])})" for k in kids),
          sep="\n", file=sys.stderr, flush=True)
    time.sleep(2)
    for _ in range(blocks):
        s, _ = tvm.block(config, n, 20)
        print(f"{config}: median {statistics.median(s[20:]) / 1000:.1f} µs "
              f"p99 {sorted(s[20:])[int(len(s[20:]) * .99)] / 1000:.1f} µs", flush=True)
finally:
    tvm.stop()
