"""Smoke test of ``tvmrt bench --quick --json`` (no timing assertions)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import shm_names

TVMRT_ROWS = ("null", "loan_4k", "loan_64m")
FLOOR_ROWS = ("relay_floor", "copy_4k", "copy_64m")


@pytest.mark.timeout(120)
def test_bench_quick_json():
    shm_before = shm_names()
    p = subprocess.run([sys.executable, "-m", "tvmrt", "bench", "--quick", "--json"],
                       capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)

    rows = {r["config"]: r for r in res["rows"]}
    assert set(TVMRT_ROWS + FLOOR_ROWS) <= set(rows)
    for r in res["rows"]:
        assert {"config", "n", "median_us", "p99_us", "floor", "ratio"} <= set(r)
        assert r["n"] > 0, r
        assert r["median_us"] > 0 and r["p99_us"] >= r["median_us"], r
    # every tvmrt row is compared with a floor of the same run
    assert rows["null"]["floor"] == "relay_floor"
    assert set(rows["loan_4k"]["ratios"]) == {"relay_floor", "copy_4k"}
    assert rows["loan_64m"]["floor"] == "copy_64m"
    for k in TVMRT_ROWS:
        assert rows[k]["ratio"] > 0
    for k in FLOOR_ROWS:
        assert rows[k]["floor"] is None

    assert res["placement"].startswith(("pinned to cpu", "unpinned (CPUs"))
    assert isinstance(res["target"]["met"], bool)
    assert shm_names() <= shm_before, "the bench left segments in /dev/shm"


@pytest.mark.timeout(300)
def test_throughput_and_scale_tables_run(host):
    """``tvmrt bench --throughput`` / ``--scale`` on small counts: every caller's calls
    are counted, rates are positive, live enclaves reach the number asked for, and
    everything they created goes again (the ``clean`` fixture)."""
    from tvmrt import _scale
    t = _scale.throughput(host, calls=200, pairs=(1, 4), instances=(1, 2),
                          progress=lambda *a: None)
    assert set(t["pairs"]) == {1, 4} and all(v > 0 for v in t["pairs"].values())
    assert set(t["instances"]) == {(1, 0), (2, 0), (1, 200), (2, 200)}
    r = _scale.scale(host, 30, calls=200, progress=lambda *a: None)
    assert r["live"] >= 30 and r["rate_10"] > 0 and r["rate_n"] > 0
    assert r["monitor_rss"] > 0
    assert not [e for e in host.ps()["enclaves"] if e["state"] != "done"]


@pytest.mark.timeout(120)
def test_peers_are_measured_in_the_same_run():
    """``tvmrt bench --peers``: the relay floor, tvmrt's null call and multiprocessing.Pipe
    always; pyzmq's rows when it is installed, else a row saying how to install it; and
    no process or socket file left behind."""
    import glob

    from tvmrt import _peers
    res = _peers.measure(n=100, rounds=1)
    assert res["relay floor"]["ratio"] == 1.0
    for row in ("tvmrt null call_enclave", "multiprocessing.Pipe"):
        assert res[row]["median"] > 0 and res[row]["p99"] >= res[row]["median"]
    for row in ("pyzmq REQ/REP", "pyzmq REQ/REP via zmq.proxy"):
        assert res[row].get("median", 0) > 0 or "pip install" in res[row]["missing"]
    assert "x relay floor" in _peers.format_table(res)
    assert not glob.glob("/tmp/tvmrt-peers-*")
