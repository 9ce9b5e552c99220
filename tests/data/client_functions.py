"""Functions tests/test_client.py ships to devices through rc.client.Executor."""
import os
import sys
import time

OFFSET = 10


class Unlucky(Exception):
    pass


def add_offset(number):
    return number + OFFSET


def where(number):
    """Which Python ran it, and in which process."""
    return list(sys.version_info[:2]), os.getpid(), number * 2


def unlucky(number):
    if number == 13:
        raise Unlucky("13 is unlucky")
    return number


def nap(seconds):
    time.sleep(seconds)
    return seconds


def noop(number):
    return number


def make_adder(amount):
    def adder(number):
        return number + amount
    return adder


def leave(number):
    """Leaves its process without returning when number is 3 (os._exit),
    dies of SIGSEGV when 4, raises when 5."""
    if number == 3:
        os._exit(3)
    if number == 4:
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)
    if number == 5:
        raise Unlucky("%d is unlucky" % number)
    return number, os.getpid()


def sized(length, seed="x"):
    """A string of `length` characters: a result as large as asked."""
    return seed * length


def length_of(value):
    return len(value)
