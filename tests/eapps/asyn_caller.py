"""Caller for the asyn tests; shm int[0] picks the scenario, results from int[16] on.
0: one asyn call with a region holding 41 (arg 1); records rc, whether the region is
   still ours (0 expected), get_enclave_id.
1: three asyn calls in a row (args 100, 2, 3: the first keeps the server busy).
2: asyn calls to a server that dies: 102 (in service, dies), then 3 queued behind it.
4: split a 4-page region at page 1, give the 3-page half to the server by asyn, keep
   writing the first page; records rc of split and asyn, then the first page's int.
3: errors: unknown name, a region not owned, a partial size, a misaligned address;
   then a good call (arg 4).
"""
import os

from tvmrt.eapp import *


def region(value):
    v = eapp_mmap(0, 0x2000)
    ints(v, 1)[0] = value
    return v


def send(name, arg, value):
    v = region(value) if value is not None else 0
    a = CallArg(req_arg=arg, req_vaddr=v, req_size=0x2000 if v else 0)
    return asyn_enclave_call(name, a), v


def owned(v):
    try:
        mem(v, 4)
        return 1
    except Exception:
        return 0


def put(shm, at, vals):
    for i, x in enumerate(vals):
        shm[at + i] = x


def main(args):
    shm = ints(args[10], 64)
    scenario = shm[0]
    out = 16
    if scenario == 0:
        rc, v = send("asyn", 1, 41)
        put(shm, out, [rc, owned(v), get_enclave_id()])
    elif scenario == 1:
        for i, arg in enumerate((100, 2, 3)):
            rc, v = send("asyn", arg, 10 + i)
            shm[out + i] = rc
    elif scenario == 2:
        rc1, _ = send("asyn", 102, 20)
        rc2, _ = send("asyn", 3, 21)
        put(shm, out, [rc1, rc2])
    elif scenario == 3:
        rc, v = send("no-such", 1, 5)
        shm[out] = rc
        shm[out + 1] = owned(v)             # refused: still ours
        shm[out + 2] = asyn_enclave_call("asyn", CallArg(req_arg=1, req_vaddr=0x1000,
                                                         req_size=0x1000))
        v = region(6)
        shm[out + 3] = asyn_enclave_call("asyn", CallArg(req_arg=1, req_vaddr=v,
                                                         req_size=0x1000))
        shm[out + 4] = asyn_enclave_call("asyn", CallArg(req_arg=1, req_vaddr=v + 8,
                                                         req_size=0x1000))
        shm[out + 5] = owned(v)
        rc, _ = send("asyn", 4, 7)
        shm[out + 6] = rc
    elif scenario == 4:
        v = eapp_mmap(0, 4 * PAGE)
        ints(v + PAGE, 1)[0] = 77
        shm[out] = split_mem_region(v, 4 * PAGE, v + PAGE)
        shm[out + 1] = asyn_enclave_call("asyn", CallArg(req_arg=5, req_vaddr=v + PAGE,
                                                         req_size=3 * PAGE))
        first = ints(v, PAGE // 4)
        for i in range(PAGE // 4):
            first[i] = i                    # the half we kept is still ours
        shm[out + 2] = first[PAGE // 4 - 1]
        shm[out + 3] = owned(v + PAGE)
        shm[out + 4] = eapp_unmap(v, PAGE)
    os.sched_yield()
    return 0
