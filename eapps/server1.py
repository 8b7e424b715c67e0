"""Penglai's demo/IPC/server1: sums and increments the loaned region, passes it on to
test-server, and answers with what test-server answered."""
from tvmrt.eapp import *


def main(args):
    arg0 = args[10]
    req_vaddr = args[11]
    req_size = args[12]
    eapp_print("server1: begin to run\n")
    eapp_print("get the server enclave report\n")
    report = get_report("test-server", 1)
    sig = report["sig"] if report else bytes(64)
    for i in range(16):
        eapp_print("0x%x\n", int.from_bytes(sig[4 * i:4 * i + 4], "little"))

    server_handle = acquire_enclave("test-server")
    eapp_print("server1: server_handle:0x%lx\n", server_handle)

    req = ints(req_vaddr, req_size // 4)
    req_sum = arg0 + sum(req)
    for i in range(req_size // 4):
        req[i] += 1

    call_arg = CallArg()
    call_arg.req_arg = arg0
    call_arg.req_vaddr = req_vaddr
    call_arg.req_size = req_size
    call_enclave(server_handle, call_arg)

    resp_sum = 0
    if call_arg.resp_vaddr:
        resp_sum = arg0 + sum(ints(call_arg.resp_vaddr, call_arg.resp_size // 4))
    eapp_print("server1: read req_vaddr:0x%lx\n", req_sum)
    eapp_print("server1: read resp_vaddr:0x%lx\n", resp_sum)
    eapp_print("server1: exit with retval:0x%lx\n", 3)

    ret_arg = CallArg()
    ret_arg.req_vaddr = call_arg.req_vaddr
    ret_arg.req_size = call_arg.req_size
    ret_arg.resp_vaddr = call_arg.resp_vaddr
    ret_arg.resp_size = call_arg.resp_size
    ret_arg.resp_val = 3
    SERVER_RETURN(ret_arg)
