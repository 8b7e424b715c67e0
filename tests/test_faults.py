"""Eapps that raise, exit or are killed; hosts and monitors that go away."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from conftest import eapp, shm_names, wait_until
from tvmrt import SERVER
from tvmrt._embedded import EmbeddedMonitor
from tvmrt.errors import BadState, EnclaveFault, MonitorGone, NameInUse, UnknownHandle
from tvmrt.host import Host

pytestmark = pytest.mark.timeout(60)


def test_eapp_that_raises(host):
    enc = host.create(eapp("raiser"), name="raiser")
    with pytest.raises(EnclaveFault) as ei:
        enc.run()
    assert "ValueError: boom from the eapp" in ei.value.reason
    # the handle is a tombstone: it keeps answering with what ended the enclave
    for again in (enc.run, lambda: enc.attest(1), enc.destroy):
        with pytest.raises(EnclaveFault, match="boom from the eapp"):
            again()


def test_eapp_that_exits(host):
    rel = host.schrodinger_get(0x1000)
    enc = host.create(eapp("exiter"), name="exiter")
    enc.set_mem_arg(rel)
    with pytest.raises(EnclaveFault) as ei:
        enc.run()
    assert "exited with status 7" in ei.value.reason
    assert rel.owned                        # the region came back to the host


def test_eapp_that_is_killed(host):
    enc = host.create(eapp("suicide"), name="suicide")
    with pytest.raises(EnclaveFault) as ei:
        enc.run()
    assert "SIGKILL" in ei.value.reason


def test_eapp_without_main(host, tmp_path):
    # create answers once the module ran and main exists: the fault is create's error
    p = tmp_path / "nomain.py"
    p.write_text("x = 1\n")
    with pytest.raises(EnclaveFault, match="main"):
        host.create(str(p), name="nomain")


def test_eapp_raising_at_import_fails_create(host, tmp_path):
    p = tmp_path / "badmodule.py"
    p.write_text("raise KeyError('broken at import')\n\ndef main(args):\n    return 0\n")
    with pytest.raises(EnclaveFault, match="broken at import"):
        host.create(str(p), name="badmodule")
    host.create(eapp("echo_server"), name="badmodule", type=SERVER)  # nothing was left behind


def test_run_twice_and_duplicate_server_name(host):
    shm = host.shmget(0x1000)
    shm.view.cast("i")[0] = 5
    enc = host.create(eapp("shm_rw"), name="twice", shm=shm)
    assert enc.run() == 5
    # an exited enclave's handle answers BadState, naming its exit value
    for again in (enc.run, lambda: enc.attest(1), enc.destroy):
        with pytest.raises(BadState, match="exited with value 5"):
            again()
    host.create(eapp("echo_server"), name="dup", type=SERVER)
    with pytest.raises(NameInUse):
        host.create(eapp("echo_server"), name="dup", type=SERVER)


def test_destroy_server_then_host_keeps_working(host):
    srv = host.create(eapp("echo_server"), name="gone", type=SERVER)
    srv.destroy()
    # a destroyed enclave's handle is unknown from then on
    for again in (srv.destroy, srv.run, lambda: srv.attest(1)):
        with pytest.raises(UnknownHandle, match="destroyed"):
            again()
    host.create(eapp("echo_server"), name="gone", type=SERVER)   # the name is free again


HOST_DIES = textwrap.dedent("""
    import sys, threading, os, time
    from tvmrt.host import Host, SERVER
    host = Host.connect(sys.argv[1], embedded=False)
    shm = host.shmget(0x1000)
    host.create(sys.argv[2], name="orphan-srv", type=SERVER)
    enc = host.create(sys.argv[3], name="orphan", shm=shm)
    threading.Thread(target=enc.run, daemon=True).start()
    flags = shm.view.cast("i")
    while flags[1] != 1:
        time.sleep(0.001)
    print("running", flush=True)
    os._exit(0)          # die without closing anything
""")


def test_host_death_destroys_its_enclaves(clean):
    r = subprocess.run([sys.executable, "-c", HOST_DIES, clean.path, eapp("echo_server"),
                        eapp("waiter")], capture_output=True, text=True, timeout=30)
    assert "running" in r.stdout, r.stderr
    # the clean fixture checks that the enclaves are gone and the monitor's fds are back


def test_monitor_death_is_reported_and_nothing_survives(tmp_path):
    before = shm_names()
    mon = EmbeddedMonitor().start()
    mp = psutil.Process(mon.pid)
    host = Host.connect(mon.path, embedded=False)
    try:
        host.shmget(0x1000)
        host.create(eapp("echo_server"), name="s", type=SERVER)
        enc = host.create(eapp("waiter"), name="w", shm=host.shmget(0x1000))
        # zygote, server, waiter
        assert wait_until(lambda: len(mp.children(recursive=True)) >= 3, 5)
        kids = mp.children(recursive=True)
        mon.proc.send_signal(signal.SIGKILL)
        mon.proc.wait()
        gone, alive = psutil.wait_procs(kids, timeout=5)
        assert not alive, f"survived the monitor: {alive}"
        with pytest.raises(MonitorGone):
            enc.run()
    finally:
        host.close()
        mon.stop()
    assert shm_names() <= before


def test_monitor_sigterm_exits_zero_and_cleans():
    before = shm_names()
    mon = EmbeddedMonitor().start()
    mp = psutil.Process(mon.pid)
    sock = mon.path
    host = Host.connect(sock, embedded=False)
    try:
        host.create(eapp("echo_server"), name="s", type=SERVER)
        host.schrodinger_get(0x1000)
        assert wait_until(lambda: len(mp.children(recursive=True)) >= 2, 5)  # zygote, server
        kids = mp.children(recursive=True)
        mon.proc.send_signal(signal.SIGTERM)        # not mon.stop(): it removes the socket
        assert mon.proc.wait(20) == 0
        assert not os.path.exists(sock), "the monitor left its socket behind"
        gone, alive = psutil.wait_procs(kids, timeout=5)
        assert not alive, f"survived the monitor: {alive}"
        with pytest.raises(MonitorGone):
            host.create(eapp("echo_server"), name="late", type=SERVER)
    finally:
        host.close()
        mon.stop()
    assert shm_names() <= before


def test_one_process_cannot_mix_two_monitors(host):
    other = EmbeddedMonitor().start()
    try:
        with pytest.raises(BadState):
            Host.connect(other.path, embedded=False)
        second = Host.connect(host.path, embedded=False)    # the same monitor is fine
        second.close()
    finally:
        other.stop()
