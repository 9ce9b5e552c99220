"""Doorbells: how one program tells another "look at the database now".

State is only ever shared through the SQLite file; a ring carries nothing
but the hint that something was committed. A waiting program sleeps on its
bell (a Unix datagram socket in the run directory) with a timeout, so a
missed or lost ring costs at most that timeout, never correctness: the
program still checks `PRAGMA data_version` when it wakes.
"""
import os
import select
import socket

SCHEDULER = "rc-scheduler"
SERVER = "rc-server"
WEB = "rc-web"          # results committed: a request waiting for them looks now

_sender = None      # one unbound socket per process is enough to ring any bell


def path(run_dir, name):
    return os.path.join(run_dir, name + ".bell")


def ring(run_dir, name):
    """Ring a program's bell; never blocks, never fails loudly."""
    global _sender
    if _sender is None:
        _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _sender.setblocking(False)
    try:
        _sender.sendto(b"!", path(run_dir, name))
    except OSError:
        pass      # nobody listening, or the bell is full: it will look anyway


class Bell:
    """The bell a program waits on."""

    def __init__(self, run_dir, name):
        self.path = path(run_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        try:
            os.unlink(self.path)     # left by a predecessor killed with -9
        except FileNotFoundError:
            pass
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.setblocking(False)

    def fileno(self):
        return self.socket.fileno()

    def wait(self, timeout):
        """Sleep until rung or `timeout` seconds pass; True when rung."""
        readable, _, _ = select.select([self.socket], [], [], max(0.0, timeout))
        return bool(readable) and self.drain()

    def drain(self):
        """Swallow every ring so far: one look at the database answers all."""
        rung = False
        while True:
            try:
                self.socket.recv(64)
                rung = True
            except (BlockingIOError, InterruptedError):
                return rung

    def close(self):
        self.socket.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
