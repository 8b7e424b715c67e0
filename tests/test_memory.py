"""Shared memory and schrodinger regions between a host and its enclaves."""
from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import SHM_PREFIX, eapp, shm_names, wait_until
from tvmrt import penglai
from tvmrt._memory import ARENAS
from tvmrt.errors import BadState, NotOwned, RegionLoaned

pytestmark = pytest.mark.timeout(60)


def test_shared_memory_seen_by_host_and_enclave(host):
    shm = host.shmget(0x4000)
    assert ARENAS["shm"][0] <= shm.address < ARENAS["shm"][0] + ARENAS["shm"][1]
    v = shm.view.cast("i")
    v[0] = 11111
    enc = host.create(eapp("shm_rw"), name="shm-rw", shm=shm)
    assert enc.run() == 11111
    assert v[1] == 11112          # written by the enclave into the same pages


def test_two_enclaves_share_memory_with_host(host):
    shm = host.shmget(0x1000)
    v = shm.view.cast("i")
    v[0] = 5
    a = host.create(eapp("shm_rw"), name="a", shm=shm)
    b = host.create(eapp("shm_rw"), name="b", shm=shm)
    assert a.run() == 5
    v[0] = v[1]
    assert b.run() == 6
    assert v[1] == 7


def test_schrodinger_round_trip(host):
    shm = host.shmget(0x1000)
    rel = host.schrodinger_get(0x2000)
    r = rel.view.cast("i")
    r[0] = 21
    enc = host.create(eapp("shm_rw"), name="rel", shm=shm)
    enc.set_mem_arg(rel)
    enc.run()
    assert rel.owned
    assert r[1] == 42              # the enclave's write, zero copy, same address


def test_schrodinger_revoked_during_run_in_process(host):
    """While the enclave runs, the host's own API refuses the region."""
    shm = host.shmget(0x1000)
    flags = shm.view.cast("i")
    rel = host.schrodinger_get(0x1000)
    enc = host.create(eapp("waiter"), name="waiter", shm=shm)
    enc.set_mem_arg(rel)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rv", enc.run()))
    t.start()
    try:
        assert wait_until(lambda: flags[1] == 1, 10), "the waiter never ran"
        assert not rel.owned
        with pytest.raises(NotOwned):
            _ = rel.view
        with pytest.raises(RegionLoaned):
            rel.remove()
    finally:
        flags[0] = 1
        t.join(20)
    assert result["rv"] == 7
    assert rel.view.cast("i")[0] == 4242


HOST_TOUCH = textwrap.dedent("""
    import ctypes, sys, threading, time
    from tvmrt.host import Host
    from tvmrt.errors import NotOwned
    host = Host.connect(sys.argv[1], embedded=False)
    shm = host.shmget(0x1000)
    flags = shm.view.cast("i")
    rel = host.schrodinger_get(0x1000)
    enc = host.create(sys.argv[2], name="waiter", shm=shm)
    enc.set_mem_arg(rel)
    threading.Thread(target=enc.run, daemon=True).start()
    while flags[1] != 1:
        time.sleep(0.001)
    try:
        rel.view
    except NotOwned:
        print("raised NotOwned", flush=True)
    ctypes.c_int.from_address(rel.address).value = 1   # must fault: the page is revoked
    print("host wrote a revoked page", flush=True)
""")


def test_host_touching_schrodinger_while_enclave_runs_faults(clean):
    r = subprocess.run([sys.executable, "-c", HOST_TOUCH, clean.path, eapp("waiter")],
                       capture_output=True, text=True, timeout=30)
    assert "raised NotOwned" in r.stdout
    assert "host wrote" not in r.stdout
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr)


def test_shmctl_keeps_memory_for_mapped_users(host):
    shm = host.shmget(0x1000)
    shm.view.cast("i")[0] = 3
    enc = host.create(eapp("shm_rw"), name="late", shm=shm)
    with pytest.raises(BadState):             # still attached in this process
        host._request({"op": "shmctl", "id": shm.id})
    shm.remove()                  # detach + revoke the id; the enclave still maps it
    assert enc.run() == 3


def test_penglai_names_port_line_by_line(clean):
    assert penglai.open_device(clean.path) == 0
    try:
        shmid = penglai.PLenclave_shmget(0x1000 * 4)
        assert shmid >= 0x10000
        shm = penglai.PLenclave_shmat(shmid, 0)
        ctypes.c_int.from_address(shm).value = 11111
        mm_id = penglai.PLenclave_schrodinger_get(0x1000)
        mm = penglai.PLenclave_schrodinger_at(mm_id, 0)
        ctypes.c_int.from_address(mm).value = 8
        enc = penglai.PLenclave()
        assert penglai.PLenclave_init(enc) == 0
        elf = penglai.elf_args()
        penglai.elf_args_init(elf, eapp("shm_rw"))
        assert penglai.elf_valid(elf)
        params = penglai.enclave_args()
        penglai.enclave_args_init(params)
        params.name = "ported"
        params.shmid, params.shm_offset, params.shm_size = shmid, 0, 0x4000
        assert penglai.PLenclave_create(enc, elf, params) == 0
        penglai.PLenclave_set_mem_arg(enc, mm_id, 0, 0x1000)
        assert penglai.PLenclave_run(enc) == 0
        assert enc.user_param.retval == 11111
        assert ctypes.c_int.from_address(shm + 4).value == 11112
        assert ctypes.c_int.from_address(mm + 4).value == 16
        assert penglai.PLenclave_shmctl(shmid) < 0          # still attached: a real error
        assert penglai.PLenclave_shmdt(shmid, shm) == 0
        assert penglai.PLenclave_shmctl(shmid) == 0
        assert penglai.PLenclave_schrodinger_dt(mm_id, mm) == 0
        assert penglai.PLenclave_schrodinger_ctl(mm_id) == 0
        assert penglai.PLenclave_shmat(shmid, 0) < 0         # revoked id
        # an exited enclave's handle keeps answering how it ended
        assert penglai.PLenclave_destroy(enc) == BadState.code
        penglai.elf_args_destroy(elf)
    finally:
        penglai.close_device()


def test_leak_check_counts_only_this_projects_segments():
    """Another program's /dev/shm files cannot fail (or satisfy) the leak checks."""
    tag = secrets.token_hex(6)
    # what shm_open makes: a file in /dev/shm
    paths = [f"/dev/shm/other-program.{tag}", f"/dev/shm/{SHM_PREFIX}0.{tag}"]
    for path in paths:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        names = shm_names()
        assert f"{SHM_PREFIX}0.{tag}" in names
        assert f"other-program.{tag}" not in names
    finally:
        for path in paths:
            os.unlink(path)
    assert f"{SHM_PREFIX}0.{tag}" not in shm_names()
