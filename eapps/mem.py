"""Penglai's demo/mem: malloc, a large eapp_mmap, and sbrk.

Python has no malloc or sbrk: ``malloc`` is a bytearray; ``sbrk`` is Penglai's break
kept over this enclave's own relay memory (eapp_mmap), one page-granular heap whose
first page musl's malloc(0x100) took, so the printed addresses are this enclave's
heap base plus the offsets Penglai prints (its heap starts at 0x10_0000_0000)."""
from tvmrt.eapp import *

HEAP_PAGES = 16


class Heap:
    """Penglai's program break over one region: ``sbrk(n)`` returns the new break.
    Growth by n pages takes a block of the next power of two above n pages from the
    host, of which all but one page is mapped (so 4 pages give 7, 1 gives 1);
    shrinking never goes below the base."""

    def __init__(self):
        self.base = eapp_mmap(0, HEAP_PAGES * PAGE)
        self.top = self.base + PAGE        # musl's malloc(0x100) took one page

    def sbrk(self, n):
        if n > 0:
            pages = -(-n // PAGE)
            block = 1
            while block < pages + 1:
                block *= 2
            self.top += (block - 1) * PAGE
        elif n < 0:
            self.top = max(self.base, self.top + n)
        return self.top


def main(args):
    eapp_print("begin test malloc\n")
    buf = bytearray(0x100)
    big = bytearray(480 * 1024)             # calloc: zeroed
    del big, buf
    eapp_print("end test malloc\n")

    eapp_print("begin test mmap\n")
    size = 20 * 1024 * 1024
    addr = eapp_mmap(0, size)
    longs = mem(addr, size).cast("q")
    n = size // 8
    longs[:] = memoryview(bytes([1, 0, 0, 0, 0, 0, 0, 0]) * n).cast("q")
    total = sum(longs)
    eapp_unmap(addr, size)
    eapp_print("end test mmap:%d\n", total)

    eapp_print("begin test sbrk\n")
    heap = Heap()
    eapp_print("ret of sbrk(0):%p\n", heap.sbrk(0))
    eapp_print("ret of sbrk(-4096):%p\n", heap.sbrk(-4096))
    eapp_print("ret of sbrk(4*4096):%p\n", heap.sbrk(4 * 4096))
    eapp_print("ret of sbrk(1*4096):%p\n", heap.sbrk(1 * 4096))
    start = heap.base + PAGE
    words = mem(start, heap.top - start).cast("q")
    words[:] = memoryview(bytes([8, 0, 0, 0, 0, 0, 0, 0]) * len(words)).cast("q")
    result = sum(words)
    eapp_print("ret of sbrk(-10*4096):%p\n", heap.sbrk(-10 * 4096))
    eapp_print("end test sbrk\n")
    eapp_unmap(heap.base, HEAP_PAGES * PAGE)
    return result
