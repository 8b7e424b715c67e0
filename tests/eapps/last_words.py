"""Leaves a reply unread in its socket, then faults: the monitor must still read the
fault that precedes the process's exit."""
import select

from tvmrt import _runtime, _wire


def main(args):
    sock = _runtime.current.chan.sock
    sock.send(_wire.encode({"op": "acquire", "name": "nobody", "rid": 1 << 40}))
    select.select([sock], [], [], 5)          # the reply is there, and stays unread
    raise ValueError("last words of a dying enclave")
