"""`tvmrt monitor` and `tvmrt ps` as a user runs them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import eapp, shm_names
from tvmrt import SERVER, cli
from tvmrt.host import Host

pytestmark = pytest.mark.timeout(60)


def test_monitor_foreground_sigint(tmp_path):
    before = shm_names()
    sock = str(tmp_path / "run" / "m.sock")
    p = subprocess.Popen([sys.executable, "-m", "tvmrt", "monitor", "--socket", sock],
                         stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert f"listening on {sock}" in line
        assert os.stat(os.path.dirname(sock)).st_mode & 0o777 == 0o700
        with Host.connect(sock, embedded=False) as h:
            h.create(eapp("echo_server"), name="srv", type=SERVER)
            h.schrodinger_get(0x1000)
            kids = psutil.Process(p.pid).children(recursive=True)
            # a second monitor on the same socket refuses to start
            r = subprocess.run([sys.executable, "-m", "tvmrt", "monitor", "--socket", sock],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 1 and "already listening" in r.stderr
            p.send_signal(signal.SIGINT)
            assert p.wait(20) == 0
        gone, alive = psutil.wait_procs(kids, timeout=5)
        assert not alive
        assert not os.path.exists(sock)
        assert shm_names() <= before
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_ps_lists_enclaves_and_regions(host):
    host.create(eapp("echo_server"), name="listed", type=SERVER)
    rel = host.schrodinger_get(0x2000)
    r = subprocess.run([sys.executable, "-m", "tvmrt", "ps", "--socket", host.path, "--json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [e["name"] for e in info["enclaves"]] == ["listed"]
    assert any(g["id"] == rel.id and g["size"] == 0x2000 for g in info["regions"])
    r = subprocess.run([sys.executable, "-m", "tvmrt", "ps", "--socket", host.path],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "listed" in r.stdout and "server" in r.stdout


def test_ps_shows_memory_and_cpu_of_each_enclave(host):
    host.create(eapp("echo_server"), name="measured", type=SERVER)
    r = subprocess.run([sys.executable, "-m", "tvmrt", "ps", "--socket", host.path, "--json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    (e,) = json.loads(r.stdout)["enclaves"]
    proc = psutil.Process(e["pid"])
    assert proc.ppid() != os.getpid()                 # the monitor's, not ours
    # a live Python interpreter: megabytes resident, some of them its own
    assert e["rss"] > 1 << 20
    if os.geteuid() == 0:       # (USS needs /proc/PID/smaps: root's, the enclave is
        assert e["uss"] is not None and 0 < e["uss"] <= e["rss"]    # non-dumpable)
    # CPU seconds since the zygote forked it: may still round to 0.00
    assert isinstance(e["cpu"], float) and 0 <= e["cpu"] <= sum(proc.cpu_times()[:2]) + 0.01
    r = subprocess.run([sys.executable, "-m", "tvmrt", "ps", "--socket", host.path],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[1:3]
    assert header.split()[-4:] == ["rss", "uss", "cpu", "sandbox"]
    rss, uss, cpu, sandbox = row.split()[-4:]
    assert rss[-1] in "KMG" and cpu.endswith("s")
    assert uss[-1] in "KMG" or (uss == "-" and os.geteuid() != 0)
    assert sandbox == e["sandbox"] == host.ps()["sandbox"]


def test_ps_shows_a_dash_for_a_vanished_pid():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                                       # reaped: the pid names no process
    assert cli._proc_stats(gone.pid) == {"rss": None, "uss": None, "cpu": None}
    assert cli._proc_stats(None) == {"rss": None, "uss": None, "cpu": None}
    info = {"hosts": 1, "regions": [],
            "enclaves": [{"eid": 1, "handle": 0x1234, "name": "ghost", "type": 0,
                          "state": "running", "pid": gone.pid,
                          **cli._proc_stats(gone.pid)}]}
    row = cli._ps_lines(info)[2].split()
    assert row[-5:] == [str(gone.pid), "-", "-", "-", "-"]


def test_ps_without_monitor_says_so(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tvmrt", "ps", "--socket",
                        str(tmp_path / "none.sock")], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("tvmrt ps: no monitor listening on")
    assert len(r.stderr.splitlines()) == 1, r.stderr      # one line, no traceback


@pytest.mark.skipif(os.geteuid() != 0, reason="compares with the monitor's /proc (root's)")
def test_ps_carries_the_monitors_own_figures(host, clean):
    """The monitor reports its pid, fds and RSS itself (a non-root host cannot read a
    non-dumpable monitor's /proc); they match what root sees there."""
    import psutil
    m = host.ps()["monitor"]
    assert m["pid"] == clean.pid
    assert m["fds"] == psutil.Process(clean.pid).num_fds()
    rss = psutil.Process(clean.pid).memory_info().rss
    assert abs(m["rss"] - rss) < 4 << 20
    assert m["sockets"] >= 1 and m["segments"] >= 0
