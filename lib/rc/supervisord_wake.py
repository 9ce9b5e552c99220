"""Loaded into supervisord (etc/supervisord.conf, [rpcinterface:rc_wake]) so
that it sees a program exit at once rather than up to a second later.

supervisord's loop sleeps in poll() for up to one second. A signal (SIGCHLD
when a program exits, SIGTERM for it to stop) does not end that sleep:
Python retries a poll interrupted by a signal (PEP 475), so supervisord reaps
the exited program, and goes on with what waits for that (the next program of
an ordered stop, `supervisorctl stop` or `restart` returning, restarting a
program that died), only when the second is up. `make stop` stops its six
programs one after the other: it took 3.5-5 s, most of it these waits.

Python writes each signal's number to the file given to
signal.set_wakeup_fd; that pipe's read end in supervisord's poll makes the
retried poll return at once. supervisord has no option for this; an RPC
interface factory is the hook it offers for code of ours to run in its
process, so this is one, with no methods of its own.
"""
import os
import signal

from supervisor.medusa import asyncore_25 as asyncore


class SignalWaker:
    """The read end of the wake-up pipe, as a dispatcher of supervisord's
    socket map: readable always, and what it reads is thrown away (supervisord
    reads which signals came from its own handler)."""

    def __init__(self, fd):
        self.fd = fd

    def readable(self):
        return True

    def writable(self):
        return False

    def handle_read_event(self):
        try:
            while os.read(self.fd, 4096):
                pass
        except OSError:         # empty (EAGAIN): every byte read
            pass

    def handle_write_event(self):
        pass

    def handle_error(self):
        pass


def make_interface(supervisord, **config):
    """The factory supervisord calls as it opens its RPC socket, in its main
    thread, before it daemonizes (the pipe and the wake-up fd go with it into
    the daemon) and again at each reload (after it closed every fd from 5 up:
    the old waker's entry is dropped, not closed, its number may be reused)."""
    socket_map = asyncore.socket_map
    for fd, dispatcher in list(socket_map.items()):
        if isinstance(dispatcher, SignalWaker):
            del socket_map[fd]
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    socket_map[read_end] = SignalWaker(read_end)
    supervisord.options.logger.info("rc_wake: a signal wakes supervisord's loop at once")
    return object()     # its RPC namespace: no methods, nothing to call
