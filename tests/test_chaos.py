"""Chaos (the host side of ``tvmrt stress``): callers loan regions of random sizes to a
server of several instances while instances (and some callers) are SIGKILLed at random;
every call must return correct data or a distinct error within its deadline, no region
may be lost, and nothing may leak (the ``clean`` fixture).  A short run here;
``pytest -m stress`` runs the long one."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tvmrt._stress import run_host

pytestmark = pytest.mark.timeout(300)


def _check(res, callers):
    totals, kills = res["final"], res["kills"]
    assert totals["bad"] == 0, f"{totals['bad']} calls returned corrupted data or lost " \
        f"their region"
    assert totals["other"] == 0, f"unexpected error code {res['other_code']}"
    assert totals["ok"] > 0 and kills["instance"] > 0, res
    assert res["deep"] > 0, "no call went three servers deep and came back correct"
    # stopped at random instants, no region was writable by two processes, nor by one the
    # monitor did not name as its owner
    # (a user other than root cannot read a non-dumpable enclave's maps)
    assert res["samples"] > 0 or os.geteuid() != 0, res
    assert not res["violations"], res["violations"]
    # a caller ends with 0, or was killed by the chaos thread
    assert len(res["ends"]) == callers and all(
        how in ("0", "EnclaveFault") for how in res["ends"].values()), res["ends"]


def test_chaos_short(host):
    res = run_host(host, 0, callers=3, calls=800, max_pages=64, instances=2, duration=8,
                   chaos=True, pace=(0.02, 0.15))
    _check(res, 3)
    print(f"\nchaos short: {res['final']}, kills {res['kills']}, deep {res['deep']}, "
          f"{res['mib']} MiB")


def test_chaos_large_regions(host):
    """Regions up to 64 MiB (log-uniform from 4 KiB), checksummed whole at every hop,
    three servers deep, while instances of every level are killed."""
    res = run_host(host, 0, callers=2, calls=150, max_pages=16384, instances=2, duration=6,
                   chaos=True, pace=(0.05, 0.3))
    _check(res, 2)
    print(f"\nchaos large: {res['final']}, kills {res['kills']}, deep {res['deep']}, "
          f"{res['mib']} MiB")


@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_chaos_long(host):
    res = run_host(host, 0, callers=6, calls=3000, max_pages=4096, instances=3,
                   duration=300, chaos=True)
    _check(res, 6)
    print(f"\nchaos long: {res['final']}, kills {res['kills']}")


def test_tvmrt_stress_smoke():
    """``tvmrt stress`` runs host processes with server instances under chaos and ends
    with a summary table and PASS (nothing corrupted, nothing left)."""
    r = subprocess.run([sys.executable, "-m", "tvmrt", "stress", "--hosts", "2",
                        "--callers", "2", "--calls", "60", "--duration", "3",
                        "--max-pages", "16"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"corrupted data or lost region\s+0\n", r.stdout), r.stdout
    assert re.search(r"enclaves / regions left\s+0 / 0\n", r.stdout), r.stdout
    assert re.search(r"ownership samples \S+\s+\d+, 0 with", r.stdout), r.stdout
    assert "0 processes left, 0 segments" in r.stdout
