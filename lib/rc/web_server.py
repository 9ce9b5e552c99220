"""rc-web's sockets: waitress, with limits a slow or hostile client cannot
exhaust, and HTTPS without a proxy.

waitress caps the connections it holds (then stops accepting) and closes
idle ones, but knows nothing of who holds them: 100 idle sockets from one
address locked everyone out, and a request that never finishes arriving
counted as activity. Here one address (an IPv6 /64) holds at most
`web_connections_per_address`; a request, TLS handshake included, must
arrive whole within `web_read_timeout`, and its body may be at most
`body_limit` bytes -- except a request that `long_body` allows (an upload
with the admin token): its headers must arrive within `web_read_timeout`,
then its body may be as large as `long_body` says and take as long as it
needs while it keeps coming at `min_body_rate` (a slow drip is still cut
off, so the slow-loris hole stays closed); an idle connection closes after
`web_channel_timeout`, or at once when the cap is reached and a new client
knocks. waitress has no TLS: a TLS channel does the handshake
and the encryption inside waitress's own non-blocking loop, so nothing
blocks it and every limit above applies to TLS connections too.
"""
import logging
import os
import select
import socket
import ssl
import threading
import time

from waitress.buffers import FileBasedBuffer
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.receiver import FixedStreamReceiver
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher, WSGITask
from waitress.utilities import BadRequest, RequestEntityTooLarge

from rc import tls
from rc.throttle import address_key, as_accepted

# Seconds a request's thread, its answer sent, waits on the connection for
# the client's next request and serves it itself (see Channel.linger): a
# client submitting again within it skips waitress's loop and the hand-over
# of its request to a thread (each a wake-up of a thread, on a small machine
# often of an idle CPU: ~0.2 ms of the round trip together).
LINGER = 0.05
REFUSAL_TEXT = b"too many connections from your address\n"
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
           b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
           % (len(REFUSAL_TEXT), REFUSAL_TEXT))


TLS_HANDSHAKE = b"\x16"       # a TLS record's first byte (a ClientHello's); no HTTP method's
# Bytes of a body refused on its headers that are read and thrown away
# before the answer, for a client that sends it all before it reads
# (Request.refuse_once_sent); a larger one is answered at once.
DISCARD_LIMIT = 4 * 1024 * 1024


class WaitressLog(logging.Handler):
    """waitress's own messages (a socket error, an exception while serving)
    as our JSON lines, rate limited per message, instead of bare text on
    stderr."""

    LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}

    def __init__(self, log):
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record):
        try:
            fields = {"message": record.getMessage()[:500]}
            if record.exc_info and record.exc_info[1] is not None:
                fields["error"] = repr(record.exc_info[1])[:500]
            self.log(self.LEVELS.get(record.levelno, "error"), "web_server_message",
                     str(record.msg)[:100], **fields)
        except Exception:         # a log line is never worth a crash
            pass


def route_waitress_log(log):
    logger = logging.getLogger("waitress")
    logger.handlers = [WaitressLog(log)]
    logger.setLevel(logging.INFO)
    logger.propagate = False


class LengthRequired(BadRequest):
    code = 411
    reason = "Length Required"


class Refused(Exception):
    """What `long_body` raises to refuse a request on its headers, before
    any of its body is read: an upload the store has no room for."""

    def __init__(self, code, reason, message):
        super().__init__(message)
        self.code, self.reason = code, reason


class Refusal(BadRequest):
    """A Refused as waitress answers it."""

    def __init__(self, refused):
        super().__init__(str(refused))
        self.code, self.reason = refused.code, refused.reason


class Request(HTTPRequestParser):
    """A request whose body limit is decided on its headers: `body_limit`,
    or what `long_body` allows it (then it is `long`: see Channel.overdue).
    waitress's own max_request_body_size is the largest of them all.
    `long_body` may leave in `held` something to release() when the
    request ends, however it ends (an upload's room in the store)."""

    long = False
    body_limit = None         # bytes, once the headers are in
    held = None
    body_file = None          # where `long_body` wants the body written, if not a buffer

    def __init__(self, adj, limits):
        super().__init__(adj)
        self.limits = limits

    def received(self, data):
        consumed = super().received(data)
        if isinstance(self.error, RequestEntityTooLarge) and self.body_limit is None:
            # waitress's own max_request_body_size, on the headers: said in
            # the words this request's own limit would have had.
            self.decide_body_limit()
            self.error = RequestEntityTooLarge(self.too_large(self.content_length))
            return consumed
        if self.error is not None or not self.headers_finished:
            return consumed
        if self.body_limit is None:
            self.decide_body_limit()
            if self.error is not None:          # refused on its headers (Refused)
                self.refuse_once_sent()
                return consumed
            if self.body_file is not None and not self.chunked and self.body_rcv is not None:
                self.body_rcv = FixedStreamReceiver(self.content_length,
                                                    FileBasedBuffer(self.body_file))
            if self.long and self.chunked:
                # waitress would take the whole body (up to the allowance, to
                # a temporary file) before the app could see there is no length.
                self.error = LengthRequired("send the body with a Content-Length")
                self.completed, self.expect_continue = True, False    # no 100 Continue
                return consumed
        size = max(self.content_length, self.body_bytes_received)
        if size > self.body_limit:
            self.error = RequestEntityTooLarge(self.too_large(size))
            self.refuse_once_sent()
        return consumed

    def refuse_once_sent(self):
        """Answer the refusal now, or, for a small body the client is
        sending anyway (it did not ask first, Expect: 100-continue), once
        that body is in, read and thrown away. urllib and requests send the
        whole body before they read: closed on with its bytes unread, the
        connection is reset, which loses the answer (a broken pipe, not
        the 413 that says why)."""
        left = self.content_length - self.body_bytes_received
        if self.expect_continue or self.chunked or self.body_rcv is None \
                or not 0 < left <= DISCARD_LIMIT:
            self.completed, self.expect_continue = True, False    # no 100 Continue
        else:
            self.body_rcv = FixedStreamReceiver(left, Discarded())

    def decide_body_limit(self):
        allowed = self.allowance()
        self.long = allowed is not None
        self.body_limit = allowed if self.long else self.limits["body_limit"]

    def too_large(self, size):
        """The refusal's words: the server's own (limits' too_large, a
        function of the request, its body's size and the limit), or waitress's."""
        words = self.limits.get("too_large")
        if words is not None:
            try:
                return words(self, size, self.body_limit)
            except Exception:       # whatever the app's words raise, waitress's
                pass
        return "exceeds max_body of %s" % self.body_limit

    def allowance(self):
        long_body = self.limits.get("long_body")
        # A request whole with its headers has no body to allow; one refused
        # on them has, for its refusal's words.
        if long_body is None or (self.completed and self.error is None):
            return None
        try:
            return long_body(self)
        except Refused as e:
            self.error = Refusal(e)
            return None
        except Exception:       # whatever the app's check raises, no allowance
            return None

    def close(self):
        """The request has ended (answered, refused, or its connection
        closed): what it held goes."""
        held, self.held = self.held, None
        try:
            if held is not None:
                held.release()
        finally:
            super().close()


class Discarded:
    """A body buffer that keeps nothing (Request.refuse_once_sent)."""

    def append(self, data):
        pass

    def __len__(self):
        return 0

    def close(self):
        pass


class OneSendTask(WSGITask):
    """waitress sends an answer's head, then its body, each on its own
    (it sends as soon as it is given anything), and the client may wake
    for each: for a submit's answer, ~0.1 ms more on a busy machine. Here
    the head goes out with the body's first piece."""

    def get_environment(self):
        environ = super().get_environment()
        environ["rc.held"] = self.request.held
        environ["rc.local_address"] = self.channel.local_address()
        return environ

    def write(self, data):
        if self.wrote_header or not data:
            return super().write(data)
        channel = self.channel
        self.channel = held = HeadHolder(channel)
        try:
            super().write(data)
        finally:
            self.channel = channel
            held.release()


class HeadHolder:
    """The channel, to a task's first write: the head it is given is held
    and sent with what comes next."""

    def __init__(self, channel):
        self.channel, self.head = channel, None

    def __getattr__(self, name):
        return getattr(self.channel, name)

    def write_soon(self, data):
        if self.head is None:
            self.head = data
            return len(data)
        head, self.head = self.head, b""
        return self.channel.write_soon(head + data)

    def release(self):
        """A head that no body followed (a HEAD request's) goes alone."""
        head, self.head = self.head, b""
        if head:
            self.channel.write_soon(head)


class Channel(HTTPChannel):
    """A connection that knows whose it is and when its request began."""

    task_class = OneSendTask
    request_started = None
    send_blocked = False        # the socket took less than the last send gave it
    read_skipped = False        # the loop's last look left this socket out of its reads
    input_ended = False         # the client sent its end (a read of nothing)

    def __init__(self, server, sock, addr, adj, map=None):
        self.address_key = address_key(addr[0] if isinstance(addr, tuple) else addr)
        limits = server.limits
        self.parser_class = lambda adj: Request(adj, limits)
        self.read_lock = threading.Lock()       # the loop's reads and a lingering thread's
        super().__init__(server, sock, addr, adj, map)

    local = None

    def local_address(self):
        """The address the client reached (this end of its connection), for
        is_local_peer; None once the socket is gone."""
        if self.local is None:
            try:
                self.local = self.socket.getsockname()[0]
            except OSError:
                return None
        return self.local

    def received(self, data):
        if self.request is None:
            if data[:1] == TLS_HANDSHAKE:
                # https:// to a plain port: hang up now, where waiting for a
                # request that never comes held the client web_read_timeout.
                self.will_close = True
                return len(data)
            self.request_started = time.time()
        return super().received(data)

    lingering = None            # the thread waiting on the socket for the next request
    caught = False              # ... and a request it read is its to serve
    trigger_owed = False        # the loop is to be woken once this thread is done with it

    def service(self):
        """waitress's, but the loop is woken at the end only when it has
        something to do for this connection (see Server.pull_trigger), and
        the next request that comes within LINGER is served here too."""
        self.server.serving.channel = self
        try:
            super().service()
            while self.linger():
                super().service()
        finally:
            self.server.serving.channel = None
            if self.trigger_owed:
                self.trigger_owed = False
                self.server.pull_trigger()

    def linger(self):
        """Wait up to LINGER for the client's next request, reading it here
        (waitress's loop leaves the socket alone meanwhile: readable and
        handle_read_event), while at least half of the threads stay idle for
        everyone else; True when one came whole, to be served by this
        thread. Otherwise the loop is woken to read the socket again."""
        if not self.server.may_linger():
            return False
        with self.requests_lock:
            # Not while another thread serves a request of this connection, nor
            # lingers on it: two would serve its requests at once, out of order.
            if self.lingering is not None or self.requests or self.request is not None \
                    or not self.connected \
                    or self.will_close or self.close_when_flushed or self.input_ended \
                    or self.total_outbufs_len:
                return False
            self.lingering, self.caught = threading.get_ident(), False
        try:
            self.wait_for_request(time.monotonic() + LINGER)
        finally:
            with self.requests_lock:
                self.lingering = None
                caught = self.caught
        if not caught:
            self.trigger_owed = False
            self.server.pull_trigger()      # if it left the socket out meanwhile
        return caught

    def wait_for_request(self, deadline):
        """Read the socket until a request is whole, the connection ends or
        the deadline passes."""
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN)
        while not self.caught and not self.requests and self.connected and not (
                self.will_close or self.close_when_flushed or self.input_ended):
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000.0):
                return
            self.handle_read()

    def handle_read_event(self):
        """waitress's, unless a thread lingers on the socket: it reads it
        (the loop may have been polling the socket since before). Should
        both read (the loop looked just before the thread began to linger),
        read_lock keeps the bytes in order, and a request the loop read goes
        to the pool as ever (Server.add_task)."""
        if self.lingering is None or self.lingering == threading.get_ident():
            super().handle_read_event()

    def writable(self):
        """waitress's, less an answer its request's thread is sending: with
        send_bytes=1 that thread sends what it writes itself, and while it
        held the buffer's lock the loop, polling a socket always ready for
        writing, spun (~55 polls an upload) and kept the GIL from it. The
        loop sends for a request in progress only what its socket did not
        take (send_blocked: the thread has pulled the trigger) or past the
        high watermark (the thread waits for it then); an answer whose
        request ended is the loop's to send, as in waitress."""
        if self.input_ended and not self.requests:
            self.close_when_flushed = True      # every answer owed is written
        if self.will_close or self.close_when_flushed:
            return True
        waiting = self.total_outbufs_len
        return bool(waiting) and (not self.requests or self.send_blocked
                                  or waiting >= self.adj.outbuf_high_watermark)

    def readable(self):
        """waitress's, noting when the loop leaves the socket out (an answer
        being written, a request waiting): the request's end must wake it
        then (needs_loop), or a request sent meanwhile waits for the loop's
        1 s timeout. Set before the look, so a request ending during it
        still sees it."""
        self.read_skipped = True
        readable = not self.input_ended and self.lingering is None and super().readable()
        self.read_skipped = not readable
        return readable

    def handle_read(self):
        """waitress's, but a client that ends its sending after a request
        (shutdown(SHUT_WR), `nc -N`) still gets the answer: waitress closed
        at once and dropped it. The socket is read no more (it would poll
        readable for good) and closes once the answers owed are sent (see
        writable)."""
        with self.read_lock:
            sock = self.socket      # None once closed (by the loop, while a thread lingered)
            if sock is None:
                return
            try:
                data = sock.recv(self.adj.recv_bytes)
            except BlockingIOError:
                return
            except OSError:
                return self.handle_close()
            if data:
                self.last_activity = time.time()
                self.received(data)
            else:
                self.input_ended = True

    def del_channel(self, map=None):
        """Every close comes here: a request whose body was still arriving
        (cut, too slow) ends with its connection."""
        super().del_channel(map)
        request, self.request = self.request, None
        if request is not None:
            request.close()

    def check_client_disconnected(self):
        """For a stream or a long wait (waitress.client_disconnected): its
        client's end of sending ends it, as when waitress closed then; an
        ordinary answer is still sent (handle_read)."""
        return not self.connected or self.input_ended

    def send(self, data, do_close=True):
        sent = self.send_now(data, do_close)
        self.send_blocked = sent < len(data)
        return sent

    def send_now(self, data, do_close):
        return super().send(data, do_close)

    def needs_loop(self):
        """Whether waitress's loop must look at this connection again: output
        it must send, a close, or a request that came while another was being
        served (the loop stopped reading the connection then)."""
        return bool(self.read_skipped or self.needs_loop_now())

    def needs_loop_now(self):
        """needs_loop(), less a socket the loop left out of its reads while
        a request was served: when that request is answered, its thread
        lingers on the socket next, reading it itself, and wakes the loop
        only once it stops (Server.pull_trigger)."""
        return bool(self.total_outbufs_len or self.will_close or self.close_when_flushed
                    or self.requests or self.input_ended)

    def overdue(self, now, read_timeout):
        """A request that began arriving too long ago and is still not whole;
        a long one (an upload) has read_timeout more for each min_body_rate
        bytes of its body that came."""
        request = self.request
        if request is None or request.completed or self.request_started is None:
            return False
        allowed = read_timeout
        if getattr(request, "long", False):
            allowed += request.body_bytes_received / float(self.server.limits["min_body_rate"])
        return now - self.request_started > allowed


    def stalled(self, cutoff):
        """An answer that has waited for its client since before `cutoff`
        and that waitress would keep for good: one of a request in progress
        past 16 MiB holds the request's thread until the client reads (and
        waitress never closes a channel with a request in progress for
        silence), and one whose request ended keeps the channel open, since
        waitress closes a channel only once its socket takes a write. Either
        way a client that never reads would hold a thread or a connection
        (at web_connection_limit, all of them) for good."""
        waiting = self.total_outbufs_len
        return waiting > 0 and self.last_activity < cutoff and (
            not self.requests or waiting >= self.adj.outbuf_high_watermark)


class TLSChannel(Channel):
    """A channel over TLS: the handshake and every read and write are
    non-blocking steps of waitress's loop. OpenSSL objects are not for two
    threads at once, and waitress writes from its task threads while the
    loop reads, hence the lock."""

    def __init__(self, server, sock, addr, adj, map=None):
        self.handshaking, self.handshake_writes = True, False
        self.tls_lock = threading.Lock()
        super().__init__(server, sock, addr, adj, map)
        self.request_started = self.creation_time   # the handshake counts as reading

    def linger(self):
        """Never over TLS: the loop alone reads a TLS connection (its
        handshake and records are steps of the loop)."""
        return False

    def overdue(self, now, read_timeout):
        if self.handshaking:
            return now - self.creation_time > read_timeout
        return super().overdue(now, read_timeout)

    def readable(self):
        return True if self.handshaking else super().readable()

    def writable(self):
        if self.handshaking:
            return self.handshake_writes or self.will_close
        return super().writable()

    def handle_write(self):
        if self.handshaking and self.will_close:
            return self.handle_close()
        if self.handshaking:
            return self.shake_hands()
        return super().handle_write()

    def shake_hands(self):
        try:
            with self.tls_lock:
                self.socket.do_handshake()
        except ssl.SSLWantReadError:
            self.handshake_writes = False
        except ssl.SSLWantWriteError:
            self.handshake_writes = True
        except (ssl.SSLError, OSError) as e:
            self.server.log("debug", "web_tls_handshake_failed", self.address_key,
                            address=self.address_key, error=str(e))
            self.handle_close()
        else:
            self.handshaking = False
            self.last_activity = time.time()
            self.handle_read()      # a request that came with the handshake's end

    def handle_read(self):
        if self.handshaking:
            return self.shake_hands()
        try:
            data = self.read_available()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:          # ssl.SSLError included: a broken or closed session
            data = b""
        if not data:
            return self.handle_close()
        self.last_activity = time.time()
        self.received(data)

    def read_available(self):
        """What the socket has, including what OpenSSL already decrypted and
        holds (select() cannot see that)."""
        with self.tls_lock:
            data = self.socket.recv(self.adj.recv_bytes)
            while data and self.socket.pending():
                data += self.socket.recv(self.socket.pending())
        return data

    def send_now(self, data, do_close):
        try:
            with self.tls_lock:
                return self.socket.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return 0
        except OSError:
            if do_close:
                self.handle_close()
            return 0


class LastInFirstOut:
    """A condition variable over `lock` whose notify() wakes the thread that
    began waiting last (threading.Condition wakes the one waiting longest)."""

    def __init__(self, lock):
        self.lock = lock
        self.waiters = []

    def wait(self, timeout=None):
        waiter = threading.Lock()
        waiter.acquire()
        self.waiters.append(waiter)
        self.lock.release()
        try:
            woken = waiter.acquire(True, -1 if timeout is None else timeout)
        finally:
            self.lock.acquire()
        if not woken and waiter in self.waiters:
            self.waiters.remove(waiter)
        return woken

    def notify(self, n=1):
        while self.waiters and n > 0:
            self.waiters.pop().release()
            n -= 1

    def notify_all(self):
        self.notify(len(self.waiters))


class WarmThreads(ThreadedTaskDispatcher):
    """waitress's threads, the one idle last taking the next request:
    waitress wakes the one idle longest, so with rc-web's ~50 threads
    every request ran on a cold thread (its stack, its SQLite connection),
    ~20% more CPU a request."""

    def __init__(self, threads):
        super().__init__()
        self.queue_cv = LastInFirstOut(self.lock)
        self.set_thread_count(threads)


class Server(TcpWSGIServer):
    """waitress's TCP server with the per-address cap, the read deadline
    and TLS. `limits` holds connections_per_address, read_timeout
    (seconds), body_limit (bytes) and, optionally, long_body (a function of
    a Request: the body in bytes it may send, at min_body_rate bytes per
    second at least, or None) and too_large (of a Request, its body's size
    and the limit it is over: what the 413 says); `tls_context`, when given, makes every connection HTTPS;
    `log(level, event, key, **fields)` is rate limited."""

    def __init__(self, application, limits, log, tls_context=None, **adjustments):
        self.limits = dict({"body_limit": adjustments.get("max_request_body_size",
                                                          1073741824)}, **limits)
        self.log, self.tls_context = log, tls_context
        self.channel_class = TLSChannel if tls_context else Channel
        self.serving = threading.local()       # .channel: the one this thread serves
        super().__init__(application, dispatcher=WarmThreads(adjustments.get("threads", 4)),
                         **adjustments)

    def bind_server_socket(self):
        """On "::" IPv4 too, as rc-server and rc-files: waitress makes an
        IPv6 socket IPv6 only, and rc-web on web_host "::" was out of reach
        of every IPv4 client, 127.0.0.1 too (make run waited 30 s for it)."""
        if self.family == socket.AF_INET6 and self.sockinfo[3][0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().bind_server_socket()

    def add_task(self, channel):
        """A request is whole: a thread serves it, unless it was read by the
        thread lingering on its connection (Channel.linger), which does."""
        if channel.lingering is not None and channel.lingering == threading.get_ident():
            channel.caught = True           # (called with the channel's requests_lock)
            return
        super().add_task(channel)

    def may_linger(self):
        """Whether a thread may wait on its connection for a next request:
        nothing queued for a thread, and more than half of them idle (a
        hint, read without the dispatcher's lock)."""
        dispatcher = self.task_dispatcher
        idle = len(dispatcher.threads) - dispatcher.stop_count - dispatcher.active_count
        return not dispatcher.queue and idle > len(dispatcher.threads) // 2

    def pull_trigger(self):
        """Wake waitress's loop, unless a request thread asks it after an
        answer that left the loop nothing to do (all sent, the connection
        staying open): waitress wakes it after every request, one more
        thread running at the moment the scheduler takes the new task. A
        loop that only left the socket out of its reads is woken when the
        thread is done with the connection (Channel.service), not after
        each answer: the thread lingers on the socket first, and the
        client's next request comes to it (a wake-up of the loop thread
        and a write to its trigger a round trip, ~0.1 ms of rc-web's CPU)."""
        channel = getattr(self.serving, "channel", None)
        if channel is None or channel.needs_loop_now():
            super().pull_trigger()
        elif channel.read_skipped:
            channel.trigger_owed = True

    def handle_accept(self):
        """Never raises: an error here would close the listening socket."""
        try:
            self.accept_one()
        except Exception as e:
            self.log("error", "web_accept_failed", type(e).__name__,
                     error="%s: %s" % (type(e).__name__, e))

    def accept_one(self):
        try:
            pair = self.accept()
            if pair is None:
                return
            conn, addr = pair
            self.set_socket_options(conn)
        except OSError as e:      # a connection reset before we took it, or no file left
            self.log("info", "web_accept_failed", "", error=str(e))
            return
        addr = as_accepted(addr)    # REMOTE_ADDR; /proc/net/tcp has it as IPv4 too
        key = address_key(addr[0])
        if self.over_address_limit(key):
            return self.refuse(conn, key)
        try:
            if self.tls_context:
                conn = self.tls_context.wrap_socket(conn, server_side=True,
                                                    do_handshake_on_connect=False)
            self.channel_class(self, conn, addr, self.adj, map=self._map)
        except OSError as e:
            self.log("info", "web_accept_failed", key, address=key, error=str(e))
            conn.close()

    def over_address_limit(self, key):
        limit = self.limits["connections_per_address"]
        return bool(limit) and sum(1 for channel in list(self.active_channels.values())
                                   if channel.address_key == key) >= limit

    def refuse(self, conn, key):
        self.log("warning", "web_connection_refused", key, address=key,
                 reason="more than %d connections from this address"
                        % self.limits["connections_per_address"])
        try:
            if not self.tls_context:
                conn.send(REFUSAL)
        except OSError:
            pass
        conn.close()

    def readable(self):
        """At the connection limit waitress stops accepting until one
        closes; the oldest connection that is not being served closes first
        instead, so sockets held from many addresses cannot lock anyone out."""
        if self.accepting and len(self._map) >= self.adj.connection_limit:
            self.close_oldest_unserved()
        return super().readable()

    def close_oldest_unserved(self):
        channels = list(self.active_channels.values())
        if any(channel.will_close for channel in channels):
            return          # one is already on its way out
        waiting = [channel for channel in channels if not channel.requests]
        if waiting:
            oldest = min(waiting, key=lambda channel: channel.last_activity)
            oldest.will_close = True
            self.log("warning", "web_connection_limit_reached", "",
                     limit=self.adj.connection_limit, closed=oldest.address_key)

    def maintenance(self, now):
        """waitress closes idle connections; this also closes those whose
        request (or TLS handshake) has taken longer than read_timeout."""
        super().maintenance(now)
        for channel in list(self.active_channels.values()):
            if channel.overdue(now, self.limits["read_timeout"]):
                self.log("info", "web_request_too_slow", channel.address_key,
                         address=channel.address_key,
                         seconds=round(now - channel.request_started, 3))
                channel.will_close = True
            elif channel.stalled(now - self.adj.channel_timeout):
                self.log("info", "web_client_not_reading", channel.address_key,
                         address=channel.address_key, waiting_bytes=channel.total_outbufs_len)
                # Closed now: will_close waits for the socket to take a write,
                # which a client that reads nothing never allows.
                channel.handle_close()

    def run(self):
        """waitress's loop, restarted if anything escapes it: one bad
        connection never ends rc-web."""
        while True:
            try:
                return super().run()
            except Exception as e:
                self.log("error", "web_loop_failed", type(e).__name__,
                         error="%s: %s" % (type(e).__name__, e))
                time.sleep(0.1)


def tls_context(config):
    """The dashboard's certificate: the one the user names (web_tls_cert and
    web_tls_key), else the worker port's, in var/tls/."""
    cert_path, key_path = tls.paths(config)
    if config.web_tls_cert:
        cert_path = config.web_tls_cert
        key_path = config.web_tls_key or config.web_tls_cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(os.path.expanduser(cert_path), os.path.expanduser(key_path))
    return context
