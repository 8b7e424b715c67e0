"""A live fuzz run (issue 7): hosts and a hostile eapp send the running monitor thousands
of random and mutated frames while a caller/server pair keeps calling with checksummed
loans; afterwards the monitor answers, the pair's data is intact and nothing leaked (the
``clean`` fixture: no enclave, segment or monitor fd left)."""
from __future__ import annotations

import array
import random
import socket
import threading

import msgpack
import pytest

from conftest import eapp
from test_protocol import _alive, _raw
from tvmrt._stress import run_host
from tvmrt.errors import EnclaveFault

pytestmark = pytest.mark.timeout(300)

OPS = ["shmget", "shmat", "shmdt", "shmctl", "sget", "sat", "sdt", "sctl", "create", "run",
       "destroy", "attest", "ps", "bye", "x", 3, None]
INTS = [0, 1, -1, 4096, 1 << 63, (1 << 64) - 1, 1 << 64, -(1 << 63), 1 << 40]


def _host_frame(rnd):
    k = rnd.randrange(5)
    if k == 0:
        return rnd.randbytes(rnd.randrange(1, 400))
    if k == 1:
        good = msgpack.packb({"op": "sget", "rid": 3, "size": 4096})
        return good[:rnd.randrange(1, len(good))]
    if k == 2:
        return b"\x81\xa2op\xa6create" + b"\x00" * rnd.randrange(70000, 200000)
    def v():
        return rnd.choice(INTS + [b"\x00" * 33, "n", [0, 0, 4096], {"a": 1}, None, 2.5])
    msg = {"op": rnd.choice(OPS), "rid": rnd.choice(INTS)}
    for key in rnd.sample(["id", "size", "handle", "mem", "shm", "name", "type", "code",
                           "nonce", "timeout", "instances", "callers"], rnd.randrange(0, 6)):
        msg[key] = v()
    try:
        return msgpack.packb(msg, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return b"\xc1"


def _fuzz_host(path, frames, seed, out):
    rnd = random.Random(seed)
    with open("/dev/null", "rb") as f:
        fd = f.fileno()
        sent = cut = 0
        s = _raw(path)
        for _ in range(frames):
            data = _host_frame(rnd)
            try:
                if rnd.random() < 0.1:              # stray fds
                    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [fd] * rnd.randrange(1, 4)))])
                else:
                    s.send(data)
                sent += 1
                s.setblocking(False)
                try:
                    while True:                     # read what came back, if anything
                        if not s.recv(1 << 20):
                            raise ConnectionResetError
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
            except OSError:
                cut += 1                             # cut off: connect again
                s.close()
                s = _raw(path)
        s.close()
    out.append((sent, cut))


def test_live_fuzz_while_a_pair_keeps_calling(host):
    done = {}
    pair = threading.Thread(target=lambda: done.update(run_host(
        host, 0, callers=2, calls=600, max_pages=16, instances=2, duration=0,
        chaos=False)), daemon=True)
    pair.start()
    # hostile eapps flood their own channels (the monitor kills one at its first
    # undecodable frame: the next one goes on)
    shm = host.shmget(0x1000)
    v = shm.view.cast("i")
    enclave_frames, killed, seed = 0, 0, 0

    def eapp_fuzz():
        nonlocal enclave_frames, killed, seed
        while enclave_frames < 1500:
            seed += 1
            v[0], v[1], v[2] = 200, seed, 0
            fz = host.create(eapp("fuzzer"), name="fuzzer", shm=shm)
            try:
                fz.run(timeout=60)
            except EnclaveFault:
                killed += 1
            enclave_frames += v[2]
    hosts_out: list = []
    fuzzers = [threading.Thread(target=_fuzz_host, args=(host.path, 1500, seed, hosts_out))
               for seed in (1, 2)]
    for t in fuzzers:
        t.start()
    eapp_fuzz()
    for t in fuzzers:
        t.join(240)
    pair.join(240)
    assert not pair.is_alive() and not any(t.is_alive() for t in fuzzers)
    print(f"\nhost fuzzers (frames sent, times cut off): {hosts_out}; "
          f"eapp fuzzers: {enclave_frames} frames from {seed} enclaves, {killed} killed; "
          f"pair: {done['final']}")
    # frames went; garbage got its connection cut, and the fuzzer connected again
    assert all(sent > 500 and cut > 0 for sent, cut in hosts_out), hosts_out
    assert enclave_frames >= 1500 and killed > 0
    totals = done["final"]
    assert totals["bad"] == 0 and totals["other"] == 0, done
    assert totals["ok"] == 2 * 600, done          # nothing killed: every call correct
    _alive(host.path)
    assert host.ps()["monitor"]["pid"]
    shm.remove()
