"""Sends the monitor a frame that is not msgpack at all."""
from tvmrt import _runtime as eapp_runtime


def main(args):
    eapp_runtime.current.chan.sock.send(b"\xc1\xc1 not msgpack")
    eapp_runtime.current.chan.sock.recv(100)     # the monitor cuts us off: EOF
    return 0
