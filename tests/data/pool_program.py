"""A program written for ProcessPoolExecutor, run on the cluster by changing
one line (tests/test_client.py runs it both ways and compares the output):

    with ProcessPoolExecutor(max_workers=4) as executor:      # on this machine
    with Executor(max_workers=4) as executor:                 # on the fleet

It uses what such programs use: submit, map with a chunk size,
as_completed, an exception from a worker, a helper function, a constant,
a class of its own, and imports.
"""
import hashlib
import math
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: F401

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")
from rc.client import Executor  # noqa: E402,F401

ROUNDS = 1000


class Summary:
    def __init__(self, number, digest):
        self.number, self.digest = number, digest

    def __repr__(self):
        return "Summary(%d, %s)" % (self.number, self.digest[:12])


def digest(number):
    value = str(number).encode()
    for _ in range(ROUNDS):
        value = hashlib.sha256(value).digest()
    return value.hex()


def summarise(number):
    return Summary(number, digest(number))


def root(number):
    if number < 0:
        raise ValueError("no real root of %d" % number)
    return math.sqrt(number)


def main():
    with Executor(max_workers=4) as executor:
        futures = {executor.submit(summarise, n): n for n in range(6)}
        print("finished", sorted(futures[f] for f in as_completed(futures)))
        print(sorted((futures[f], repr(f.result())) for f in futures))
        print(list(executor.map(root, [1, 4, 9, 16, 25], chunksize=2)))
        try:
            executor.submit(root, -1).result()
        except ValueError as e:
            print("ValueError:", e)


if __name__ == "__main__":
    main()
