"""Caller for the call tests.  shm ints: [0] = scenario, results from [8] on."""
import ctypes
import threading
import time

from tvmrt.eapp import *
from tvmrt.errors import NotOwned


def main(args):
    shm = ints(args[10], args[11] // 4)
    scenario = shm[0]
    out = 8
    h = acquire_enclave("echo")

    def put(v):
        nonlocal out
        shm[out] = v
        out += 1

    region = eapp_mmap(0, 0x1000)
    ints(region, 1)[0] = 40
    if scenario == 0:            # bad arguments, each its own code, then a good call
        put(call_enclave(h, CallArg(req_vaddr=0x2000_0000_0000 + 0x7000_0000, req_size=0x1000)))
        put(call_enclave(h, CallArg(req_vaddr=region + 8, req_size=0x1000)))
        put(call_enclave(h, CallArg(req_vaddr=region, req_size=0)))
        put(call_enclave(h, CallArg(req_vaddr=region, req_size=1 << 40)))
        put(call_enclave(h, CallArg(req_vaddr=region, req_size=0x2000)))
        put(call_enclave(h + 12345, CallArg(req_arg=9)))
        put(acquire_enclave("no-such-server"))
        a = CallArg(req_arg=9, req_vaddr=region, req_size=0x1000)
        put(call_enclave(h, a))
        put(a.resp_val)
        put(ints(region, 1)[0])      # the loan came back with the server's +1
    elif scenario == 1:          # faults of the server
        for req in (1, 6, 2):
            a = CallArg(req_arg=req, req_vaddr=region, req_size=0x1000)
            rc = call_enclave(h, a)
            put(rc)
            put(ints(region, 1)[0])  # readable again: the loan is back whatever happened
            put(len(str(last_error() or "")))
    elif scenario == 2:          # response region moves to the caller
        a = CallArg(req_arg=4)
        put(call_enclave(h, a))
        put(a.resp_size)
        put(sum(ints(a.resp_vaddr, a.resp_size // 4)))
        a = CallArg(req_arg=5)
        put(call_enclave(h, a))
    elif scenario == 3:          # touch the loaned region while the server has it
        a = CallArg(req_arg=3, req_vaddr=region, req_size=0x1000)

        def toucher():
            # wait until the call has revoked the region (the server then holds it 0.5 s)
            end = time.monotonic() + 10
            while time.monotonic() < end:
                try:
                    mem(region, 4)
                except NotOwned:
                    shm[2] = 1       # the runtime's check said no
                    break
                time.sleep(0.001)
            else:
                shm[2] = -1
            ctypes.c_int.from_address(region).value = 1   # the hardware says no: SIGSEGV
            shm[3] = 1
        t = threading.Thread(target=toucher, daemon=True)
        t.start()
        call_enclave(h, a)
        t.join(20)               # the raw write kills the process before this returns
    elif scenario == 4:          # self-call: a cycle
        a = CallArg(req_arg=0)
        put(call_enclave(acquire_enclave("cycler"), a))
        put(a.resp_val - (1 << 64) if a.resp_val >= 1 << 63 else a.resp_val)
    elif scenario == 7:          # eapp_mmap / eapp_unmap
        put(eapp_mmap(0, 1 << 62))
        put(last_error().code)
        put(eapp_unmap(region + 0x1000, 0x1000))
        put(eapp_unmap(region, 0x2000))
        put(eapp_unmap(region, 0x1000))
        try:
            mem(region, 4)
            put(1)
        except NotOwned:
            put(-1)
        put(call_enclave(h, CallArg(req_vaddr=region, req_size=0x1000)))
    elif scenario == 5:          # a slow call that keeps the server busy
        shm[2] = 1
        put(call_enclave(h, CallArg(req_arg=3)))
    elif scenario == 6:          # meanwhile: non-blocking is refused, blocking waits
        put(call_enclave(h, CallArg(req_arg=7), nonblocking=True))
        a = CallArg(req_arg=7)
        put(call_enclave(h, a))
        put(a.resp_val)
    return 0
