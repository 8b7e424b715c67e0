"""Multi-process stress (run with `pytest -m stress`): several host processes, each with
concurrent callers, against one server; then a check that nothing leaked."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from conftest import eapp
from tvmrt import SERVER

pytestmark = [pytest.mark.stress, pytest.mark.timeout(600)]

HOST = textwrap.dedent("""
    import sys, threading
    from tvmrt.host import Host
    path, caller, n, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with Host.connect(path, embedded=False) as host:
        results = []
        def one(i):
            shm = host.shmget(0x1000)
            v = shm.view.cast("i")
            v[0] = n
            enc = host.create(caller, name=f"c{i}", shm=shm)
            results.append((enc.run(), v[8], v[9]))
        ts = [threading.Thread(target=one, args=(i,)) for i in range(k)]
        for t in ts: t.start()
        for t in ts: t.join()
        bad = sum(r[2] for r in results)
        done = sum(r[1] for r in results)
        print(f"done {done} bad {bad}", flush=True)
        sys.exit(1 if bad or done != n * k else 0)
""")


@pytest.mark.parametrize("hosts,callers,calls", [(3, 2, 3000)])
def test_many_hosts_many_callers_one_server(host, hosts, callers, calls):
    host.create(eapp("echo_server"), name="echo", type=SERVER, callers="*")
    procs = [subprocess.Popen([sys.executable, "-c", HOST, host.path, eapp("stress_caller"),
                               str(calls), str(callers)], stdout=subprocess.PIPE, text=True)
             for _ in range(hosts)]
    outs = [p.communicate(timeout=500)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(f"done {calls * callers} bad 0" in o for o in outs), outs


def _tvmrt_stress(*args, timeout):
    r = subprocess.run([sys.executable, "-m", "tvmrt", "stress", *args],
                       capture_output=True, text=True, timeout=timeout)
    table = r.stdout.rsplit("\r", 1)[-1]
    assert r.returncode == 0 and table.rstrip().endswith("PASS"), table + r.stderr
    return table


def test_tvmrt_stress_chaos_64mib():
    """The chaos suite at its full sizes: three host processes (one SIGKILLed mid-run),
    callers loaning regions of 4 KiB to 64 MiB, checksummed at every hop through three
    levels of servers, instances of every level and some callers SIGKILLed for a minute,
    then the monitor itself; everything checked (see ``tvmrt stress``)."""
    table = _tvmrt_stress("--hosts", "3", "--callers", "3", "--calls", "400",
                          "--instances", "3", "--duration", "60", timeout=1200)
    print(table)


def test_tvmrt_stress_100k_calls_rss_flat():
    """100,000 calls without chaos: the monitor's RSS after the warm-up stays within
    ``RSS_SLACK`` (the run fails otherwise) and its fds come back to their count."""
    table = _tvmrt_stress("--hosts", "2", "--callers", "4", "--calls", "12500",
                          "--max-pages", "1", "--no-chaos", timeout=1200)
    print(table)
    assert re.search(r"callers x calls\s+8 x 12500", table)
