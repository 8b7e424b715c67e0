import os


def main(args):
    os._exit(7)
