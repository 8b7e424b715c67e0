"""Out-of-range fields: codes, never exceptions, and no region lost.
shm ints from [8]: call rc, region still readable (1), eapp_mmap result, its error code,
eapp_unmap rc, get_report is None (1), its error code, a good call rc after all that."""
from tvmrt.eapp import *


def main(args):
    shm = ints(args[10], args[11] // 4)
    h = acquire_enclave("echo")
    r = eapp_mmap(0, 0x1000)
    ints(r, 1)[0] = 5
    out = [call_enclave(h, CallArg(req_vaddr=r, req_size=1 << 64))]
    out.append(1 if ints(r, 1)[0] == 5 else 0)
    out.append(eapp_mmap(0, 1 << 64))
    out.append(last_error().code)
    out.append(eapp_unmap(r, 1 << 64))
    out.append(1 if get_report(None, 1 << 64) is None else 0)
    out.append(last_error().code)
    out.append(call_enclave(h, CallArg(req_arg=1 << 64)))
    out.append(call_enclave(h, CallArg(req_arg=4, req_vaddr=r, req_size=0x1000)))
    out.append(ints(r, 1)[0])
    for i, v in enumerate(out):
        shm[8 + i] = v
    return 0
