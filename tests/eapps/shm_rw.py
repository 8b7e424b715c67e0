from tvmrt.eapp import *


def main(args):
    shm = ints(args[10], args[11] // 4)
    seen = shm[0]
    shm[1] = seen + 1                 # the host sees this at once (shared, not copied)
    relay = args[13]
    if relay:
        r = ints(relay, args[14] // 4)
        r[1] = r[0] * 2               # the host sees this after the run
    return seen
