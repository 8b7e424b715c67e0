"""Splits for the split tests; results in shm ints from [16].
Region of 4 pages, page i's first int = 10 * (i + 1).  Split at page 2; loan the
second half to echo (it adds 1 to the first int of what it gets) while a thread keeps
writing the first half; split the second half again at page 3 and loan the last page;
then the refusals; then unmap each piece."""
import threading

from tvmrt.eapp import *

P = PAGE


def main(args):
    shm = ints(args[10], 64)
    out = 16
    base = eapp_mmap(0, 4 * P)
    for i in range(4):
        ints(base + i * P, 1)[0] = 10 * (i + 1)
    shm[out] = split_mem_region(base, 4 * P, base + 2 * P)
    h = acquire_enclave("echo")
    stop = []
    writes = [0]

    def writer():
        first = ints(base, 2 * P // 4)
        while not stop:
            first[1] = writes[0]        # the first half stays ours during the call
            writes[0] += 1

    t = threading.Thread(target=writer)
    t.start()
    a = CallArg(req_arg=7, req_vaddr=base + 2 * P, req_size=2 * P)
    shm[out + 1] = call_enclave(h, a)
    stop.append(1)
    t.join()
    shm[out + 2] = 1 if writes[0] > 0 else 0
    shm[out + 3] = ints(base + 2 * P, 1)[0]              # 31: the loan came back, +1
    shm[out + 4] = ints(base + 3 * P, 1)[0]              # 40: untouched
    shm[out + 5] = ints(base, 1)[0]                      # 10
    # the second half again: the last page alone (a file offset of 3 pages)
    shm[out + 6] = split_mem_region(base + 2 * P, 2 * P, base + 3 * P)
    a = CallArg(req_arg=7, req_vaddr=base + 3 * P, req_size=P)
    shm[out + 7] = call_enclave(h, a)
    shm[out + 8] = ints(base + 3 * P, 1)[0]              # 41
    shm[out + 9] = ints(base + 2 * P, 1)[0]              # 31
    # refusals
    shm[out + 10] = split_mem_region(base, 2 * P, base + 100)          # Unaligned
    shm[out + 11] = split_mem_region(base, 2 * P, base)                # BadSize
    shm[out + 12] = split_mem_region(base, 2 * P, base + 2 * P)        # BadSize (end)
    shm[out + 13] = split_mem_region(base, 4 * P, base + P)            # BadSize (size)
    shm[out + 14] = split_mem_region(base + P, P, base + P)            # NotOwned
    # each piece has its own fate
    shm[out + 15] = eapp_unmap(base + 2 * P, P)
    shm[out + 16] = ints(base + 3 * P, 1)[0]             # still 41
    shm[out + 17] = eapp_unmap(base, 2 * P)
    shm[out + 18] = eapp_unmap(base + 3 * P, P)
    return 0
