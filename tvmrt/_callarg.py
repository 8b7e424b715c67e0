"""``call_enclave_arg_t``: the six-field IPC structure of Penglai's eapp library."""
from __future__ import annotations

FIELDS = ("req_arg", "resp_val", "req_vaddr", "req_size", "resp_vaddr", "resp_size")


class CallArg:
    """Mutable struct with Penglai's field names; every field an unsigned 64-bit int.

    ``call_enclave`` updates it in place, as the C library does through its pointer.
    """

    __slots__ = FIELDS

    def __init__(self, req_arg=0, resp_val=0, req_vaddr=0, req_size=0, resp_vaddr=0,
                 resp_size=0):
        self.req_arg = req_arg
        self.resp_val = resp_val
        self.req_vaddr = req_vaddr
        self.req_size = req_size
        self.resp_vaddr = resp_vaddr
        self.resp_size = resp_size

    def to_list(self) -> list:
        """The six fields, in call_enclave_arg_t's order."""
        return [self.req_arg, self.resp_val, self.req_vaddr, self.req_size, self.resp_vaddr,
                self.resp_size]

    def set_from(self, values) -> None:
        """Set the six fields from ``values``, in call_enclave_arg_t's order."""
        (self.req_arg, self.resp_val, self.req_vaddr, self.req_size, self.resp_vaddr,
         self.resp_size) = values

    def __repr__(self):
        return "CallArg(" + ", ".join(f"{f}={getattr(self, f):#x}" for f in FIELDS) + ")"

    def __eq__(self, other):
        return isinstance(other, CallArg) and self.to_list() == other.to_list()


call_enclave_arg_t = CallArg
