"""A hostile eapp that sends its monitor frames of its own making over its channel:
shm ints [0] frames to send, [1] seed; writes [2] frames sent before the monitor cut it
off (or all of them; the monitor kills an enclave at its first undecodable frame), [3] 1
if a send failed.  The frames (see ``frames``): random bytes,
truncated and oversized msgpack, every enclave op with fields of wrong types, huge and
negative integers, ``req_vaddr + req_size`` overflowing 64 bits, other enclaves'
addresses, stray fds."""
import os
import random
import socket

import msgpack

from tvmrt import _runtime
from tvmrt.eapp import *

OPS = ["call", "ret", "exit", "fault", "mmap", "unmap", "acquire", "report", "key", "ready",
       "grant", "bye", "x", "", 7, None]
INTS = [0, 1, -1, 4096, 1 << 63, (1 << 64) - 1, 1 << 64, -(1 << 63), 0x2000000000,
        0x1000000000000, 0x7FFFFFFFF000]


def frame(rnd):
    k = rnd.randrange(6)
    if k == 0:
        return rnd.randbytes(rnd.randrange(1, 300))
    if k == 1:
        good = msgpack.packb({"op": "call", "rid": 5, "handle": 0, "a": [0] * 6})
        return good[:rnd.randrange(1, len(good))]
    if k == 2:
        return msgpack.packb({"op": "mmap", "rid": 1, "size": 1 << 20, "pad": b"x" * 70000})
    def v():
        return rnd.choice(INTS + [rnd.randbytes(4), "s", [1, 2], {"a": 1}, None, 1.5])
    msg = {"op": rnd.choice(OPS)}
    for key in rnd.sample(["rid", "handle", "a", "size", "vaddr", "name", "nonce", "nb",
                           "timeout", "v", "c", "why", "g", "d"], rnd.randrange(0, 6)):
        msg[key] = v()
    if k == 4:
        msg = {"op": "call", "rid": rnd.randrange(1, 1 << 30), "handle": rnd.choice(INTS),
               "a": [rnd.choice(INTS) for _ in range(6)]}
        msg["a"][2], msg["a"][3] = (1 << 64) - 4096, 8192          # vaddr + size overflows
    try:
        return msgpack.packb(msg, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return b"\xc1"


def main(args):
    shm = ints(args[10], 8)
    rnd = random.Random(shm[1])
    sock = _runtime.current.chan.sock
    devnull, w = os.pipe()                  # stray fds to send (the sandbox denies files)
    sent = 0
    try:
        for _ in range(shm[0]):
            data = frame(rnd)
            fds = [devnull] if rnd.random() < 0.1 else []
            try:
                if fds:
                    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           bytes(__import__("array").array("i", fds)))])
                else:
                    sock.send(data)
            except OSError:
                shm[3] = 1
                break
            sent += 1
            shm[2] = sent                   # as it goes: the monitor may kill it any time
    finally:
        shm[2] = sent
        os.close(devnull)
        os.close(w)
    return 0
