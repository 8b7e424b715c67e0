import os
import signal


def main(args):
    os.kill(os.getpid(), signal.SIGKILL)
