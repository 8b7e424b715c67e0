"""Smoke tests of ``tvmrt bench`` (``--quick``, ``--json``, ``--peers``, ``--plot``,
``--throughput``/``--scale``): shapes, goals and clean-up, never timings."""
from __future__ import annotations

import glob
import io
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import shm_names

TVMRT_ROWS = ("null", "loan_4k", "loan_64m", "loan_256m", "loan_256m_touch", "create")
FLOOR_ROWS = ("relay_floor", "copy_4k", "copy_64m", "copy_256m")
GOAL_ROWS = TVMRT_ROWS
#: the files iceoryx2 makes for tvmrt._iox2 carry this prefix (see Iox2.prefix)
IOX_FILE = re.compile(r"^tvmrt\d+x[0-9a-f]{8}_")


def _leftovers() -> set[str]:
    """Files of this project's making in /dev/shm and /tmp that must not outlive a run."""
    shm = {n for n in os.listdir("/dev/shm") if IOX_FILE.match(n)} | shm_names()
    return shm | set(glob.glob("/tmp/tvmrt-iox2-*")) | set(glob.glob("/tmp/tvmrt-peers-*"))


def _tvmrt(*args, block: tuple[str, ...] = (), timeout: float = 100):
    """Run ``tvmrt ARGS`` in a fresh interpreter; ``block``: modules made unimportable
    there first (as if not installed)."""
    code = ("import sys\n"
            f"for m in {list(block)!r}: sys.modules[m] = None  # import raises ImportError\n"
            "from tvmrt.cli import main\n"
            f"sys.exit(main({['bench', *args]!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(120)
def test_bench_quick_json_rows_goals_and_table():
    before = _leftovers()
    p = _tvmrt("--quick", "--json")
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", "no progress display without a tty / with --json"
    res = json.loads(p.stdout)

    rows = {r["config"]: r for r in res["rows"]}
    assert set(TVMRT_ROWS + FLOOR_ROWS) <= set(rows)
    for r in res["rows"]:
        assert {"config", "n", "median_us", "p99_us", "floor", "ratio", "goal",
                "met"} <= set(r)
        assert r["n"] > 0, r
        assert r["median_us"] > 0 and r["p99_us"] >= r["median_us"], r
    # every tvmrt row is compared with a floor of the same run
    assert rows["null"]["floor"] == "relay_floor"
    assert set(rows["loan_4k"]["ratios"]) == {"relay_floor", "copy_4k"}
    assert rows["loan_64m"]["floor"] == "copy_64m"
    assert rows["loan_256m_touch"]["floor"] == "copy_256m"
    assert rows["loan_256m"]["floor"] == "loan_4k"
    for k in TVMRT_ROWS:
        if k != "create":
            assert rows[k]["ratio"] > 0
    for k in FLOOR_ROWS:
        assert rows[k]["floor"] is None and rows[k]["goal"] is None and rows[k]["met"] is None

    # a goal, its checks and met/not for every row that has one
    for k in GOAL_ROWS:
        r = rows[k]
        assert isinstance(r["goal"], str) and isinstance(r["met"], bool), r
        assert r["checks"] and r["met"] == all(c["met"] for c in r["checks"])
        for c in r["checks"]:
            assert c["value"] > 0 and c["limit"] > 0
    null = {c["stat"]: c for c in rows["null"]["checks"]}
    assert null["median"]["limit"] == 1.3 and null["p99"]["limit"] == 2.0
    # the p99 check compares with the floor's p99, the median one with its median
    assert null["p99"]["value"] == pytest.approx(
        rows["null"]["p99_us"] / rows["relay_floor"]["p99_us"], rel=0.01)
    assert null["median"]["value"] == pytest.approx(rows["null"]["ratio"], rel=0.01)
    assert rows["loan_64m"]["checks"][0]["kind"] == "speedup"
    assert rows["create"]["checks"][0]["kind"] == "ms"
    g = res["goals"]
    for k in GOAL_ROWS:                 # strict mode's rows have their goals too
        assert isinstance(rows["strict_" + k]["met"], bool)
    assert rows["strict_loan_256m"]["floor"] == "strict_loan_4k"
    assert g["total"] == 2 * len(GOAL_ROWS) and g["met"] + len(g["not_met"]) == g["total"]
    assert res["burst"]["n"] == 20 and res["burst"]["per_s"] > 0
    assert res["placement"].startswith(("pinned to cpu", "unpinned (CPUs"))

    from tvmrt import bench
    table = bench.format_table(res)
    assert re.search(r"^row +n +median µs +p99 µs +goal +met +ratio$", table, re.M)
    assert re.search(r"^null call .* ≤1\.3× relay, p99 ≤2× relay p99 +(met|NOT met) \(",
                     table, re.M)
    assert "burst: 20 enclaves" in table and f"goals: {g['met']} of {g['total']} met" in table
    assert _leftovers() <= before, "the bench left files in /dev/shm or /tmp"


@pytest.mark.timeout(120)
def test_sandbox_cost_rows_in_the_same_run():
    """``--sandbox-cost``: the default mode's rows again with the enclaves unsandboxed,
    each with its ratio to the sandboxed row of the same run."""
    p = _tvmrt("--quick", "--json", "--isolation", "mprotect", "--sandbox-cost")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["isolations"] == ["mprotect", "nosandbox"] and res["sandbox"] != "off"
    rows = {r["config"]: r for r in res["rows"]}
    for k in ("null", "loan_4k", "create"):
        assert rows[f"nosandbox_{k}"]["label"].endswith("[no sandbox]")
        assert rows[f"nosandbox_{k}"]["vs_mprotect"] > 0


@pytest.mark.timeout(150)
def test_peers_rows_and_nothing_left_behind():
    """``--peers``: relay floor, tvmrt, multiprocessing.Pipe, and pyzmq's and iceoryx2's
    rows when they are installed; iceoryx2's processes and files are gone afterwards."""
    before = _leftovers()
    p = _tvmrt("--peers", "--quick", "--calls", "100", "--rounds", "1", "--big-calls", "1",
               "--isolation", "mprotect", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    # --peers adds its table to the main one's, same run
    assert {"null", "loan_4k", "relay_floor"} <= {r["config"] for r in res["rows"]}
    rows = res["peers"]["rows"]
    assert rows["relay floor"]["ratio"] == 1.0
    for row in ("tvmrt null call_enclave", "multiprocessing.Pipe",
                "tvmrt 64 MiB loan, both touch"):
        assert rows[row]["median"] > 0 and rows[row]["p99"] >= rows[row]["median"]
    optional = {"pyzmq REQ/REP": "zmq", "pyzmq REQ/REP via zmq.proxy": "zmq",
                "iceoryx2 request-response": "iceoryx2",
                "iceoryx2 64 MiB loan both ways": "iceoryx2"}
    for row, mod in optional.items():
        try:
            __import__(mod)
        except ImportError:
            assert "not installed" in rows[row]["missing"]
        else:
            assert rows[row]["median"] > 0 and rows[row]["ratio"] > 0, rows[row]
    goals = {g["what"]: g for g in res["peers"]["goals"]}
    assert "tvmrt null call faster than iceoryx2 request-response" in goals
    if "median" in rows["iceoryx2 64 MiB loan both ways"]:
        assert rows["tvmrt 64 MiB loan, both touch"]["vs_iceoryx2"] > 0
    assert _leftovers() <= before, "the peers left files in /dev/shm or /tmp"


@pytest.mark.timeout(120)
def test_peers_not_installed_rows_say_so():
    """With iceoryx2 and pyzmq unimportable the run still succeeds; their rows say how
    to install them and the goals that need them are "not measured"."""
    p = _tvmrt("--peers", "--quick", "--calls", "50", "--rounds", "1", "--big-calls", "1",
               "--isolation", "mprotect", block=("iceoryx2", "zmq"))
    assert p.returncode == 0, p.stderr
    for row in ("iceoryx2 request-response", "iceoryx2 64 MiB loan both ways",
                "pyzmq REQ/REP", "pyzmq REQ/REP via zmq.proxy"):
        assert re.search(rf"^{re.escape(row)} +\w+ not installed: pip install "
                         r"'tvmrt\[peers\]'$", p.stdout, re.M), p.stdout
    assert "faster than iceoryx2 request-response: not measured" in p.stdout
    assert re.search(r"^multiprocessing\.Pipe +[\d.]+µs", p.stdout, re.M)
    assert re.search(r"^null call .* ≤1\.3× relay", p.stdout, re.M), "the main table too"


@pytest.mark.timeout(120)
def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    before = _leftovers()
    out = tmp_path / "sizes.png"
    p = _tvmrt("--plot", str(out), "--quick", "--isolation", "mprotect")
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in p.stdout and "64 MiB" in p.stdout
    assert re.search(r"^null call .* ≤1\.3× relay", p.stdout, re.M), "the main table too"
    assert _leftovers() <= before


@pytest.mark.timeout(30)
def test_plot_without_matplotlib_says_how_to_install(tmp_path):
    out = tmp_path / "sizes.png"
    p = _tvmrt("--plot", str(out), "--quick", block=("matplotlib",))
    assert p.returncode == 1
    assert "pip install 'tvmrt[plot]'" in p.stderr and not out.exists()


def test_progress_line_only_on_a_tty():
    from tvmrt._progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    quiet = io.StringIO()
    with Progress(stream=quiet) as p:
        p.show("null", "round 1/3", 10, 100)
    assert quiet.getvalue() == ""
    tty = Tty()
    with Progress(stream=tty) as p:
        p.show("null", "round 1/3", 10, 100)
        assert re.fullmatch(r"\r\033\[Knull \| round 1/3 \| 10/100 calls \| [\d.]+ s",
                            tty.getvalue())
    assert tty.getvalue().endswith("\r\033[K"), "cleared on exit"
    live = Tty()
    with Progress(stream=live) as p:            # the run's count plus the block's own
        p.total, p.done, p.poll = 100, 10, lambda: 5
        p.show("loan_4k", unit="calls")
        assert "| 15/100 calls |" in live.getvalue()
    off = Tty()
    with Progress(enabled=False, stream=off) as p:      # --json
        p.show("null")
    assert off.getvalue() == ""


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
    seen = []
    r = _scale.scale(host, 30, calls=200, progress=lambda *a: None,
                     live=lambda done, total: seen.append((done, total)))
    assert r["live"] >= 30 and r["rate_10"] > 0 and r["rate_n"] > 0
    assert r["monitor_rss"] > 0 and r["create_per_s"] > 0
    assert seen and all(0 < d <= t for d, t in seen)
    assert not [e for e in host.ps()["enclaves"] if e["state"] != "done"]


@pytest.mark.timeout(240)
def test_throughput_and_scale_add_to_the_main_run():
    """``--throughput --scale N --json``: one JSON document with the main rows and the
    pairs, instances and scale figures, in the same invocation; nothing left behind."""
    before = _leftovers()
    p = _tvmrt("--quick", "--isolation", "mprotect", "--throughput", "--scale", "20",
               "--calls", "100", "--json", timeout=200)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert {"null", "loan_4k"} <= {r["config"] for r in res["rows"]}
    assert {int(k) for k in res["pairs"]} == {1, 2, 4, 16, 64}
    assert all(v > 0 for v in res["pairs"].values())
    assert len(res["instances"]) == 6 and all(v > 0 for v in res["instances"].values())
    s = res["scale"]
    assert s["live"] >= 20 and s["rate_10"] > 0 and s["rate_n"] > 0 and s["monitor_rss"] > 0
    assert _leftovers() <= before
