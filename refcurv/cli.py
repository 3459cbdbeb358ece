"""``refcurv`` / ``python -m refcurv``: print the method catalogue and the conventions."""
import argparse
import sys

from .catalogue import render


def main(argv=None):
    parser = argparse.ArgumentParser(prog="refcurv", description=__doc__)
    parser.parse_args(argv)
    sys.stdout.write(render() + "\n")
    return 0
