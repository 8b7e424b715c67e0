"""Penglai's demo/IPC/caller: reads host memory, calls test-server1 (or test-server)."""
from tvmrt.eapp import *


def print_report(report):
    sig = report["sig"] if report else bytes(64)   # a failed get_report leaves zeros
    for i in range(16):
        eapp_print("0x%x\n", int.from_bytes(sig[4 * i:4 * i + 4], "little"))


def main(args):
    eapp_print("caller begin to run...\n")
    # Get the content in the shared memory
    shm = args[10]
    shm_size = args[11]
    # Get the content in the relay/schrodinger page (zero copy)
    relay_page = args[13]
    relay_page_size = args[14]
    eapp_print("shm content %d and size %lx\n", ints(shm, 1)[0], shm_size)
    eapp_print("relay page content %d and size %lx\n", ints(relay_page, 1)[0],
               relay_page_size)

    eapp_print("get the enclave report\n")
    print_report(get_report(None, 1))
    eapp_print("get the server1 enclave report\n")
    print_report(get_report("test-server1", 1))

    run_server1 = 1
    server_handle = acquire_enclave("test-server1")
    if server_handle < 0:
        server_handle = acquire_enclave("test-server")
        run_server1 = 0

    size = 0x1000 * 4
    req_vaddr = eapp_mmap(0, size)
    req = ints(req_vaddr, size // 4)
    for i in range(size // 4):
        req[i] = 1

    call_arg = CallArg()
    call_arg.req_arg = 0x19960000
    call_arg.req_vaddr = req_vaddr
    call_arg.req_size = size
    call_enclave(server_handle, call_arg)

    req_sum = sum(ints(call_arg.req_vaddr, call_arg.req_size // 4))
    resp_sum = 0
    if call_arg.resp_vaddr:
        resp_sum = sum(ints(call_arg.resp_vaddr, call_arg.resp_size // 4))
    eapp_print("caller: read req_vaddr after calling server:0x%lx\n", req_sum)
    eapp_print("caller: read resp_vaddr after calling server:0x%lx\n", resp_sum)
    if run_server1:
        eapp_print("caller: get server1 retval:0x%lx\n", call_arg.resp_val)
    else:
        eapp_print("caller: get server retval:0x%lx\n", call_arg.resp_val)
    EAPP_RETURN(0)
