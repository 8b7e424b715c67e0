"""Penglai's demo/IPC/server: sums the loaned region, answers with a region of its own."""
from tvmrt.eapp import *


def main(args):
    arg0 = args[10]
    req_vaddr = args[11]
    req_size = args[12]
    eapp_print("server: begin to run\n")
    total = arg0 + sum(ints(req_vaddr, req_size // 4))
    eapp_print("server: read req_vaddr:0x%lx\n", total)

    resp_size = 0x1000 * 4
    resp_vaddr = eapp_mmap(0, resp_size)
    resp = ints(resp_vaddr, resp_size // 4)
    for i in range(resp_size // 4):
        resp[i] = 2
    total = arg0 + sum(resp)
    eapp_print("server: read resp_vaddr:0x%lx\n", total)

    eapp_print("server: exit with ret:0x%lx\n", 2)
    ret_arg = CallArg()
    ret_arg.req_vaddr = req_vaddr
    ret_arg.req_size = req_size
    ret_arg.resp_vaddr = resp_vaddr
    ret_arg.resp_size = resp_size
    ret_arg.resp_val = 2
    SERVER_RETURN(ret_arg)
