"""The tutorial's demo, end to end through the CLI (embedded monitor)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import shm_names

SIG = "<sig>"

EXPECTED_3 = [
    "caller begin to run...",
    "shm content 11111 and size 0000000000004000",
    "relay page content 22222 and size 0000000000004000",
    "get the enclave report", *[SIG] * 16,
    "get the server1 enclave report", *[SIG] * 16,
    "server1: begin to run",
    "get the server enclave report", *[SIG] * 16,
    "server1: server_handle:0x0000000000000000",
    "server: begin to run",
    "server: read req_vaddr:0x0000000019962000",
    "server: read resp_vaddr:0x0000000019962000",
    "server: exit with ret:0x0000000000000002",
    "server1: read req_vaddr:0x0000000019961000",
    "server1: read resp_vaddr:0x0000000019962000",
    "server1: exit with retval:0x0000000000000003",
    "caller: read req_vaddr after calling server:0x0000000000002000",
    "caller: read resp_vaddr after calling server:0x0000000000002000",
    "caller: get server1 retval:0x0000000000000003",
]

EXPECTED_2 = [
    "caller begin to run...",
    "shm content 11111 and size 0000000000004000",
    "relay page content 22222 and size 0000000000004000",
    "get the enclave report", *[SIG] * 16,
    "get the server1 enclave report", *["0x00000000"] * 16,
    "server: begin to run",
    "server: read req_vaddr:0x0000000019961000",
    "server: read resp_vaddr:0x0000000019962000",
    "server: exit with ret:0x0000000000000002",
    "caller: read req_vaddr after calling server:0x0000000000001000",
    "caller: read resp_vaddr after calling server:0x0000000000002000",
    "caller: get server retval:0x0000000000000002",
]


# Runs the command as a child of a process that is a child subreaper, so any process the
# command leaves behind is re-parented to it and found: nothing may outlive `tvmrt launch`.
# Processes already dying when the command exits (killed, not yet reaped) get a short grace
# to finish; one still running after it is left behind.
_REAPER = """
import ctypes, subprocess, sys, psutil
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)        # PR_SET_CHILD_SUBREAPER
r = subprocess.run(sys.argv[1:])
_, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=2)
left = []
for p in alive:
    try:
        left.append(p.cmdline())
    except psutil.Error:
        pass                                   # it ended just now
if left:
    print("LEFT BEHIND:", left, file=sys.stderr)
    sys.exit(99)
sys.exit(r.returncode)
"""


def _launch(*names, cwd):
    env = dict(os.environ)
    env["TVMRT_SOCKET"] = os.path.join(str(cwd), "none.sock")   # force an embedded monitor
    r = subprocess.run([sys.executable, "-c", _REAPER, sys.executable, "-m", "tvmrt",
                        "launch", *names], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=60)
    assert "LEFT BEHIND" not in r.stderr, r.stderr
    return r


def _enclave_lines(out: str):
    lines = out.splitlines()
    # the host's attestation dump comes first: 4 lines of "0xNN, " bytes
    assert all(line.startswith("0x") and "," in line for line in lines[:4]), lines[:4]
    return lines[4:]


def _match(got, expected):
    assert len(got) == len(expected), "\n".join(got)
    for g, e in zip(got, expected, strict=True):
        if e == SIG:
            assert g.startswith("0x") and len(g) == 10 and int(g, 16) >= 0, g
        else:
            assert g == e


@pytest.mark.timeout(90)
def test_demo_three_enclaves(tmp_path):
    before = shm_names()
    r = _launch("caller", "server", "server1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _match(_enclave_lines(r.stdout), EXPECTED_3)
    assert shm_names() <= before


@pytest.mark.timeout(90)
def test_demo_two_enclaves(tmp_path):
    r = _launch("caller", "server", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _match(_enclave_lines(r.stdout), EXPECTED_2)


@pytest.mark.timeout(90)
def test_eapp_given_by_path(tmp_path):
    import tvmrt.eapps
    src = os.path.join(os.path.dirname(tvmrt.eapps.__file__), "hello_world.py")
    mine = tmp_path / "my_hello.py"
    mine.write_text(open(src).read().replace("hello world!", "hello from a path"))
    r = _launch(str(mine), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "hello from a path" in r.stdout


@pytest.mark.timeout(90)
def test_launch_uses_running_monitor(monitor, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tvmrt", "launch", "hello_world", "--socket",
                        monitor.path], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "hello world!"


@pytest.mark.timeout(90)
def test_launch_missing_eapp(tmp_path):
    r = _launch("no_such_eapp", cwd=tmp_path)
    assert r.returncode != 0
    assert "cannot read eapp" in r.stderr
