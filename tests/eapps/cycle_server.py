"""A server that calls back into its own call chain (tests/test_hostile.py).

req_arg 1: call its own name; 2: call the other of "ping"/"pong" with req_arg 3;
3: call the other of "ping"/"pong" with req_arg 1 (from pong that is ping, which is
already on the chain: a cycle);
4: asyn_enclave_call its own name; 0: just return.  resp_val: the nested call's return
code as an unsigned 64-bit value (0 when there is none), so that the caller sees the
innermost refusal."""
from tvmrt import _runtime
from tvmrt.eapp import *

U64 = (1 << 64) - 1


def main(args):
    a = args[10]
    me = _runtime.current.name
    other = "pong" if me == "ping" else "ping"
    if a == 0:
        return CallArg(resp_val=0)
    if a == 1:
        rc = call_enclave(acquire_enclave(me), CallArg(), timeout=20)
    elif a in (2, 3):
        inner = CallArg(req_arg=3 if a == 2 else 1)
        rc = call_enclave(acquire_enclave(other), inner, timeout=20)
        if rc == 0 and inner.resp_val:
            rc = inner.resp_val - (1 << 64)        # the refusal further in
    elif a == 4:
        rc = asyn_enclave_call(me, CallArg())
    else:
        rc = 0
    return CallArg(resp_val=rc & U64)
