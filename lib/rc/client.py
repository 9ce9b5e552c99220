"""rc.client: submit work to a Retire-Cluster from Python and collect the results.

One file, standard library only, CPython 3.6 to 3.13. The main node serves
it as /client.py, so a laptop needs no installation:

    curl -O http://NAS:5000/client.py
    export RC_URL=http://NAS:5000 RC_TOKEN=...        # `rc token --admin`

    from client import Cluster, Executor
    with Cluster() as cluster:
        print(cluster.submit("shell", "uname -a").result())
    with Executor() as executor:                     # was ProcessPoolExecutor()
        print(list(executor.map(simulate, range(100))))

Tasks go out in batches: submits that arrive while a request is on its way
are sent together in the next one, in one transaction on the main node.
Results come back on one stream per Cluster (the results of its group of
tasks as they finish), never by polling each task. docs/client.md says what
an Executor can ship to a device: module-level functions (with the imports,
helpers and constants they use), not lambdas or closures.
"""
# The first line an older Python cannot parse (an f-string: Python 2.7 and
# 3.0-3.5), so its SyntaxError shows this line instead of one deep in the
# file. A check that prints one line, as worker.py's does, would need the
# whole file to parse under 2.7, and Executor.map's keyword-only timeout
# and chunksize (concurrent.futures' signature) do not.
f"client.py needs Python 3.6 or newer: run it with python3"
import __future__
import ast
import base64
import binascii
import collections
import concurrent.futures
import dis
import errno
import functools
import hashlib
import inspect
import io
import json
import logging
import os
import pickle
import select
import socket
import ssl
import stat
import sys
import sysconfig
import textwrap
import threading
import time
import tokenize
import types
import urllib.parse

__all__ = ["Cluster", "Executor", "TaskFuture", "ClusterError", "AnswerTooLarge", "TooSlow",
           "TaskFailed", "RemoteError", "RemoteTraceback"]

DEFAULT_URL = "http://127.0.0.1:5000"
REQUEST_TIMEOUT = 60.0          # seconds an ordinary request may take
MIN_TRANSFER_RATE = 4096        # bytes a second: a request may take its timeout and as
                                # long again as its bytes (sent and answered) take at
                                # this rate, however slowly they trickle; a download
                                # or a put that moves goes on for as long as it moves
BATCH_MAX_TASKS = 2000          # tasks in one submit request
BATCH_MAX_BYTES = 900 * 1024    # bytes of one submit request (rc-web takes 1 MiB)
STREAM_IDLE = 5.0               # seconds the result stream stays open with nothing pending
GOING_ON_WAIT = 2.0             # seconds an Executor's block left by an exception waits
                                # for the batch on its way, to name its tasks on stderr
STREAM_READ_TIMEOUT = 60.0      # seconds without a line (rc-web pings every 15) before
                                # the stream is opened again
MAX_HEAD_LINE = 65536           # bytes of a status line or header field we read
MAX_HEAD_FIELDS = 100           # header fields of one answer
MAX_INTERIM_ANSWERS = 10        # 1xx answers before the answer (rc-web sends none)
READ_PIECE = 1 << 20            # bytes read at once of a long body
QUOTA_UNIT = 1 << 20            # bytes of one MiB of files_quota_mb: a body this small fits any
MAX_ANSWER_BYTES = 64 * 1024 * 1024     # bytes of one answer's body the client holds
                                # (rc-web's largest, a bulk result read, carries 8 MiB
                                # of results); a main node sending more is refused
MAX_STREAM_LINE = 8 * 1024 * 1024       # bytes of one result stream line (one task's
                                # result: a worker's whole frame is at most 1 MiB)
STREAM_PIECE = 64 * 1024        # bytes read at once of a result stream
EARLY_MAX = 2 * BATCH_MAX_TASKS     # results held for task ids no batch's answer has named
EARLY_MAX_BYTES = 64 * 1024 * 1024  # ... and their bytes (stream lines): only the batches on
                                # their way may have such results; more (a main node
                                # streaming ids it never names) are dropped, and read
                                # again from rc-web once a batch's answer names its ids
SMALL_BODY = 64 * 1024          # bytes of a body sent in one write with its head
EXPECT_BODY = 1 << 20           # bytes of a body past which it waits for 100 Continue, as
                                # curl does: rc-web may refuse an upload on its headers
                                # (no room beside the uploads in flight), and a client
                                # still sending met a reset connection, not the refusal
EXPECT_WAIT = 1.0               # seconds it waits for that before sending anyway (a proxy
                                # may not pass 100 Continue on; curl's wait too)
RECONNECT_DELAY = 0.5           # seconds before opening a broken stream again; doubles
RECONNECT_MAX_DELAY = 30.0      # ... each time in a row, up to this
OUTPUT_FIRST_WAIT = 3.0         # seconds output() waits for a running task's first report
OUTPUT_POLL = 0.2               # seconds between its looks meanwhile
UNREACHABLE_WAIT = 600.0        # seconds a request waits, trying again, for an rc-web it
                                # reached before that now refuses to connect (a restart,
                                # `make stop` / `make run`): nothing of it was sent
UNREAD_CANCEL_TIMEOUT = 5.0     # seconds a map's cancel on its way out (cancel_unread) waits
                                # for rc-web's answer; past it, a thread sends it again
UNREACHABLE_MAX_DELAY = 2.0     # seconds between tries at most while it refuses: a refused
                                # connection costs neither side anything, and the main
                                # node back is used within this, not RECONNECT_MAX_DELAY
CUT_RETRIES = 3                 # times a request safe to send again is, its answer cut
STREAM_REFUSALS_MAX = 5         # refusals in a row of a result stream (a line the client
                                # cannot take, an HTTP 4xx) before the futures waiting fail
MAX_CHUNKSIZE = 1000            # calls map() puts in one task at most by default
CHUNKS_PER_SLOT = 4             # map() by default: about this many tasks per slot
                                # (and submit()'s packs, when calls wait for slots)
DEFAULT_PACK = 64               # Executor.submit() calls one python_exec task runs at most
LONE_READ_WAIT = 0.02          # seconds a pending result waits for its caller to read it
                                # (result()) before the receiver thread reads it
SLOTS_SECONDS = 60.0            # seconds map() trusts the fleet's slot count it read
IDLE_GAP = 0.001                # seconds without a submit() after which the next one is
                                # sent at once from the caller's thread
MAX_ARGUMENT_BYTES = 128 * 1024     # pickled arguments a task's code carries (base64 in
                                # it: the main node takes 256 KiB of code); a task's
                                # calls over it go as an input file, CALLS_FILE
CALLS_FILE = "rc-client-calls.pickle"   # that input, in the task's directory
PIECES_IN_CODE = 64 * 1024      # characters of a function's source and globals (pickled)
                                # a task's code carries: more go as the input PIECES_FILE,
                                # one file for all the function's tasks (devices cache it)
PIECES_FILE = "rc-client-code.pickle"
RESULT_MARK = "rc-client-result:1:"     # the line of a task's stdout with its outcomes
KEPT_STDOUT = ".rc/stdout"      # a task's whole stdout, kept by the main node when it
                                # passed the worker's output cap (a long result line)
STDERR_NOTE_MAX = 200           # characters of a failed command's stderr line TaskFailed quotes
PICKLE_PROTOCOL = 4             # every CPython from 3.4 reads it
PAYLOAD_OPTIONS = ("inputs", "stdin", "env", "outputs", "file", "pip")   # pip: docs/environments.md
# The payload field a task type's argument fills (rc.states.PAYLOAD_FIELD):
# submit("shell", "gzip -k a.txt", inputs=...) is {"command": ..., "inputs": ...}.
PAYLOAD_FIELD = {"echo": "message", "sleep": "seconds", "system_info": None,
                 "python_eval": "expression", "python_exec": "code",
                 "shell": "command"}
LOG = logging.getLogger("rc.client")    # its warnings reach stderr with no set-up
TASK_OPTIONS = ("priority", "timeout", "retries", "requirements", "idempotency_key",
                "retry_on_failure", "depends_on")


def shown(text):
    """Text a device or an answer chose, as a traceback may print it to a
    terminal: lines and tabs kept, every other character that is not
    printable (an escape sequence's ESC, a bidi override) as "?"."""
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in str(text))


class ClusterError(Exception):
    """The main node refused a request or could not be reached; `status` is
    the HTTP status (0 when there was no answer). The message may quote the
    answer (whoever gave it), so it is shown()."""

    def __init__(self, message, status=0):
        super().__init__(shown(message))
        self.status = status


class AnswerTooLarge(ClusterError):
    """An answer's body over MAX_ANSWER_BYTES, refused before it was held."""


class TaskFailed(Exception):
    """A task ended other than completed: `state` (failed, timed_out,
    cancelled), `error`, and the task's `result` (stderr, exit_code...)."""

    def __init__(self, task_id, state, error, result=None, note=""):
        super().__init__("task %s %s: %s%s" % (task_id, state,
                                               shown(told_why(error, result or {})), note))
        self.task_id, self.state, self.error, self.result = task_id, state, error, result or {}

    @property
    def stderr(self):
        return self.result.get("stderr") or ""


def timeout_note(future, state):
    """A task that named no timeout ran under the main node's default: a
    limit neither Dask nor ProcessPoolExecutor has, which the user never set."""
    if state != "timed_out" or (getattr(future, "spec", None) or {}).get("timeout") is not None:
        return ""
    return (" (the main node's default task_timeout, as no timeout was given:"
            " submit(..., timeout=SECONDS) or Executor(timeout=SECONDS) gives a longer one)")


def told_why(error, result):
    """A command's error is only its exit status: the last line of its
    stderr, which says why, goes with it (a device chose it: one line,
    shortened, control characters as "?")."""
    lines = [line.strip() for line in str(result.get("stderr") or "").splitlines()
             if line.strip()]
    if not (error or "").startswith("exit status ") or not lines:
        return error or "no error given"
    told = "".join(c if c.isprintable() else "?" for c in lines[-1][:STDERR_NOTE_MAX])
    return "%s (stderr: %s)" % (error, told)


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a device; set as the
    re-raised exception's __cause__, as ProcessPoolExecutor does."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text

    def __str__(self):
        return '\n"""\n%s"""' % self.text


class RemoteError(Exception):
    """An exception from a device that cannot be rebuilt here (its class
    does not unpickle on this side); its type name, message and traceback."""

    def __init__(self, type_name, message, traceback_text):
        super().__init__("%s: %s" % (type_name, message))
        self.type_name, self.message, self.traceback = type_name, message, traceback_text


# -- HTTP ------------------------------------------------------------------------------

class Http:
    """Requests to rc-web over kept-alive HTTP/1.1 connections, one per thread.

    An ordinary request is written and its answer read here, not by
    http.client, which spends ~0.1 ms of CPU a request on building and
    parsing headers (email.parser): more than a submit takes rc-web. The
    result stream is a ResultStream."""

    def __init__(self, url, token, ssl_context=None):
        if not isinstance(url, str):
            raise TypeError("url must be a string like http://HOST:PORT, not %r" % (url,))
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must look like http://HOST:PORT, not %r%s" % (
                url, " (http:// before it)" if "://" not in url else ""))
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.ssl_context = ssl_context
        self.local = threading.local()
        self.reached = False            # rc-web has answered this client once
        self.heard = False              # ...with HTTP: a cut alone may be another program's
        self.unset = ""                 # "RC_URL"/"RC_TOKEN" a default stood for: an
                                        # error the default likely caused names it
        self.lost_since = None          # time.monotonic() it stopped answering, while it does
        self.opening = None             # the socket of a stream whose head is awaited
        self.streams_stopped = False    # stop_streams() was called: open no more
        if token is not None:
            header_text(token, "the token", " ")
        host = "[%s]" % self.host if ":" in self.host else self.host
        default_port = self.port == (443 if self.scheme == "https" else 80)
        self.head_fields = "Host: %s\r\nAccept: application/json\r\n%s" % (
            host if default_port else "%s:%d" % (host, self.port),
            "Authorization: Bearer %s\r\n" % token if token else "")

    def tls(self):
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    def open_socket(self, timeout):
        try:
            sock = socket.create_connection((self.host, self.port), timeout)
        except OSError as e:
            raise Unreachable("cannot reach %s://%s:%d: %s" % (self.scheme, self.host,
                                                               self.port, e))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                sock = self.tls().wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLError as e:
            sock.close()
            # A certificate refused is not plain http: its own error (3.6
            # has no SSLCertVerificationError, only the reason).
            if isinstance(e, getattr(ssl, "SSLCertVerificationError", ())) or \
                    getattr(e, "reason", None) == "CERTIFICATE_VERIFY_FAILED":
                raise
            raise ClusterError("no TLS handshake with https://%s:%d: %s (rc-web serves plain"
                               " http unless \"web_tls\" is true in its etc/rc.json: then the"
                               " url is http://%s:%d)" % (self.host, self.port, e, self.host,
                                                          self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def open_link(self, timeout):
        """A socket to rc-web, a buffered reader of it, and its Paced reads."""
        sock = self.open_socket(timeout)
        paced = Paced(sock)
        return sock, io.BufferedReader(paced), paced

    def request(self, method, path, body=None, headers=None, timeout=REQUEST_TIMEOUT,
                bounded=True, with_fields=False, sink=None, patience=UNREACHABLE_WAIT):
        """send(), tried again while an rc-web that answered this client
        before refuses to connect (restarting, or the main node stopped and
        started again), for up to UNREACHABLE_WAIT (or `patience` seconds of
        this call's: a caller that said how long it waits), the wait
        doubling up to UNREACHABLE_MAX_DELAY: nothing was sent, so nothing
        is done twice.
        An rc-web never reached (a wrong RC_URL) is an error at once. A
        request whose answer was cut (rc-web stopped while it worked on it)
        is sent again the same way, CUT_RETRIES times at most, if it is safe
        to: a GET, a put, a cancel, or a submit with its Idempotency-Key
        (rc-web answers a key it has seen with what it queued then)."""
        delay, cuts, began = RECONNECT_DELAY, 0, time.monotonic()
        if getattr(UNREAD, "cancelling", False):
            # cancel_unread(): not waited for, an rc-web that hangs (halted,
            # its disk stalled) neither: each such cancel waited REQUEST_TIMEOUT
            patience, timeout = 0, min(timeout, UNREAD_CANCEL_TIMEOUT)
        start = body.tell() if hasattr(body, "read") else None     # a put's file
        while True:
            if start is not None:
                body.seek(start)
            try:
                answer = self.send(method, path, body, headers, timeout, bounded,
                                   with_fields, sink)
            except (Unreachable, Cut) as e:
                if isinstance(e, Cut):          # it took the connection: not a wrong RC_URL
                    self.reached, cuts = True, cuts + 1
                lost_for = self.unreachable(e)
                if lost_for is None and "RC_URL" in self.unset and not isinstance(e, Cut):
                    raise Unreachable("%s (RC_URL is not set: give Cluster the main node's"
                                      " dashboard address, http://NAS:5000)" % e) from None
                if lost_for is None and not isinstance(e, Cut):
                    raise Unreachable("%s (it has never answered this client: is the main"
                                      " node running, and is this the dashboard's address,"
                                      " as `rc join` there prints it?)" % e) from None
                if lost_for is None or cuts > CUT_RETRIES:
                    raise
                left = min(UNREACHABLE_WAIT - lost_for, patience - (time.monotonic() - began))
                if left <= 0:
                    raise
                time.sleep(min(delay, left))
                delay = min(delay * 2, UNREACHABLE_MAX_DELAY)
                continue
            self.answered()
            return answer

    def unreachable(self, error):
        """Seconds rc-web has not answered, said once on stderr (the logging
        module's last resort) so that a program that waits says why; None
        when it never answered this client."""
        if not self.reached:
            return None
        now = time.monotonic()
        if self.lost_since is None:
            self.lost_since = now
            # Never heard over HTTP (the devices' port hangs up): only the
            # cut request is tried again, CUT_RETRIES times; said "up to 600 s".
            LOG.warning("rc.client: %s; waiting for it to answer again (a restart?), %s", error,
                        "up to %d s" % UNREACHABLE_WAIT if self.heard
                        else "trying %d times more" % CUT_RETRIES)
        return now - self.lost_since

    def answered(self):
        self.reached = self.heard = True
        lost_since, self.lost_since = self.lost_since, None
        if lost_since is not None:
            LOG.warning("rc.client: %s://%s:%d answers again, after %.0f s", self.scheme,
                        self.host, self.port, time.monotonic() - lost_since)

    def send(self, method, path, body, headers, timeout, bounded, with_fields, sink):
        """(status, body bytes), and the answer's header fields (names in
        lower case) `with_fields`. A kept-alive connection the server closed
        meanwhile is opened again once (waitress closes idle ones). A body
        over MAX_ANSWER_BYTES is refused unless not `bounded` (a file the
        caller asked for, whatever its size). `body` may be a file opened
        for reading at its start (a put: sent from it, never held whole);
        `sink` takes a 200 answer's body as it comes (read_answer)."""
        length = os.fstat(body.fileno()).st_size - body.tell() if hasattr(body, "read") \
            else len(body or b"")
        expect = length > EXPECT_BODY
        if expect:
            headers = dict(headers or {}, Expect="100-continue")
        if hasattr(body, "read"):
            sending, start = body, body.tell()
            message = [self.head(method, path, None, headers, length=length)]
        else:
            sending, head = None, self.head(method, path, body, headers)
            # One write for a small request; a large body is not copied.
            message = [head + (body or b"")] if len(body or b"") <= SMALL_BODY else [head, body]
        limit = MAX_ANSWER_BYTES if bounded else None
        delivered = []          # sink was given part of a body: no second attempt
        if sink is not None:
            sink = functools.partial(deliver, sink, delivered)
        for attempt in (1, 2):
            link = getattr(self.local, "link", None)
            reused = link is not None
            try:
                if link is None:
                    link = self.local.link = self.open_link(timeout)
                link[2].start(timeout, sum(map(len, message)) + (
                    0 if sending is None else length))
                link[0].settimeout(timeout)
                link[0].sendall(message[0])
                answer = early_answer(link, method, limit, sink) if expect else None
                if answer is not None:          # refused on its headers: the body unsent
                    if not answer[2]:
                        self.drop()
                    return (answer[0], answer[1], answer[3]) if with_fields else answer[:2]
                for data in message[1:]:
                    link[0].sendall(data)
                if sending is not None:      # what it held when asked, from where it stood
                    # (socket.sendfile refuses a count of 0: an empty file)
                    sent = link[0].sendfile(sending, start, length) if length else 0
                    if sent != length:      # else rc-web waits for the rest, then closes
                        raise ClusterError("the file shrank while it was sent: %d of its %d"
                                           " bytes" % (sent, length))
                status, data, keep, fields = read_answer(link[1], method, limit, sink)
                if not keep:
                    self.drop()
                return (status, data, fields) if with_fields else (status, data)
            except Unreachable:
                self.drop()
                raise
            except (NoAnswer, ConnectionResetError, ConnectionAbortedError,
                    BrokenPipeError) as e:
                self.drop()
                if not reused or attempt == 2 or delivered:
                    cut = Cut if repeatable(method, path, headers) and not delivered else ClusterError
                    raise cut("no answer from %s://%s:%d: %s%s"
                              % (self.scheme, self.host, self.port, e, self.never_reached()))
            except CutShort as e:
                # Answered, then cut: never the kept-alive connection's second try.
                # It is rc-web (restarting, say), not a wrong RC_URL: a get() cut
                # mid-file as the client's first request waits for it to come back.
                self.drop()
                self.reached = self.heard = True
                cut = Cut if repeatable(method, path, headers) and not delivered else ClusterError
                raise cut("answer cut by %s://%s:%d: %s" % (self.scheme, self.host, self.port, e))
            except BadAnswer as e:
                self.drop()
                raise (AnswerTooLarge if isinstance(e, TooLarge) else ClusterError)(
                    "bad answer from %s://%s:%d: %s%s" % (self.scheme, self.host, self.port, e,
                                                          self.never_reached()))
            except OSError as e:
                self.drop()
                raise ClusterError("cannot reach %s://%s:%d: %s"
                                   % (self.scheme, self.host, self.port, e))
            except TooSlow as e:
                self.drop()
                raise TooSlow("%s %s: %s://%s:%d sent %s" % (method, path.split("?")[0],
                              self.scheme, self.host, self.port, e))
            except BaseException:
                self.drop()     # Ctrl-C mid-answer: its rest is not the next answer
                raise

    def never_reached(self):
        """What to check when something that is not rc-web answered (or hung
        up at) the first request: most often the devices' port, which `rc
        join` prints beside the dashboard's."""
        if self.heard:
            return ""
        return (" (is %s://%s:%d rc-web? The client wants the dashboard's address, port"
                " 5000 unless RC_WEB_PORT moved it, not the devices' ports, 8080 and 8081)"
                % (self.scheme, self.host, self.port))

    def head(self, method, path, body, headers, length=None):
        """The request's line and fields: ours, the caller's, the body's
        length (`length`, for a body sent from a file)."""
        fields = self.head_fields
        for name, value in (headers or {}).items():
            fields += "%s: %s\r\n" % (name, header_text(value, name))
        if length is not None or body is not None or method in ("POST", "PUT"):
            fields += "Content-Length: %d\r\n" % (len(body or b"") if length is None
                                                   else length)
        return ("%s %s%s HTTP/1.1\r\n%s\r\n" % (method, self.prefix, header_text(
            path, "a request path", " "), fields)).encode("ascii")

    def drop(self):
        link = getattr(self.local, "link", None)
        self.local.link = None
        if link is not None:
            link[1].close()
            link[0].close()

    def json(self, method, path, value=None, ok=(200, 201), timeout=REQUEST_TIMEOUT,
             raw_body=None, headers=None, patience=UNREACHABLE_WAIT):
        body = raw_body if raw_body is not None else (
            None if value is None else json.dumps(value).encode())
        if body is not None:
            headers = dict(headers or {}, **{"Content-Type": "application/json"})
        status, data = self.request(method, path, body, headers, timeout, patience=patience)
        return self.answer(method, path, status, data, ok)

    def answer(self, method, path, status, data, ok):
        """json_answer's, a 401 for want of a token naming RC_TOKEN."""
        try:
            return json_answer(method, path, status, data, ok)
        except ClusterError as e:
            if e.status == 401 and "RC_TOKEN" in self.unset:
                raise ClusterError("%s (RC_TOKEN is not set: `rc token --admin` on the"
                                   " main node prints the token)" % e, 401) from None
            raise

    def stream(self, path, timeout):
        """A ResultStream of GET `path`, on a connection of its own."""
        try:
            sock = self.open_socket(timeout)
        except Unreachable as e:
            self.unreachable(e)         # the receiver opens it again, and again
            raise
        except OSError as e:
            raise ClusterError("cannot open %s: %s" % (path, e))
        self.opening = sock
        try:
            if self.streams_stopped:
                raise ClusterError("cannot open %s: the client is closed" % path)
            sock.sendall(self.head("GET", path, None, None))
            head, rest = read_head(sock, time.monotonic() + timeout)
            reader = io.BytesIO(head)
            _, status = status_line(reader.readline(MAX_HEAD_LINE + 1))
            fields = head_fields(reader)
            if status != 200:
                raise ClusterError("GET %s: %s (HTTP %d)" % (path.split("?")[0], rest[:300].decode(
                    "utf-8", "replace"), status), status)
            self.answered()
            return ResultStream(sock, rest, "chunked" in fields.get("transfer-encoding", "").lower())
        except BaseException as e:
            sock.close()
            if isinstance(e, (OSError, BadAnswer)):
                raise ClusterError("cannot open %s: %s" % (path, e))
            raise
        finally:
            self.opening = None

    def stop_streams(self):
        """Wake a thread waiting for a stream's head (rc-web sends it with
        the first result or ping, seconds away), and open no more streams:
        close() would wait for that thread up to its join's 5 s."""
        self.streams_stopped = True
        sock = self.opening
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass            # closed already


def json_answer(method, path, status, data, ok):
    """An answer's JSON; a ClusterError naming its error unless its status
    is in `ok` (a proxy's HTML page of a 413 or a 502 included)."""
    try:
        answer = json.loads(data.decode("utf-8")) if data else {}
    except (ValueError, RecursionError):     # nested past the limit: not the rc-web we know
        answer = {"error": data[:200].decode("utf-8", "replace")}
    if status not in ok:
        raise ClusterError("%s %s: %s (HTTP %d)" % (method, path.split("?")[0],
                           answer.get("error", answer) if isinstance(answer, dict)
                           else answer, status), status)
    return answer


def header_text(text, what, also_refused=""):
    """`text` when it is printable ASCII (nothing that could end a line of
    the request and start another), else ValueError naming `what`."""
    if not text.isprintable() or max(map(ord, text), default=0) > 127 \
            or any(c in text for c in also_refused):
        raise ValueError("%s must be printable ASCII%s, not %r" % (
            what, " without spaces" if also_refused else "", text[:200]))
    return text


def deliver(sink, delivered, piece):
    delivered.append(len(piece))
    sink(piece)


class Paced(io.RawIOBase):
    """A kept-alive connection's reads, against its request's deadline. The
    socket's timeout bounds one wait: an rc-web (or a proxy) that sent a
    byte just inside each held a request with a bounded wait for ever. A
    request has its timeout, and 1/MIN_TRANSFER_RATE s more for each byte
    sent or come, so a long download that moves goes on."""

    def __init__(self, sock):
        self.sock = sock
        self.start(REQUEST_TIMEOUT, 0)

    def start(self, timeout, sending):
        """A request begins: `timeout` seconds, and `sending` bytes to send."""
        self.timeout, self.deadline = timeout, time.monotonic() + timeout
        self.moved(sending)

    def moved(self, size):
        self.deadline += size / MIN_TRANSFER_RATE

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left > 0:
            self.sock.settimeout(min(self.timeout, left))
            try:
                size = self.sock.recv_into(buffer)
                self.moved(size)
                return size
            except socket.timeout:
                if time.monotonic() < self.deadline:
                    raise           # quiet for `timeout`: as before
        raise TooSlow("no whole answer within its %g s and %d bytes a second"
                      " (MIN_TRANSFER_RATE)" % (self.timeout, MIN_TRANSFER_RATE))


class TooSlow(ClusterError):
    """An answer slower than its request's timeout and MIN_TRANSFER_RATE
    allow (Paced): never sent again, as the next would be as slow."""


def waiting_patience(wait):
    """How long a call with `wait` tries to reach an rc-web gone away: no
    longer than the caller said it would wait."""
    return UNREACHABLE_WAIT if wait is None else max(0.0, float(wait))


class Unreachable(ClusterError):
    """No connection to rc-web could be opened: nothing of the request was sent."""


class Cut(ClusterError):
    """The answer to a request safe to send again was cut (Http.request
    sends it again)."""


def repeatable(method, path, headers):
    """Whether a request may be sent again when its answer was lost: rc-web
    may have done it already. A put (X-Content-SHA256) stores the same bytes
    under the same name however often it is sent; a task's cancel sent
    again answers with the state the first left (Future.cancel raised
    ClusterError when rc-web was killed as it worked on one, the task left
    queued); POST /api/v1/results only reads."""
    return method in ("GET", "HEAD") or any(
        name in (headers or {}) for name in ("Idempotency-Key", "X-Content-SHA256")) \
        or (method == "POST" and (path.split("?")[0] == "/api/v1/results" or (
            path.startswith("/api/v1/tasks/") and path.endswith("/cancel"))))


class NoAnswer(Exception):
    """The connection closed before an answer began: a kept-alive one that
    the server had closed."""


class BadAnswer(Exception):
    """An answer that is not HTTP/1.x as we read it."""


class CutShort(BadAnswer):
    """The connection closed in the middle of an answer: the request was
    done, or not; sent again when that is safe, as for NoAnswer."""


class TooLarge(BadAnswer):
    """An answer's body over the limit the caller gave (MAX_ANSWER_BYTES)."""


def early_answer(link, method, limit, sink):
    """After the head of a request that asked for 100 Continue: None when
    its body is to be sent (100 Continue came, or nothing within
    EXPECT_WAIT), else the answer (read_answer's) that came instead."""
    sock, reader = link[0], link[1]
    pending = getattr(sock, "pending", lambda: 0)()       # TLS bytes already decrypted
    if not pending and not select.select([sock], [], [], EXPECT_WAIT)[0]:
        return None
    version, status, fields = answer_head(reader)
    if status == 100:
        return None
    return answer_body(reader, method, limit, sink, version, status, fields)


def answer_head(reader):
    """(version, status, fields) of an answer's status line and fields."""
    line = reader.readline(MAX_HEAD_LINE + 1)
    if not line:
        raise NoAnswer("the connection closed")
    version, status = status_line(line)
    return version, status, head_fields(reader)


def read_answer(reader, method, limit=None, sink=None):
    """(status, body, whether the connection stays open, header fields) of
    one answer; a body over `limit` bytes (None: no limit) is a BadAnswer.
    With `sink`, a 200 answer's body goes to sink(piece) as it comes, never
    held whole (the body returned is then b"")."""
    for _ in range(MAX_INTERIM_ANSWERS + 1):
        version, status, fields = answer_head(reader)
        if not 100 <= status < 200:
            break                   # 1xx (a 100 Continue late, or never asked for)
    else:       # else read for as long as a hostile server sends them
        raise BadAnswer("more than %d interim (1xx) answers" % MAX_INTERIM_ANSWERS)
    return answer_body(reader, method, limit, sink, version, status, fields)


def answer_body(reader, method, limit, sink, version, status, fields):
    """read_answer's, once the answer's head is read."""
    keep = version == "HTTP/1.1" and fields.get("connection", "").lower() != "close"
    if method == "HEAD" or status in (204, 304):
        return status, b"", keep, fields
    if status not in (200, 206):    # an error's text is read, not written, and held bounded
        sink, limit = None, MAX_ANSWER_BYTES if limit is None else limit
    if "chunked" in fields.get("transfer-encoding", "").lower():
        return status, read_chunked(reader, limit, sink), keep, fields
    if "content-length" in fields:
        try:
            length = int(fields["content-length"])
        except ValueError:
            length = -1
        if length < 0:
            raise BadAnswer("Content-Length %r" % fields["content-length"][:50])
        refuse_past(limit, length)
        return status, read_exactly(reader, length, sink), keep, fields
    return status, read_to_end(reader, limit, sink), False, fields


def read_to_end(reader, limit, sink=None):
    pieces, total = [], 0
    while True:
        piece = reader.read(READ_PIECE)
        if not piece:
            return b"".join(pieces)
        total += len(piece)
        refuse_past(limit, total)
        (sink or pieces.append)(piece)


def refuse_past(limit, size):
    """A main node that sends more than the client holds is not trusted:
    BadAnswer before the body is read (or read further)."""
    if limit is not None and size > limit:
        raise TooLarge("an answer's body over the client's limit of %d bytes"
                        " (MAX_ANSWER_BYTES)" % limit)


def status_line(line):
    """("HTTP/1.1", 201) from b"HTTP/1.1 201 Created\\r\\n"."""
    parts = line.decode("latin-1").split(None, 2)
    if len(line) > MAX_HEAD_LINE or len(parts) < 2 or not parts[0].startswith("HTTP/1.") \
            or not parts[1].isdigit() or len(parts[1]) != 3:
        raise BadAnswer("not an HTTP/1.x status line: %r" % line[:100])
    return parts[0], int(parts[1])


def head_fields(reader):
    """The header fields, names in lower case."""
    fields = {}
    for _ in range(MAX_HEAD_FIELDS):
        line = reader.readline(MAX_HEAD_LINE + 1)
        if len(line) > MAX_HEAD_LINE:
            raise BadAnswer("a header line over %d bytes" % MAX_HEAD_LINE)
        if line in (b"\r\n", b"\n"):
            return fields
        if not line:
            raise CutShort("the connection closed in the answer's head")
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    raise BadAnswer("more than %d header fields" % MAX_HEAD_FIELDS)


def read_exactly(reader, length, sink=None):
    pieces = []
    while length > 0:
        piece = reader.read(min(length, READ_PIECE))
        if not piece:
            raise CutShort("the answer was cut short")
        (sink or pieces.append)(piece)
        length -= len(piece)
    return b"".join(pieces)


def read_chunked(reader, limit=None, sink=None):
    pieces, total = [], 0
    while True:
        size = chunk_size(reader.readline(MAX_HEAD_LINE + 1))
        if size == 0:
            head_fields(reader)                 # trailer fields, if any
            return b"".join(pieces)
        total += size
        refuse_past(limit, total)
        read_exactly(reader, size, sink or pieces.append)
        read_exactly(reader, 2)                 # the chunk's CRLF


def read_head(sock, deadline):
    """(an answer's head, the bytes of its body that came with it), whole
    by `deadline` (time.monotonic()), however slowly it trickles."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD_LINE:
            raise BadAnswer("an answer's head over %d bytes" % MAX_HEAD_LINE)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TooSlow("no whole head of the answer in time")
        sock.settimeout(left)
        piece = sock.recv(STREAM_PIECE)
        if not piece:
            raise BadAnswer("the connection closed in the answer's head")
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


class ResultStream:
    """A stream of lines (NDJSON) in an HTTP answer, chunked or not, read
    straight off its socket. http.client's readline took ~0.1 ms of CPU a
    line (its chunk bookkeeping, through io's peek and read1), and a read
    that timed out lost its place in a chunk: here a wait for lines can
    time out, and a thread waiting for its own result can read them."""

    def __init__(self, sock, rest, chunked):
        self.sock = sock
        sock.setblocking(False)
        self.raw = bytearray(rest)          # received, not yet taken out of its chunks
        self.body = bytearray()             # the body's bytes, not yet a whole line
        self.chunked = chunked
        self.state, self.chunk_left = "size", 0     # chunked: what comes next
        self.ended = False

    def lines(self, timeout):
        """The whole lines that have come, at least one unless `timeout`
        seconds pass first ([] then); EOFError once the answer has ended."""
        deadline = time.monotonic() + timeout
        if self.raw:
            self.decode()       # what came with the head (or was left of a chunk)
        while True:
            found = self.whole_lines()
            if found:
                return found
            too_long(len(self.body))
            if self.ended:
                raise EOFError("the stream ended")
            data = self.receive(deadline)
            if data is None:
                return []
            if not data:
                self.ended = True
            self.raw += data
            self.decode()

    def receive(self, deadline):
        """What the socket has, once it has anything; None at `deadline`.
        The socket does not block: a timeout on it would cost a system call
        each time it is set, and a recv of READ_PIECE a fresh mapping of
        memory each time (STREAM_PIECE comes from the allocator's pools)."""
        while True:
            # OpenSSL may hold decrypted bytes that select() cannot see.
            if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
                left = max(0.0, deadline - time.monotonic())     # 0: a look, no wait
                if not select.select([self.sock], [], [], left)[0]:
                    return None
            try:
                return self.sock.recv(STREAM_PIECE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue        # readable, but not a whole TLS record yet

    def whole_lines(self):
        end = self.body.rfind(b"\n")
        if end < 0:
            return []
        lines = bytes(self.body[:end]).split(b"\n")
        del self.body[:end + 1]
        if end > MAX_STREAM_LINE:
            too_long(max(map(len, lines)))
        return lines

    def decode(self):
        """Move what has come out of its chunks into the body."""
        raw = self.raw
        if not self.chunked:
            self.body += raw
            del raw[:]
            return
        while raw:
            if self.state == "data":
                taken = min(self.chunk_left, len(raw))
                self.body += raw[:taken]
                del raw[:taken]
                self.chunk_left -= taken
                if not self.chunk_left:
                    self.state = "end"
            elif self.state == "end":           # the CRLF after a chunk's data
                if len(raw) < 2:
                    return
                if raw[:2] != b"\r\n":
                    raise BadAnswer("a chunk not ended by CRLF")
                del raw[:2]
                self.state = "size"
            else:
                end = raw.find(b"\r\n")
                if end < 0:
                    if len(raw) > MAX_HEAD_LINE:
                        raise BadAnswer("a chunk size line over %d bytes" % MAX_HEAD_LINE)
                    return
                size = chunk_size(bytes(raw[:end]))
                del raw[:end + 2]
                if not size:
                    self.ended = True           # the last chunk (trailers not read)
                    del raw[:]
                    return
                self.state, self.chunk_left = "data", size

    def close(self):
        self.sock.close()


def stream_record(line):
    """A result stream line's record: a JSON object whose task_id, if it
    has one, is a whole number; else BadAnswer naming the line."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or "task_id" in record and (
            isinstance(record["task_id"], bool) or not isinstance(record["task_id"], int)):
        raise BadAnswer("a result stream line that is not a task's record: %r" % line[:100])
    return record


def too_long(line_bytes):
    """A stream line longer than any task's result: BadAnswer, before the
    client holds more of it."""
    if line_bytes > MAX_STREAM_LINE:
        raise BadAnswer("a result stream line over the client's limit of %d bytes"
                        " (MAX_STREAM_LINE)" % MAX_STREAM_LINE)


def chunk_size(line):
    try:
        size = int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        size = -1
    if size < 0 or len(line) > MAX_HEAD_LINE:
        raise BadAnswer("a bad chunk size line: %r" % line[:50])
    return size


def stop_reading(stream):
    """Wake a thread blocked reading a stream, at once (else it would sleep
    until the next line or ping, up to 15 s, while rc-web kept serving the
    stream), and close it."""
    if stream is None:
        return
    try:
        stream.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass                # closed already
    stream.close()


# -- futures ---------------------------------------------------------------------------

class TaskFuture(concurrent.futures.Future):
    """A task on the cluster, as a concurrent.futures.Future: result(),
    exception(), add_done_callback(), cancel() (which cancels the task),
    and concurrent.futures.wait()/as_completed() work on it. `task_id` is
    known once its batch has been sent (wait_submitted() waits for it);
    `record` is the task's whole result once it has finished."""

    def __init__(self, cluster, spec, decode):
        super().__init__()
        self.cluster, self.spec, self.decode = cluster, spec, decode
        self.task_id = None
        self.record = None
        self.submitted = threading.Event()
        self.cancel_lock = threading.Lock()
        self.submit_error = None
        self.held = {}              # sha256 -> bytes of its input files that nothing else
                                    # holds (large arguments), until rc-web queues it
        self.watched = False        # a callback or a wait() waits for it (want_results)
        self._waiters = Watchers(self)      # concurrent.futures.wait() adds its waiter here

    def result(self, timeout=None):
        return super().result(self.cluster.read_for(self, timeout))

    def exception(self, timeout=None):
        return super().exception(self.cluster.read_for(self, timeout))

    def done(self):
        """Whether it is done; when it is not, someone polling it wants its
        result read (Cluster.want_results)."""
        done = super().done()
        if not done:
            self.cluster.want_results(self)
        return done

    def add_done_callback(self, fn):
        self.watched = True
        super().add_done_callback(fn)
        self.cluster.want_results(self)

    def wait_submitted(self, timeout=None):
        """The task id, once the main node has queued the task."""
        if not self.submitted.wait(timeout):
            raise concurrent.futures.TimeoutError("task not submitted yet")
        if self.submit_error is not None:
            raise self.submit_error
        return self.task_id

    def cancel(self):
        """Cancel the task: one still queued never runs, one running is
        stopped on its device. False when it has already finished."""
        return self.cluster.cancel_future(self)

    def local_cancel(self):
        """Cancelled here, and said so to wait() and as_completed(), which
        count a cancelled future as done only once it is "notified"."""
        with self.cancel_lock:       # a cancel() and the task's end may both get here
            if self.cancelled():
                return True
            if not concurrent.futures.Future.cancel(self):
                return False
            self.set_running_or_notify_cancel()
            return True

    def __repr__(self):
        return "<TaskFuture task_id=%s %s>" % (self.task_id, self._state.lower())


class Watchers(list):
    """A TaskFuture's list of waiters, where concurrent.futures.wait() and
    as_completed() put theirs: one that comes wants the result read by the
    receiver thread, since no result() call will read it."""

    def __init__(self, future):
        super().__init__()
        self.future = future

    def append(self, waiter):
        super().append(waiter)
        self.future.watched = True
        self.future.cluster.want_results(self.future)


def settle(future, value=None, error=None):
    """Give a future its outcome unless it already has one (a cancelled task
    whose result still came)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError if hasattr(
            concurrent.futures, "InvalidStateError") else RuntimeError:
        pass


def output_of(record, cluster=None):
    """What a task future gives: a completed task's output (stdout), whole:
    past the worker's output cap, the copy the main node kept (fetched with
    `cluster`), as the record's is cut there."""
    result = record.get("result") or {}
    if result.get("truncated") and cluster is not None:
        kept = kept_stdout(cluster, record["task_id"], "utf-8", bounded=True)
        if kept:
            return kept
    return result.get("output")


# -- the cluster -----------------------------------------------------------------------

class Cluster:
    """A connection to the main node's HTTP API (rc-web).

    url defaults to $RC_URL or http://127.0.0.1:5000, token to $RC_TOKEN
    (or the file named by $RC_TOKEN_FILE): the admin token, which submitting
    needs (`rc token --admin` on the main node)."""

    def __init__(self, url=None, token=None, ssl_context=None):
        self.url = url or os.environ.get("RC_URL") or DEFAULT_URL
        if token is None:
            token = os.environ.get("RC_TOKEN") or read_token_file(os.environ.get(
                "RC_TOKEN_FILE"))
        try:
            self.http = Http(self.url, token, ssl_context)
        except ValueError as e:
            if url or not os.environ.get("RC_URL"):
                raise
            raise ValueError("RC_URL: %s" % e) from None    # the program never named it
        self.put_paths = {}                  # (path, size, mtime) or sha256 -> put()'s answer
        self.put_sources = {}                # sha256 -> the path or bytes put_paths' put sent
        self.files_quota = None              # bytes, rc-web's files_quota_mb as last asked
        self.http.unset = " ".join(name for name, value in (
            ("RC_URL", url or os.environ.get("RC_URL")), ("RC_TOKEN", token)) if not value)
        self.lock = threading.Condition()
        self.queue = collections.deque()     # futures waiting to be sent
        self.waiting = {}                    # task id -> future, sent and not finished
        self.early = {}                      # task id -> record that came before its id
        self.early_bytes = 0                 # ... their bytes as their stream lines
        self.early_dropped = False           # one came past EARLY_MAX or EARLY_MAX_BYTES
        self.group_id = None
        self.highest = 0                     # the largest task id sent so far
        self.sending = False                 # a submit request is on its way
        self.last_submit = 0.0               # time.monotonic() a submit() last returned
        self.closed = False
        self.sender = self.receiver = None
        self.last_pending = time.monotonic()
        self.stream = None                   # the group's ResultStream, while open
        self.stream_failures = 0             # ... broken in a row (no result taken since)
        self.stream_refusals = 0             # ... of them refused by us or by rc-web
        self.reopen_at = 0.0                 # time.monotonic() before which it is not opened
        self.reader = None                   # the thread reading it now (see read_for)
        self.wanted = False                  # results are awaited by no reader: the
                                             # receiver thread reads them
        # The receiver sleeps on an Event, not on self.lock: a future that
        # wants it woken may hold its own lock (concurrent.futures.wait), and
        # self.lock is taken before a future's, never after.
        self.receiver_wake = threading.Event()
        self.slots_seen = (-SLOTS_SECONDS, 1)    # (when, how many)
        self.unsent_cancels = []             # futures whose cancel rc-web did not take
        self.canceller = None                # the thread sending them again (cancel_later)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close(wait=exc_info[0] is None)

    def close(self, wait=True):
        """Stop the background threads, once the tasks submitted have ended
        when `wait`; tasks already submitted go on regardless. Once closed,
        closing again does nothing (it would wait for results nobody reads)."""
        if self.closed:
            return
        if wait:
            with self.lock:
                unfinished = list(self.queue) + list(self.waiting.values())
            concurrent.futures.wait(unfinished)
        with self.lock:
            self.closed = True
            self.lock.notify_all()
            stream = self.stream
        self.receiver_wake.set()
        stop_reading(stream)
        self.http.stop_streams()
        for thread in (self.sender, self.receiver):
            if thread is not None and thread is not threading.current_thread():
                thread.join(5)
        self.http.drop()

    # -- submitting --------------------------------------------------------------------

    def submit(self, task_type, arg=None, **options):
        """Queue one task; a TaskFuture whose result() is the task's output.
        `arg` is the type's argument (`shell`: the command); options: priority,
        timeout, retries, requirements, idempotency_key, retry_on_failure,
        depends_on (ids or futures), payload (instead of arg), and the
        payload's inputs, stdin, env, outputs, file. An input or stdin that
        is a path of this machine is put first (once while it is unchanged),
        an input under its base name, as `rc submit --input FILE`."""
        if options.get("inputs"):
            options["inputs"] = [self.local_input(item) for item in options["inputs"]]
        if isinstance(options.get("stdin"), str):
            options["stdin"] = self.put_once(options["stdin"])
        return self.submit_spec(task_spec(task_type, arg, options),
                                functools.partial(output_of, cluster=self))

    def local_input(self, item):
        if not isinstance(item, str):
            return item
        if os.path.isdir(item):
            raise TypeError("input %r is a directory: give its files (a path each), or"
                            " dicts of put() with the path each has in the task" % item)
        executable = os.stat(item).st_mode & stat.S_IXUSR
        return dict(self.put_once(item), path=os.path.basename(item),
                    mode=0o755 if executable else 0o644)

    def put_once(self, path):
        """put(path), or what it gave last time for the file unchanged since
        (map() of many tasks with one input file sends it once)."""
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            # put() would read a device (/dev/zero: for ever, into memory) or
            # wait on a FIFO; rc submit --input refuses them too.
            raise TypeError("%r is not a regular file: a task's input or stdin given as"
                            " a path must be one (put(data) stores bytes)" % path)
        key = (os.path.realpath(path), info.st_size, info.st_mtime_ns)
        if key not in self.put_paths:
            self.put_paths[key] = self.put(path)
            self.put_sources[self.put_paths[key]["sha256"]] = path
        return self.put_paths[key]

    def put_data_once(self, data, cached_only=False):
        """put(data), or what it gave last time for the same bytes (a
        function's code, one file for all its tasks); `cached_only`: that,
        or None (never a request: the cluster's lock may be held). `data`
        may be (bytes, their SHA-256): a function's file, which pieces_file()
        holds, and so may put_again(); a call's arguments are not held."""
        kept = isinstance(data, tuple)
        data, key = data if kept else (data, hashlib.sha256(data).hexdigest())
        if key not in self.put_paths and not cached_only:
            self.put_paths[key] = self.put_body(data, key, len(data))
            if kept:
                self.put_sources[key] = data
        return self.put_paths.get(key)

    def put_again(self, error, tried, futures=()):
        """Whether the file rc-web refused a batch for ("no file SHA in the
        store"), one this client put once for many tasks, was put again:
        the store's sweep removes a file no task has used for
        files_retention_days, which a long-lived Executor outlives, and
        every later call of its function was refused; or a call's large
        arguments, put once for the same bytes long ago, which the batch's
        `futures` hold until it is queued. Once a sha a batch."""
        text = str(error)
        sha256 = text.split("no file ", 1)[1][:64] if error.status == 400 \
            and "no file " in text else None
        source = self.put_sources.get(sha256) or next(
            (future.held[sha256] for future in futures if sha256 in future.held), None)
        if source is None:
            self.put_paths.pop(sha256, None)    # bytes not held: the next call puts its own
        if source is None or sha256 in tried:
            return False
        tried.add(sha256)
        try:
            return self.put(source).get("sha256") == sha256     # a path may have changed since
        except (OSError, ClusterError):
            return False

    def submit_spec(self, spec, decode, held=None, more_coming=False):
        """Queue the task for the sender thread; or, when the client has been
        idle for IDLE_GAP (one submit, its result awaited, then another),
        send it from this thread at once: a hand-over to the sender would
        cost the lone task its latency, and there is nothing to batch.
        `more_coming` (a map's chunks, each a few ms apart as its code is
        made): the sender's, batched, even then."""
        future = TaskFuture(self, spec, decode)
        future.held = held or {}
        return self.enqueue(future, more_coming)

    def enqueue(self, future, more_coming=False):
        with self.lock:
            if self.closed:
                raise RuntimeError("cannot submit to a closed Cluster")
            alone = self.group_id is not None and not self.queue and not self.sending \
                and time.monotonic() - self.last_submit > IDLE_GAP and not more_coming
            if alone:
                self.sending = True
                self.queue.append(future)
                batch = self.take_batch()
            else:
                self.queue.append(future)
                if self.sender is None:
                    self.sender = start_thread(self.send_batches, "rc-client-submit")
                self.lock.notify_all()
        if alone:
            self.send_safely(batch)
        self.last_submit = time.monotonic()
        return future

    def map(self, task_type, args, **options):
        """One task per argument; their outputs in order, as they come."""
        if isinstance(args, (str, bytes)):
            raise TypeError("Cluster.map takes a list of arguments, one task each, not the"
                            " string %r, which would be one task per character: map(%r, [%r])"
                            " runs it once, as submit(%r, %r) does"
                            % (args[:100], task_type, args[:100], task_type, args[:100]))
        futures = [self.submit(task_type, arg, **options) for arg in args]
        return results_in_order(futures, None)

    def send_batches(self):
        """The sender thread: whatever was queued while the last request was
        on its way goes out as the next batch."""
        while True:
            with self.lock:
                while (not self.queue or self.sending) and not self.closed:
                    self.lock.wait()
                if not self.queue:
                    return
                self.sending = True          # one request at a time: batches stay in order
                batch = self.take_batch()
            self.send_safely(batch)

    def send_safely(self, batch):
        try:
            if batch:
                self.send(batch)
        except Exception as e:       # never leave a future without an end
            self.fail([future for future, _ in batch], ClusterError(
                "submitting failed: %s: %s" % (type(e).__name__, e)))
        finally:
            with self.lock:
                self.sending = False
                if self.queue:          # the sender's next batch (the lock wakes only it)
                    self.lock.notify_all()

    def take_batch(self):
        """Up to BATCH_MAX_TASKS futures and BATCH_MAX_BYTES from the queue;
        a task that depends on one in the same batch waits for the next."""
        batch, encoded, size = [], [], 2
        while self.queue and len(batch) < BATCH_MAX_TASKS:
            future = self.queue[0]
            if future.done():                # cancelled before it was sent
                self.queue.popleft()
                continue
            depends = (future.spec or {}).get("depends_on") or ()
            if any(isinstance(d, TaskFuture) and d.task_id is None for d in depends) and batch:
                break
            try:
                if isinstance(future, PackFuture):
                    future.seal()           # the calls that came so far: its task
                data = json.dumps(wire_spec(future.spec)).encode()
            except Exception as e:      # a dependency that was refused, a value not JSON
                self.queue.popleft()
                self.fail([future], e if isinstance(e, ClusterError) else TypeError(
                    "task cannot be sent: %s" % e))
                continue
            if batch and size + len(data) + 1 > BATCH_MAX_BYTES:
                break
            self.queue.popleft()
            batch.append(future)
            encoded.append(data)
            size += len(data) + 1
        return list(zip(batch, encoded))

    def send(self, batch):
        try:
            return self.send_held(batch)
        finally:
            for future, _ in batch:
                future.held = {}        # queued (or failed): nothing to put again

    def send_held(self, batch):
        put_again = set()           # the files put again for this batch
        while batch:
            futures = [future for future, _ in batch]
            body = b"[" + b",".join(data for _, data in batch) + b"]"
            query = "?group=%s" % (self.group_id or "new")
            # Its answer lost (rc-web stopped meanwhile), the batch goes again
            # with this key, and rc-web answers with what it queued the first
            # time, if it did: a batch is never queued twice, nor lost.
            key = {"Idempotency-Key": binascii.hexlify(os.urandom(16)).decode()}
            try:
                answer = self.http.json("POST", "/api/v1/tasks" + query, raw_body=body,
                                        headers=key)
            except ClusterError as e:
                if e.status == 404 and self.group_id is not None:
                    # Our session's group was pruned (idle past task_retention):
                    # nothing of it is pending, so a new one does.
                    self.group_id = None
                    continue
                if self.put_again(e, put_again, futures):
                    continue
                refused = refused_task(e, len(batch))
                if refused is None:
                    return self.fail(futures, e)
                self.fail([futures[refused]], e)    # that one alone; the rest go again
                batch = batch[:refused] + batch[refused + 1:]
                continue
            return self.accept(futures, answer)

    def fail(self, futures, e):
        for future in futures:
            future.submit_error = e
            future.submitted.set()
            settle(future, error=e)

    def accept(self, futures, answer):
        named = answer.get("tasks")
        count = len(named) if isinstance(named, list) else 0
        if count != len(futures):       # else the futures past the last id would never end
            raise BadAnswer("the main node named %d task id%s for a batch of %d"
                            % (count, "" if count == 1 else "s", len(futures)))
        with self.lock:
            group_id = answer.get("group_id", self.group_id)
            if group_id != self.group_id:
                stop_reading(self.stream)       # the new group's stream, then
            self.group_id = group_id
            for future, entry in zip(futures, answer["tasks"]):
                future.task_id = entry["task_id"]
                self.highest = max(self.highest, future.task_id)
                record, size = self.early.pop(future.task_id, (None, 0))
                self.early_bytes -= size
                if record is not None:
                    self.finish(future, record)
                elif not future.done():
                    self.waiting[future.task_id] = future
                future.submitted.set()
            if self.early_dropped:
                # Results were dropped that may be these tasks': the stream is
                # opened again from the first task pending (open_stream), and
                # whatever was held early comes again with it.
                self.early_dropped = False
                self.early.clear()
                self.early_bytes = 0
                stop_reading(self.stream)
            if self.receiver is None and self.group_id is not None:
                self.receiver = start_thread(self.receive_results, "rc-client-results")
            # A lone submit's caller reads its own result (read_for) once the
            # stream is open: the receiver is not woken for it.
            lone = threading.current_thread() is not self.sender and \
                not any(future.watched for future in futures)
            if not lone:
                self.wanted = True
            if not lone or self.stream is None:
                self.receiver_wake.set()

    # -- results -----------------------------------------------------------------------

    def receive_results(self):
        """The receiver thread: opens the group's result stream while tasks
        are pending (and STREAM_IDLE after), reads it while results are
        wanted and no caller reads it (read_for), and closes it once nothing
        has been pending for STREAM_IDLE seconds."""
        while True:
            with self.lock:
                self.receiver_wake.clear()      # before looking: a later set() wakes it
                if self.closed:
                    return
                action, seconds = self.receiver_action()
            try:
                if action == "open":
                    self.open_stream()
                elif action == "read":
                    self.read_stream()
                elif action == "close":
                    self.drop_stream(self.stream)
                elif not self.receiver_wake.wait(seconds) and action == "unread":
                    with self.lock:
                        self.wanted = True      # nobody came to read: this thread does
            except (ClusterError, OSError, EOFError, BadAnswer, ValueError) as e:
                self.stream_broke(e)

    def stream_broke(self, error):
        """The result stream could not be opened or read: it is opened again
        after RECONNECT_DELAY, doubled each time in a row. A refusal (an
        answer we cannot take, an HTTP 4xx) would come again each time: after
        STREAM_REFUSALS_MAX in a row, the futures waiting fail with it."""
        refused = isinstance(error, (BadAnswer, ValueError)) or (
            isinstance(error, ClusterError) and 400 <= error.status < 500
            and error.status not in (408, 429))     # busy is not a refusal
        with self.lock:
            self.stream_failures += 1
            self.stream_refusals += 1 if refused else 0
            self.reopen_at = time.monotonic() + min(
                RECONNECT_DELAY * 2 ** min(self.stream_failures - 1, 16),
                UNREACHABLE_MAX_DELAY if isinstance(error, Unreachable) else RECONNECT_MAX_DELAY)
            given_up = []
            if self.stream_refusals >= STREAM_REFUSALS_MAX:
                given_up = list(self.waiting.values())
                self.waiting.clear()
                self.wanted = False
                self.stream_failures = self.stream_refusals = 0
                self.last_pending = time.monotonic() - STREAM_IDLE   # kept open for nobody
        failure = ClusterError("the result stream of group %s was refused %d times in a row;"
                               " the last time: %s (the tasks go on: get_result(task_id)"
                               " reads each)" % (self.group_id, STREAM_REFUSALS_MAX, error))
        for future in given_up:
            settle(future, error=failure)

    def receiver_action(self):
        """What the receiver does next (the lock is held): open, read or
        close the stream, or sleep (None, or "unread": a result pending that
        no one has come to read yet) for how many seconds (None: until woken)."""
        now = time.monotonic()
        idle = now - self.last_pending
        if self.stream is None:
            if not self.waiting and idle > STREAM_IDLE:
                return None, None
            return ("open", 0) if now >= self.reopen_at else (None, self.reopen_at - now)
        if self.reader is not None:
            return None, STREAM_IDLE            # it wakes us if it leaves results pending
        if self.waiting:
            if self.wanted:
                self.reader = threading.current_thread()
                return "read", 0
            return "unread", LONE_READ_WAIT
        if idle > STREAM_IDLE:
            return "close", 0
        return None, STREAM_IDLE - idle

    def open_stream(self):
        with self.lock:
            group_id = self.group_id
            after = min(self.waiting) - 1 if self.waiting else self.highest
        stream = self.http.stream("/api/v1/groups/%d/results?stream=1&follow=1&after=%d"
                                  % (group_id, after), STREAM_READ_TIMEOUT)
        with self.lock:
            if self.closed or group_id != self.group_id:
                stream.close()
                return
            self.stream = stream
            if self.waiting:
                self.last_pending = time.monotonic()

    def read_stream(self):
        """Read (this thread holds the reader's role) while results are
        pending; the role is given up once none is."""
        stream, broken = self.stream, True
        try:
            while True:
                lines = stream.lines(STREAM_READ_TIMEOUT)
                if not lines:
                    return          # not even rc-web's ping: open it again
                self.take_lines(lines)
                with self.lock:
                    if self.waiting:
                        self.last_pending = time.monotonic()
                    if self.closed or not self.waiting:
                        self.wanted = False
                        broken = False
                        return
        finally:
            self.leave_reading(stream, broken)

    def read_for(self, future, timeout):
        """Read the stream in this thread, the one waiting for `future`,
        until it is done, if no other thread is reading it: its result then
        needs no hand-over from the receiver thread (a wake-up of each, and
        of the interpreter's lock; ~0.1 ms on a small machine). Otherwise,
        the receiver reads. Returns what is left of `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            stream = self.stream
            if concurrent.futures.Future.done(future) or self.closed:
                return timeout
            if self.reader is not None or stream is None or \
                    self.waiting.get(future.task_id) is not future:
                self.want_results(future)
                return timeout
            self.reader = threading.current_thread()
        broken = True
        try:
            while not concurrent.futures.Future.done(future):
                # result(0) too reads what has come (nobody else may have).
                left = STREAM_READ_TIMEOUT if deadline is None else deadline - time.monotonic()
                lines = stream.lines(max(0.0, min(left, STREAM_READ_TIMEOUT)))
                if not lines and deadline is None:
                    return None     # not even rc-web's ping: the receiver opens it again
                self.take_lines(lines)
                if left <= 0:
                    break
            broken = False
        except (OSError, EOFError, BadAnswer, ValueError) as e:
            self.stream_broke(e)    # the receiver opens it again
        finally:
            self.leave_reading(stream, broken)
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def leave_reading(self, stream, broken):
        """Give up the reader's role; results still pending are the receiver's."""
        with self.lock:
            self.reader = None
            if broken:
                self.drop_stream(stream)
            pending = bool(self.waiting)
            if pending:
                self.wanted = True
                self.last_pending = time.monotonic()
        if pending or broken:
            self.receiver_wake.set()

    def drop_stream(self, stream):
        with self.lock:
            if stream is self.stream:
                self.stream = None
        stop_reading(stream)

    def want_results(self, future):
        """Someone waits for `future`'s result and does not read the stream
        (a callback, wait(), done() polled): the receiver reads, unless a
        thread reading already will hand over to it (leave_reading). Never
        blocks: a future's own lock may be held (see receiver_wake)."""
        if not self.wanted and self.reader is None \
                and self.waiting.get(future.task_id) is future:
            self.wanted = True
            self.receiver_wake.set()

    def take_lines(self, lines):
        for line in lines:
            if line.strip():
                record = stream_record(line)
                if "task_id" in record:
                    self.take_result(record, len(line))
        if lines:
            self.stream_failures = 0    # it works (a refusal in it is still counted)

    def take_result(self, record, size):
        """A result of the stream, `size` bytes of its line."""
        with self.lock:
            future = self.waiting.pop(record["task_id"], None)
            if future is None:
                if record["task_id"] > self.highest:    # its batch's answer is on its way
                    if len(self.early) < EARLY_MAX and self.early_bytes + size <= EARLY_MAX_BYTES:
                        self.early_bytes += size - self.early.get(record["task_id"], (0, 0))[1]
                        self.early[record["task_id"]] = (record, size)
                    else:
                        self.early_dropped = True
                return              # one that ended already (a stream opened again)
            self.stream_refusals = 0
            # It was pending until now: the stream stays open STREAM_IDLE from
            # here, for the next lone submit (else a session past its first
            # STREAM_IDLE seconds opened a stream for each of them).
            self.last_pending = time.monotonic()
            if not self.waiting:
                self.wanted = False     # the next lone submit's caller reads its own
        self.finish(future, record)

    def finish(self, future, record):
        future.record = record
        state = record.get("state")
        if state == "cancelled":
            future.local_cancel()
            return
        if state != "completed":
            result = record.get("result") or {}
            settle(future, error=TaskFailed(record["task_id"], state, record.get("error"),
                                            result, timeout_note(future, state)))
            return
        try:
            value = future.decode(record)
        except BaseException as e:
            settle(future, error=e)
        else:
            settle(future, value)

    # -- one task by id ---------------------------------------------------------------

    def output(self, task, wait=OUTPUT_FIRST_WAIT):
        """A task's output so far (a future, or a task id), as `rc tail`
        prints it: {"stdout", "stderr", "live", "state", "stdout_end", ...}
        (docs/http.md, GET /api/v1/tasks/ID/output). While it runs, its
        device sends what each stream adds once someone watches it, which
        this does for the next minute: a first call waits up to `wait`
        seconds for its first report; call again for more. Once it has
        ended, its result's output and stderr."""
        task_id = task.wait_submitted() if isinstance(task, TaskFuture) else int(task)
        path = "/api/v1/tasks/%d" % task_id
        record = self.http.json("GET", path + "/output", ok=(200,))
        if not record.get("live"):
            return record
        watch = self.http.json("POST", path + "/watch", ok=(200,))
        # A watch that had lapsed: what was kept may be minutes old, so wait
        # for a report after now (the main node's time; an older one says none).
        now = watch.get("now") or 0
        fresh_after = now if (record.get("watched_until") or 0) < now else 0
        deadline = time.monotonic() + wait
        while True:
            record = self.http.json("GET", path + "/output", ok=(200,))
            if not record.get("live") or (record.get("updated_at") is not None and
                                          record["updated_at"] > fresh_after) \
                    or time.monotonic() >= deadline:
                return record
            time.sleep(OUTPUT_POLL)

    def get_result(self, task_id, wait=None):
        """A task's result record ({"task_id", "state", "completed",
        "result", "error"}); with `wait`, waits up to that many seconds
        (at most 60) for it to finish. A task still running gives its state."""
        path = "/api/v1/tasks/%d/result" % int(task_id)
        if wait is not None:     # as rc-web reads it: no exponent (%g wrote 3.2e-05)
            path += "?wait=%.6f" % wait
        return self.http.json("GET", path, ok=(200, 409), timeout=REQUEST_TIMEOUT + (wait or 0),
                              patience=waiting_patience(wait))

    def results(self, task_ids, wait=None, until="all"):
        """Many result records in one request (at most 10,000 ids):
        {"results": [...], "pending": [...], "unknown": [...]}."""
        body = {"task_ids": [int(n) for n in task_ids], "until": until}
        if wait is not None:
            body["wait"] = wait
        return self.http.json("POST", "/api/v1/results", body,
                              timeout=REQUEST_TIMEOUT + (wait or 0),
                              patience=waiting_patience(wait))

    def cancel(self, task):
        """Cancel a task: a TaskFuture (True when cancelled, as
        Future.cancel), or a task id (its state after, as POST .../cancel)."""
        if isinstance(task, TaskFuture):
            return task.cancel()
        return self.http.json("POST", "/api/v1/tasks/%d/cancel" % int(task), {})["state"]

    def cancel_future(self, future):
        with self.lock:
            if future.done():
                return False
            if future in self.queue:
                self.queue.remove(future)
                future.submit_error = concurrent.futures.CancelledError()
                future.submitted.set()
                return future.local_cancel()
        # A map's cancel on its way out waits a moment for the sender's submit
        # (it waited REQUEST_TIMEOUT a chunk, with rc-web down, then was
        # dropped in silence and the task queued later ran): send_cancels,
        # which sends it again, as long as the sender tries.
        wait = UNREAD_CANCEL_TIMEOUT if getattr(UNREAD, "cancelling", False) else \
            UNREACHABLE_WAIT + REQUEST_TIMEOUT if getattr(UNREAD, "resending", False) else \
            REQUEST_TIMEOUT
        try:
            task_id = future.wait_submitted(wait)
        except concurrent.futures.TimeoutError:
            if wait == REQUEST_TIMEOUT:
                return future.cancelled()
            raise TooSlow("its task not queued within %g s" % wait) from None
        except BaseException:
            return future.cancelled()
        state = self.http.json("POST", "/api/v1/tasks/%d/cancel" % task_id, {})["state"]
        if state in ("completed", "failed", "timed_out"):
            return False
        with self.lock:
            self.waiting.pop(task_id, None)
        return future.local_cancel()

    def cancel_later(self, futures):
        """Cancels rc-web did not take (a map left by its TimeoutError or
        Ctrl-C while rc-web restarts), sent again by a thread of their own
        as rc-web answers again (Http.request: up to UNREACHABLE_WAIT, while
        this program runs); stderr names their tasks, which go on until
        then, and says when the cancels reached the cluster or were given up."""
        with self.lock:
            self.unsent_cancels.extend(futures)
            if self.canceller is None:
                self.canceller = start_thread(self.send_cancels, "rc-client-cancels")
        LOG.warning("rc.client: rc-web did not take the cancel of %s, which run on; it is"
                    " sent again as rc-web answers (up to %d s, while this program runs):"
                    " `rc cancel ID` stops one", tasks_named(futures), UNREACHABLE_WAIT)

    def send_cancels(self):
        UNREAD.resending = True     # cancel_future waits for a submit in flight
        sent = []
        while True:
            with self.lock:
                if not self.unsent_cancels:
                    self.canceller = None
                    break
                future = self.unsent_cancels[0]
            try:
                future.cancel()
            except (Unreachable, Cut, TooSlow) as e:
                with self.lock:
                    given_up, self.unsent_cancels[:] = list(self.unsent_cancels), []
                    self.canceller = None
                LOG.warning("rc.client: gave up cancelling %s (%s): they may still run;"
                            " `rc cancel ID` stops one", tasks_named(given_up), e)
                return
            except Exception:
                pass            # rc-web answered (the task gone, ...): nothing more to do
            with self.lock:
                self.unsent_cancels.remove(future)
            sent.append(future)
        LOG.warning("rc.client: the cancel of %s reached the cluster", tasks_named(sent))

    @staticmethod
    def wait(futures, timeout=None, return_when=concurrent.futures.ALL_COMPLETED):
        """concurrent.futures.wait: (done, not_done)."""
        return concurrent.futures.wait(futures, timeout, return_when)

    @staticmethod
    def as_completed(futures, timeout=None):
        """concurrent.futures.as_completed: each future as it finishes."""
        return concurrent.futures.as_completed(futures, timeout)

    # -- files -------------------------------------------------------------------------

    def put(self, source):
        """Store a file (a path, bytes, or a binary file object) on the main
        node; {"sha256", "size"}, to give a task as stdin or an input. A
        path, or a file of the disk, is read twice (its hash, then sent from
        it), never held whole: a 4 GB video from a laptop with less memory."""
        if isinstance(source, (bytes, bytearray)):
            return self.put_body(bytes(source), hashlib.sha256(source).hexdigest(), len(source))
        if not hasattr(source, "read"):
            with open(source, "rb") as f:
                return self.put(f)
        try:
            start, info = source.tell(), os.fstat(source.fileno())
            seekable = stat.S_ISREG(info.st_mode)
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            seekable = False
        if not seekable:            # a pipe, a BytesIO: what it gives, held
            data = source.read()
            return self.put_body(data, hashlib.sha256(data).hexdigest(), len(data))
        self.check_quota(info.st_size - start)      # before hours of reading
        digest = hashlib.sha256()
        for piece in iter(lambda: source.read(READ_PIECE), b""):
            digest.update(piece)
        source.seek(start)
        return self.put_body(source, digest.hexdigest(), info.st_size - start)

    def put_body(self, body, sha256, size):
        self.check_quota(size)
        headers = {"Content-Type": "application/octet-stream", "X-Content-SHA256": sha256}
        status, body = self.http.request("POST", "/api/v1/files", body, headers,
                                         REQUEST_TIMEOUT + size / 1e6)
        return self.http.answer("POST", "/api/v1/files", status, body, (201,))

    def check_quota(self, size):
        """A ClusterError, rc-web's 413 in its words, for a file over the
        store's quota, before it is read or sent: rc-web refuses it on the
        request's headers, and the body still being sent met a reset
        connection ("no answer"), not the refusal. The quota is asked once,
        and again before a file over it is refused (it may have grown);
        an rc-web that does not say (older, or behind a proxy that answers
        with a page of its own) is left to refuse it itself."""
        if size <= QUOTA_UNIT or (self.files_quota is not None and size <= self.files_quota):
            return
        status, data = self.http.request("GET", "/api/v1/files")
        if status in (404, 405):
            return
        answer = self.http.answer("GET", "/api/v1/files", status, data, (200,))
        quota = answer.get("quota_bytes") if isinstance(answer, dict) else None
        if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
            return
        self.files_quota = quota
        if size > self.files_quota:
            raise ClusterError("POST /api/v1/files: the file is %d bytes, over the store's"
                               " quota of %d (files_quota_mb) (HTTP 413)"
                               % (size, self.files_quota), 413)

    def get(self, ref, path=None, bounded=False):
        """A stored file's bytes, or written to `path`: `ref` is a sha256 (or
        a {"sha256"} dict), or (task_id, name) for a task's output file. The
        bytes are checked against the SHA-256 asked for or, for a task's
        file, the one the main node names (X-Content-SHA256): a file
        damaged on the way or on the main node's disk is a ClusterError,
        never returned or written. `bounded`: a file over MAX_ANSWER_BYTES
        is AnswerTooLarge, refused before it is held."""
        expected = None
        if isinstance(ref, tuple):
            where = "/api/v1/tasks/%d/files/%s" % (int(ref[0]), urllib.parse.quote(ref[1]))
        else:
            expected = ref["sha256"] if isinstance(ref, dict) else ref
            where = "/api/v1/files/%s" % expected
        if path is not None:
            return self.download(where, expected, path)
        status, data, fields = self.http.request("GET", where, timeout=REQUEST_TIMEOUT * 10,
                                                 bounded=bounded, with_fields=True)
        checked(where, status, data, fields, expected, hashlib.sha256(data), len(data))
        return data

    def download(self, where, expected, path):
        """get() into a file: written, hashed as it comes, to a new file
        beside `path`, renamed onto it once its hash is right (else removed):
        never held whole, and `path` never holds a damaged file."""
        if os.path.isdir(path):     # as open(path, "wb") says, before the download
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        directory, name = os.path.split(os.path.abspath(path))
        # 40 characters of its name: 160 bytes in UTF-8 at most, room for the rest in 255.
        partial = os.path.join(directory, ".%s.%s.part" % (name[:40], os.urandom(4).hex()))
        # Made as open(path, "wb") would make it (the umask applies), never followed.
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            digest, size = hashlib.sha256(), [0]
            with os.fdopen(descriptor, "wb") as f:
                def write(piece):
                    digest.update(piece)
                    size[0] += len(piece)
                    f.write(piece)
                status, data, fields = self.fetch_into(where, write, size)
            checked(where, status, data, fields, expected, digest, size[0])
            os.replace(partial, path)
        except BaseException:
            try:
                os.remove(partial)
            except OSError:
                pass
            raise
        return path

    def fetch_into(self, where, write, size):
        """GET `where` into write(), `size[0]` the bytes written; an answer
        cut short (rc-web restarting) is taken up where it stopped, with a
        Range, as long as each try brings more bytes. (status, body,
        fields) of the last answer, a 206 given as the 200 it continues."""
        while True:
            had = size[0]
            try:
                status, data, fields = self.http.request(
                    "GET", where, headers={"Range": "bytes=%d-" % had} if had else None,
                    timeout=REQUEST_TIMEOUT * 10, bounded=False, with_fields=True, sink=write)
            except ClusterError as e:
                if isinstance(e, Unreachable) or size[0] == had:
                    raise
                LOG.warning("rc.client: GET %s was cut short after %d bytes (%s); taking it"
                            " up there", where, size[0], e)
                continue
            if not had:
                return status, data, fields
            if status != 206 or not fields.get("content-range", "").startswith(
                    "bytes %d-" % had):
                raise ClusterError("GET %s: asked for the bytes from %d on, got HTTP %d %s"
                                   % (where, had, status, fields.get("content-range", "")),
                                   status)
            return 200, data, fields

    def files(self, task_id):
        """The files a task has (its outputs): [{"name", "sha256", "size"...}]."""
        return self.http.json("GET", "/api/v1/tasks/%d/files" % int(task_id))["files"]

    def slots(self):
        """Task slots of the online devices (1 when that cannot be read),
        asked at most once every SLOTS_SECONDS."""
        asked_at, slots = self.slots_seen
        if time.monotonic() - asked_at < SLOTS_SECONDS:
            return slots
        try:
            slots = max(1, int(self.http.json("GET", "/api/v1/status").get("slots_total") or 1))
        except (ClusterError, ValueError, TypeError):
            slots = 1
        self.slots_seen = (time.monotonic(), slots)
        return slots


def refused_task(error, count):
    """Which task of a batch of `count` rc-web refused ("task 3 of 7: ..."),
    0-based; None when it refused the batch as a whole."""
    text = str(error)
    if error.status != 400 or count < 2 or "task " not in text:
        return None
    try:
        number, total = text.split("task ", 1)[1].split(":", 1)[0].split(" of ")
        number, total = int(number), int(total)
    except ValueError:
        return None
    return number - 1 if total == count and 0 < number <= count else None


def tasks_named(futures):
    """"tasks 12, 13 and 40 more" of futures (a task's id once it has one)."""
    ids = sorted({future.task_id for future in futures if future.task_id is not None})
    if not ids:
        return "%d task%s not yet numbered" % (len(futures), "s" * (len(futures) != 1))
    return "task%s %s" % ("s" * (len(ids) != 1), ", ".join(map(str, ids[:10])) + (
        " and %d more" % (len(ids) - 10) if len(ids) > 10 else ""))


def start_thread(target, name):
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def read_token_file(path):
    if not path:
        return None
    with open(path) as f:
        return f.read().strip()


def task_spec(task_type, arg, options):
    """A task as POST /api/v1/tasks takes it, from submit()'s arguments."""
    if callable(task_type):         # Dask's Client.submit(func, *args), by habit
        raise TypeError("Cluster.submit and map take a task type first (\"shell\","
                        " \"python_exec\", ...), not the function %s: Executor's submit(fn,"
                        " *args) and map(fn, items) run a function on the fleet, as Dask's"
                        " Client does (docs/client.md)" % describe(task_type))
    unknown = sorted(set(options) - set(PAYLOAD_OPTIONS) - set(TASK_OPTIONS) - {"payload"})
    if unknown:
        raise TypeError("unknown task option %s (known: %s)" % (", ".join(unknown), ", ".join(
            sorted(PAYLOAD_OPTIONS + TASK_OPTIONS + ("payload",)))))
    spec = {"task_type": task_type}
    payload = options.get("payload")
    if payload is None:
        payload = arg
    extra = {key: options[key] for key in PAYLOAD_OPTIONS if options.get(key) is not None}
    if extra:
        if payload is None:             # submit("python_exec", file="job.py", inputs=...)
            payload = {}
        elif not isinstance(payload, dict) and PAYLOAD_FIELD.get(task_type):
            payload = {PAYLOAD_FIELD[task_type]: payload}
        if not isinstance(payload, dict):
            raise TypeError("with %s, give the payload as a dict (payload={...})"
                            % ", ".join(sorted(extra)))
        payload = dict(payload, **extra)
    if payload is not None:
        spec["payload"] = payload
    for key in TASK_OPTIONS:
        if options.get(key) is not None:
            spec[key] = list(options[key]) if key == "depends_on" else options[key]
    return spec


def wire_spec(spec):
    """The spec as JSON: futures it depends on replaced by their ids."""
    depends = spec.get("depends_on")
    if not depends:
        return spec
    # Batches go in order, so a future it depends on has been sent by now
    # (or is another Cluster's: refused rather than waited for).
    return dict(spec, depends_on=[d.wait_submitted(0) if isinstance(d, TaskFuture) else d
                                  for d in depends])


def results_in_order(futures, deadline):
    """Each future's result in order (as Executor.map gives them), by the
    time.monotonic() `deadline` (None: no limit); closing the generator
    early cancels those not yet done, and a wait that ends in a TimeoutError
    or Ctrl-C the one it waited for too, as concurrent.futures' map does
    (from Python 3.12): nobody can read its result any more."""
    unsent = []                 # their cancels rc-web did not take at once
    try:
        futures.reverse()
        while futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            future = futures.pop()
            try:
                value = future.result(left)
            except BaseException:
                unsent.append(future)       # until its cancel is taken: a second
                if cancel_unread(future):   # Ctrl-C in it leaves it to the thread
                    unsent.pop()            # (or done, it raised: nothing to cancel)
                raise
            yield value
    finally:
        # Once one cancel was not taken, the others go to the thread at once:
        # each would wait as long (a map of 400 chunks, 400 times); and a
        # second Ctrl-C in these cancels leaves the rest to it, not dropped.
        rest, tried = futures[::-1], 0
        try:
            while tried < len(rest) and not unsent:
                if not cancel_unread(rest[tried]):
                    unsent.append(rest[tried])
                tried += 1
        finally:
            unsent.extend(rest[tried:])
            if unsent:
                unsent[0].cluster.cancel_later(unsent)


UNREAD = threading.local()      # .cancelling: in cancel_unread(), this thread


def cancel_unread(future):
    """future.cancel() for a call of a map that nobody will read, as far as
    rc-web answers at once: a map's TimeoutError (or Ctrl-C) waited, with
    rc-web down (restarting, stopped), for its cancels up to UNREACHABLE_WAIT
    (map(timeout=5) raised after 10 minutes), and a cancel that could not
    be sent raised in its place. False when it could not be sent (rc-web
    not answering): Cluster.cancel_later sends it again."""
    UNREAD.cancelling = True
    try:
        future.cancel()
    except (Unreachable, Cut, TooSlow):
        return False
    except Exception:
        pass                    # rc-web answered: sending it again would not help
    finally:
        UNREAD.cancelling = False
    return True


# -- Executor: Python functions on the fleet ---------------------------------------------

class Executor(concurrent.futures.Executor):
    """A concurrent.futures.Executor whose calls run on the cluster's
    devices, each in its own process: code written for ProcessPoolExecutor
    runs on the fleet by changing the line that makes the executor. Task
    options (priority, timeout, retries, requirements, env...) apply to
    every task; max_workers is accepted and ignored (the fleet's slots
    decide).

    submit() calls that come close together (while a request is on its
    way) go to the fleet packed, up to `pack` calls in one python_exec task
    whose process forks one child per call; pack=1 makes every call a task
    of its own. map() sends its chunks as tasks (one process a chunk)."""

    def __init__(self, url=None, token=None, max_workers=None, cluster=None, pack=DEFAULT_PACK,
                 *, initializer=None, initargs=(), mp_context=None, max_tasks_per_child=None,
                 **task_options):
        if not isinstance(pack, int) or pack < 1:
            raise ValueError("pack must be a whole number >= 1, not %r" % (pack,))
        # ProcessPoolExecutor's own: the initializer runs in each task's
        # process before its calls; every call has a process of its own
        # (a map's chunk too, given max_tasks_per_child); no mp_context.
        self.initializer = None
        if initializer is not None:
            if not callable(initializer):
                raise TypeError("initializer must be a callable")
            # TypeError now if it cannot go (a partial, a callable object: as fn)
            function, calls = unwrap_partial(initializer, [(tuple(initargs), {})])
            shipped(function)
            try:
                pickle.dumps(calls, PICKLE_PROTOCOL)
            except Exception as e:
                raise TypeError("the initargs cannot be pickled: %s" % e)
            self.initializer = (initializer, tuple(initargs))
        self.each_own_process = max_tasks_per_child is not None
        if isinstance(url, int) and not isinstance(url, bool) and max_workers is None:
            url = None          # Executor(4), as ProcessPoolExecutor(4): max_workers
        self.cluster = cluster or Cluster(url, token)
        self.own_cluster = cluster is None
        task_spec("python_exec", {"code": ""}, task_options)      # refuse unknown options now
        if task_options.get("inputs"):      # paths of this machine: put once, here
            task_options["inputs"] = [self.cluster.local_input(item)
                                      for item in task_options["inputs"]]
        if isinstance(task_options.get("stdin"), str):
            task_options["stdin"] = self.cluster.put_once(task_options["stdin"])
        self.task_options = task_options
        self.pack = pack
        self.outstanding = set()        # futures not done: calls (and map's tasks)
        self.packs = set()              # pack tasks not done
        self.open_pack = None           # the pack new calls join until it is sent
        self.asking_slots = False
        self.lock = threading.Lock()
        self.shut = False

    def submit(*args, **kwargs):
        """submit(fn, /, *args, **kwargs): run fn(*args, **kwargs) on a
        device; a future of its value. fn must be shippable (docs/client.md):
        TypeError at once if not. (Positional-only as ProcessPoolExecutor's,
        so fn's own keywords may be `fn` and `self`; `/` is 3.8's syntax.)"""
        if len(args) < 2:
            raise TypeError("submit() missing 1 required positional argument: 'fn'")
        self, fn, args = args[0], args[1], args[2:]
        if self.pack == 1:
            return self.submit_calls(fn, [(args, kwargs)], first_outcome)
        self.refuse_after_shutdown()
        function, calls = unwrap_partial(fn, [(args, kwargs)])
        _, pieces, home = shipped(function)         # TypeError now, not when it is sent
        try:
            data = pickle.dumps(calls, PICKLE_PROTOCOL)
        except Exception as e:
            raise TypeError("the arguments of %s cannot be pickled: %s" % (describe(fn), e))
        if home not in (None, "__main__") and b"__main__" in data:
            refuse_script_arguments(function, calls, home)
        if function is invoke:
            module_of_yours(calls, calls[0][0][0])  # TypeError now if two modules of yours
        if code_size(pieces) > PIECES_IN_CODE:      # stored now, for its packs
            self.cluster.put_data_once(pieces_file(pieces))
        weight = len(data)
        if weight > MAX_ARGUMENT_BYTES:     # a task of its own, its arguments a file
            return self.submit_calls(fn, [(args, kwargs)], first_outcome)
        call = CallFuture(self, (args, kwargs), weight)
        with self.lock:
            self.outstanding.add(call)
        call.add_done_callback(self.forget)
        self.place([call], fn)
        return call

    def refuse_after_shutdown(self):
        with self.lock:
            if self.shut:
                raise RuntimeError("cannot schedule new futures after shutdown")

    def submit_calls(self, fn, calls, decode, more_coming=False):
        self.refuse_after_shutdown()
        held = {}

        def store(data):
            stored = self.cluster.put_data_once(data)
            if not isinstance(data, tuple):     # a call's arguments: held until queued
                held[stored["sha256"]] = data
            return stored
        code, home, inputs = call_code(fn, calls, each=self.each_own_process and len(calls) > 1,
                                       store=store, initializer=self.initializer)
        options = self.task_options
        if inputs:
            options = dict(options, inputs=list(options.get("inputs") or ()) + inputs)
        spec = task_spec("python_exec", {"code": code}, options)
        future = self.cluster.submit_spec(spec, functools.partial(
            decode, home=home, cluster=self.cluster), held, more_coming)
        with self.lock:
            self.outstanding.add(future)
        future.add_done_callback(self.forget)
        return future

    def forget(self, future):
        with self.lock:
            self.outstanding.discard(future)

    def map(self, fn, *iterables, timeout=None, chunksize=None):
        """fn over the iterables' items, results in order. Calls go to the
        devices `chunksize` per task (one process a task); by default about
        CHUNKS_PER_SLOT tasks per slot of the fleet (at most MAX_CHUNKSIZE
        calls each), fewer when their arguments are large. `timeout`
        counts from this call, as concurrent.futures' map's."""
        deadline = None if timeout is None else time.monotonic() + timeout
        items = list(zip(*iterables))
        if chunksize is None:
            chunksize = default_chunksize(len(items), self.cluster.slots())
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        # Each chunk to the sender thread, which sends those made while its
        # last request was on its way together: sent from here one at a time
        # (each came after IDLE_GAP, its code being made), a map of 400
        # chunks waited for 400 answers of rc-web in turn, ~12 ms each.
        futures = [self.submit_calls(fn, chunk, each_outcome, more_coming=True)
                   for chunk in argument_chunks(items, chunksize)]
        return flatten(results_in_order(futures, deadline))

    # -- packs -------------------------------------------------------------------------

    def place(self, calls, fn):
        """Each call into the pack still waiting to be sent, or a new one: a
        call that finds none (the first after a pause) goes at once."""
        bound = None
        for call in calls:
            with self.cluster.lock:
                pack = self.open_pack
                if pack is not None and same_callable(pack.fn, fn) and not pack.sealed \
                        and not pack.done():
                    if bound is None:
                        bound = self.pack_bound()
                    if len(pack.calls) < bound and pack.weight + call.weight <= MAX_ARGUMENT_BYTES:
                        pack.add(call)
                        continue
                pack = self.open_pack = PackFuture(self, fn)
                pack.add(call)
            with self.lock:
                self.packs.add(pack)
            pack.add_done_callback(self.pack_done)
            self.cluster.enqueue(pack)

    def pack_bound(self):
        """Calls in one pack: up to `pack`, but no more than the calls not
        done spread over CHUNKS_PER_SLOT packs per slot of the fleet, so
        that a few slow calls are not all queued behind each other in one
        task while other slots idle. (The fleet's slots are read at most
        once every SLOTS_SECONDS; the cluster's lock is held here.)"""
        asked_at, slots = self.cluster.slots_seen
        if time.monotonic() - asked_at >= SLOTS_SECONDS and not self.asking_slots:
            self.asking_slots = True        # asked aside, for the next packs
            start_thread(self.ask_slots, "rc-client-slots")
        with self.lock:
            waiting = len(self.outstanding)
        return max(1, min(self.pack, waiting // (slots * CHUNKS_PER_SLOT)))

    def ask_slots(self):
        try:
            self.cluster.slots()
        finally:
            self.asking_slots = False

    def pack_done(self, pack):
        """Each call of the pack gets its own outcome."""
        with self.lock:
            self.packs.discard(pack)
        if pack.cancelled():
            if not pack.repacked:               # cancelled on the cluster (rc cancel)
                for call in pack.calls:
                    call.local_cancel()
            return
        error = pack.exception()
        if error is None:
            try:
                error = self.hand_out(pack)
            except Exception as e:      # outcomes of another shape than the script makes
                error = TaskFailed(pack.task_id, "completed", "its result cannot be read"
                                   " here: %s: %s" % (type(e).__name__, e), pack.record.get(
                                       "result"))
        if error is not None:
            for call in pack.calls:
                settle(call, error=error)   # the calls without an outcome of their own

    @staticmethod
    def hand_out(pack):
        """Each call its outcome; or the error of them all (the script
        failed before the calls, or its outcomes do not match them)."""
        outcomes, home = pack.result()
        if len(outcomes) != len(pack.calls):
            return remote_exception(outcomes[0], home) if len(outcomes) == 1 and \
                outcomes[0][0] else TaskFailed(pack.task_id, "completed", "%d outcomes for"
                                               " %d calls" % (len(outcomes), len(pack.calls)))
        for call, outcome in zip(pack.calls, outcomes):
            if outcome[0] == 0:
                settle(call, outcome[1])
            else:
                settle(call, error=remote_exception(outcome, home))
        return None

    def cancel_call(self, call):
        """A call not yet sent leaves its pack. One sent cancels its pack's
        task (queued, or running: stopped on its device) and, when that
        worked, its other calls go again in a new pack."""
        while True:
            with self.cluster.lock:
                if call.done():
                    return call.cancelled()
                pack = call.pack
                if not pack.sealed:
                    pack.remove(call)
                    call.local_cancel()
                    if not pack.calls:
                        pack.drop()
                    return True
            with pack.repack_lock:
                if call.pack is not pack:   # another cancel moved it meanwhile
                    continue
                if call.done():
                    return call.cancelled()
                pack.repacked = True
                try:
                    cancelled = pack.cancel()
                except BaseException:
                    pack.repacked = False
                    raise
                if not cancelled:
                    pack.repacked = False
                    concurrent.futures.wait([call])     # its outcome is being handed out
                    return call.cancelled()
                others = [other for other in pack.calls if other is not call
                          and not other.done()]
                call.local_cancel()
                self.place(others, pack.fn)
                return True

    def __exit__(self, exc_type, exc_value, traceback):
        """As ProcessPoolExecutor's when the block ends: every call waited
        for. Left by an exception (Ctrl-C in as_completed, a result that
        raised), as Cluster's: at once, since the tasks run on the fleet
        whether this program waits or not and nobody would read their
        results (a pool's block waited, in silence, for calls of hours);
        stderr names the tasks that go on."""
        if exc_type is None:
            self.shutdown(wait=True)
            return False
        self.shutdown(wait=False)
        self.tell_going_on(exc_type)
        if self.own_cluster:
            self.cluster.close(wait=False)
        return False

    def tell_going_on(self, exc_type):
        with self.lock:
            futures = list(self.packs) + list(self.outstanding)
        # Calls of a pack on its way (submitted close together, just before
        # the block was left) are queued all the same: name their task too.
        deadline = time.monotonic() + GOING_ON_WAIT
        for future in futures:
            if not future.done() and future.task_id is None:
                try:
                    future.wait_submitted(max(0.0, deadline - time.monotonic()))
                except Exception:       # not sent by then, refused, cancelled
                    pass
        task_ids = sorted({future.task_id for future in futures
                           if not future.done() and future.task_id is not None})
        if not task_ids:
            return
        shown = ", ".join(map(str, task_ids[:10])) + (
            " and %d more" % (len(task_ids) - 10) if len(task_ids) > 10 else "")
        group_id = self.cluster.group_id if self.own_cluster else None
        LOG.warning("rc.client: the Executor's block was left by %s; the cluster goes on with"
                    " task%s %s (%s)", exc_type.__name__, "s" if len(task_ids) > 1 else "",
                    shown, "`rc cancel --group %d` stops them" % group_id
                    if group_id is not None else "`rc cancel %d` stops one" % task_ids[0])

    def shutdown(self, wait=True, cancel_futures=False):
        with self.lock:
            self.shut = True
            outstanding, packs = list(self.outstanding), list(self.packs)
        if cancel_futures:
            for future in packs + outstanding:
                future.cancel()
        if wait:
            concurrent.futures.wait(outstanding)
            if self.own_cluster:
                self.cluster.close()


class PackFuture(TaskFuture):
    """One python_exec task running some calls of an Executor, each in a
    process of its own (forked by the task's process); its result is
    (outcomes, home). The calls join it until the sender takes it."""

    def __init__(self, executor, fn):
        super().__init__(executor.cluster, None, None)
        self.executor, self.fn = executor, fn
        self.calls, self.weight = [], 0
        self.sealed = False
        self.repacked = False           # cancelled to send its other calls again
        self.repack_lock = threading.Lock()

    def add(self, call):
        call.pack = self
        self.calls.append(call)
        self.weight += call.weight

    def remove(self, call):
        self.calls.remove(call)
        self.weight -= call.weight

    def drop(self):
        """Cancelled before it was sent, its calls all gone (the cluster's
        lock is held): the sender skips it."""
        if self in self.cluster.queue:
            self.cluster.queue.remove(self)
        self.submit_error = concurrent.futures.CancelledError()
        self.submitted.set()
        self.local_cancel()

    def seal(self):
        """Its task, from the calls it has now (the cluster's lock is held)."""
        if self.sealed:
            return
        self.sealed = True
        if not self.calls:
            raise ValueError("a pack with no calls left")
        # A pack's arguments are at most MAX_ARGUMENT_BYTES (Executor.place):
        # they go in its code, with no file to store under the lock; a
        # function too long for it was stored by Executor.submit.
        code, home, inputs = call_code(
            self.fn, [call.arguments for call in self.calls], each=True,
            store=functools.partial(self.cluster.put_data_once, cached_only=True),
            initializer=self.executor.initializer)
        options = self.executor.task_options
        if inputs:
            options = dict(options, inputs=list(options.get("inputs") or ()) + inputs)
        self.spec = task_spec("python_exec", {"code": code}, options)
        self.decode = functools.partial(outcomes_and_home, home=home, cluster=self.cluster)


def outcomes_and_home(record, home=None, cluster=None):
    return decode_outcomes(record, home, cluster), home


class CallFuture(concurrent.futures.Future):
    """One Executor.submit() call: resolved when its pack's task ends, with
    its own value or exception. `task_id` (once sent), `wait_submitted()`
    and `record` are its pack's; cancel() is Executor.cancel_call."""

    def __init__(self, executor, arguments, weight):
        super().__init__()
        self.executor, self.arguments, self.weight = executor, arguments, weight
        self.pack = None
        self.cancel_lock = threading.Lock()

    @property
    def task_id(self):
        return self.pack.task_id if self.pack is not None else None

    @property
    def record(self):
        return self.pack.record if self.pack is not None else None

    def wait_submitted(self, timeout=None):
        """The id of the task the call is in, once the main node has it."""
        while True:
            pack = self.pack
            try:
                task_id = pack.wait_submitted(timeout)
            except concurrent.futures.CancelledError:
                if self.pack is pack:
                    raise
                continue
            if self.pack is pack:
                return task_id

    def cancel(self):
        return self.executor.cancel_call(self)

    local_cancel = TaskFuture.local_cancel

    def __repr__(self):
        return "<CallFuture task_id=%s %s>" % (self.task_id, self._state.lower())


def default_chunksize(count, slots):
    if count == 0:
        return 1
    return max(1, min(MAX_CHUNKSIZE, -(-count // (slots * CHUNKS_PER_SLOT))))


def argument_chunks(items, chunksize):
    """Lists of (args, {}) of at most `chunksize` calls and, past the first
    call, MAX_ARGUMENT_BYTES of pickled arguments. A whole chunk is weighed
    at once (each call's arguments pickled alone took 1.6 s of a map of
    400,000 small calls), its calls one by one only when it is too heavy."""
    start = 0
    while start < len(items):
        chunk = items[start:start + chunksize]
        if chunksize > 1 and len(pickle.dumps(chunk, PICKLE_PROTOCOL)) > MAX_ARGUMENT_BYTES:
            chunk = lightest_chunk(items, start, chunksize)
        start += len(chunk)
        yield [(args, {}) for args in chunk]


def lightest_chunk(items, start, chunksize):
    """The calls from `start` that fit MAX_ARGUMENT_BYTES (at least one)."""
    chunk, size = [], 0
    for args in items[start:start + chunksize]:
        weight = len(pickle.dumps(args, PICKLE_PROTOCOL))
        if chunk and size + weight > MAX_ARGUMENT_BYTES:
            break
        chunk.append(args)
        size += weight
    return chunk


def flatten(chunk_results):
    """Each call's value, in order, from its chunk's each_outcome(): the
    first call that raised raises there, after the values before it, its
    chunk's too, as a ProcessPoolExecutor's map of chunksize 1 gives them."""
    try:
        for outcomes in chunk_results:
            for value, error in outcomes:
                if error is not None:
                    raise error
                yield value
    finally:
        chunk_results.close()       # the calls not yet done cancelled


def first_outcome(record, home=None, cluster=None):
    return all_outcomes(record, home, cluster)[0]


def each_outcome(record, home=None, cluster=None):
    """[(value, None) or (None, exception)] of the calls of a python_exec
    task made by call_code(), in order."""
    return [(outcome[1], None) if outcome[0] == 0 else (None, remote_exception(outcome, home))
            for outcome in decode_outcomes(record, home, cluster)]


def all_outcomes(record, home=None, cluster=None):
    """The values of a python_exec task made by call_code(), in order; the
    first call that raised raises here, its remote traceback attached."""
    values = []
    for outcome in decode_outcomes(record, home, cluster):
        if outcome[0] == 0:
            values.append(outcome[1])
        else:
            raise remote_exception(outcome, home)
    return values


class Loader(pickle.Unpickler):
    """Unpickles what a device sent: its __main__ is the module `home` here."""

    def __init__(self, data, home):
        super().__init__(io.BytesIO(data))
        self.home = home

    def find_class(self, module, name):
        if module == "__main__" and self.home:
            module = self.home
        return super().find_class(module, name)


def decode_outcomes(record, home=None, cluster=None):
    """The outcomes a call_code() script printed: from the record's output
    or, when the line was longer than the worker's output cap, from the
    task's whole stdout that the main node kept (fetched with `cluster`)."""
    result = record.get("result") or {}
    text = result_line(result.get("output") or "")
    if text is None and result.get("truncated") and cluster is not None:
        text = result_line(kept_stdout(cluster, record["task_id"]))   # base64: ASCII
    if text is None:
        raise TaskFailed(record["task_id"], "completed", "no result line in its output%s" % (
            " (cut at the worker's output cap, and its whole stdout not kept: a worker"
            " without the file store?)" if result.get("truncated") else ""), result)
    try:
        return Loader(binascii.a2b_base64(text), home).load()
    except Exception as e:
        raise TaskFailed(record["task_id"], "completed",
                         "its result cannot be read here: %s: %s" % (type(e).__name__, e),
                         record.get("result"))


def checked(where, status, data, fields, expected, digest, size):
    """A file's answer, a ClusterError unless it is the file asked for: 200,
    its bytes' SHA-256 the one asked for or the one the main node names."""
    if status != 200:       # rc-web's {"error": ...} as every other answer's
        json_answer("GET", where, status, data[:4096], ())
    expected = (expected or fields.get("x-content-sha256", "")).strip().lower()
    got = digest.hexdigest()
    if got != expected:
        raise ClusterError("GET %s: the %d bytes received have SHA-256 %s, not %s"
                           % (where, size, got, expected or "(none named)"))


def result_line(output):
    """The text of the last whole result line of `output`; None if none."""
    position = output.rfind(RESULT_MARK)
    if position < 0:
        return None
    text, newline, _ = output[position + len(RESULT_MARK):].partition("\n")
    return text if newline else None


def kept_stdout(cluster, task_id, encoding="latin-1", bounded=False):
    """The task's whole stdout as the main node kept it; "" if it kept none
    (the stream was within the cap, or the worker could not keep it) or,
    `bounded`, if it is over MAX_ANSWER_BYTES: a task's output, unlike an
    Executor's results (pickles, trusted as the code that made them), may
    come from a device that lies, and is not held whatever its size."""
    try:
        return cluster.get((task_id, KEPT_STDOUT), bounded=bounded).decode(encoding, "replace")
    except AnswerTooLarge:
        return ""
    except ClusterError as e:
        if e.status == 404:
            return ""
        raise


def remote_exception(outcome, home=None):
    """(1, pickled exception or None, type name, message, traceback text)."""
    _, data, type_name, message, traceback_text = outcome
    error = None
    if data is not None:
        try:
            error = Loader(data, home).load()
        except Exception:
            error = None
    if error is None and type_name == "BrokenProcessPool":    # the call's process died
        from concurrent.futures.process import BrokenProcessPool
        error = BrokenProcessPool(message)
    if not isinstance(error, BaseException):
        error = RemoteError(type_name, message, traceback_text)
    if isinstance(error, ImportError):
        say_own_module(error)
    if isinstance(error, FileNotFoundError):
        say_own_file(error)
    error.__cause__ = RemoteTraceback(traceback_text)
    return error


def say_own_module(error):
    """A module the device could not import that is a file of this machine
    (`import helpers` beside the script, which a ProcessPoolExecutor's
    processes find): the message says so and what to do, where a bare
    "No module named 'helpers'" left the user to guess."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if not name or not path or is_library_module(name):
        return
    told = ("%s (on the device: %s is a module of yours, %s, which the device does not"
            " have; `from %s import NAME` sends NAME with the function, or install %s on"
            " the devices: docs/client.md)" % (error, name, path, name, name))
    error.msg, error.args = told, (told,)


def say_own_file(error):
    """A file the call could not open that is a file of this machine
    (data.csv beside the script, which a ProcessPoolExecutor's processes
    open): the message says so and how to send it."""
    name = error.filename
    if not isinstance(name, str) or os.path.isabs(name) or not os.path.isfile(name):
        return
    error.strerror = "%s on the device (%s is a file of this machine: Executor(inputs=[%r])" \
        " puts it in each task's directory, docs/client.md)" % (error.strerror, name, name)


# -- what goes to the device -------------------------------------------------------------
# The task is a python_exec script: the function's source (and what it uses
# from its module) compiled under its own file name and line numbers, so a
# traceback names the lines of the user's file, then its calls.

# Compiling the script costs the device more than running it: the path
# every task takes is short, and what only a failure, an unpicklable value
# or a module other than __main__ needs is a string, compiled when needed.
RUNNER = r'''import sys, binascii, os as _rc_os
try:
    import _pickle as pickle        # pickle.py imports re: a millisecond a task
except ImportError:
    import pickle


def _rc_run(name, pieces, calls, mark, home, each=False, calls_file=None, init=None):
    # The function's prints, and what the tools it runs write on descriptor
    # 1, go to the task's stderr: stdout holds only the result line, which
    # data passing through a tool could otherwise forge for the client.
    sys.stdout.flush()
    out = _rc_os.fdopen(_rc_os.dup(1), "w")
    _rc_os.dup2(2, 1)
    sys.stdout = sys.stderr
    space = globals()
    try:
        if pieces and isinstance(pieces[0], str):   # the function's, too long for
            with open(pieces[0], "rb") as f:        # the code: an input file
                pieces = pickle.loads(f.read()) + pieces[1:]
        space["_rc_pieces"] = pieces + (init[1] if init else [])    # a traceback's lines
        if init:            # the Executor's initializer: its name may be the function's
            _rc_define(init[1], space)
            initializer = space[init[0]]
        _rc_define(pieces, space)
        function = space[name]
        if init:            # once in this process, before its calls, as in a pool's
            initargs = binascii.a2b_base64(init[2])
            args, kwargs = pickle.loads(initargs) if init[3] is None else \
                _rc_slow("load")(initargs, init[3])     # its module's name, as home
            initializer(*args, **kwargs)
        if calls_file is None:
            calls = binascii.a2b_base64(calls)
        else:                   # arguments too large for the code: an input file
            with open(calls_file, "rb") as f:
                calls = f.read()
        calls = pickle.loads(calls) if home in (None, "__main__") else \
            _rc_slow("load")(calls, home)
        if each and sys.argv[1:2] == ["--rc-call"]:     # one call, in a process of its own
            calls, each = [calls[int(sys.argv[2])]], False
        if each and not hasattr(_rc_os, "fork"):
            outcomes = _rc_slow("in_subprocesses")(calls, mark)
        else:
            call = _rc_slow("in_child") if each else _rc_call
            outcomes = [call(function, args, kwargs) for args, kwargs in calls]
    except BaseException as e:
        outcomes = [_rc_slow("failure")(e)]
    if sys.argv[1:2] != ["--rc-call"] and any(outcome[0] for outcome in outcomes):
        _rc_slow("tell_failures")(outcomes)
    try:
        data = pickle.dumps(outcomes, 4)
    except BaseException:
        data = _rc_slow("dumps_each")(outcomes)
    # However long: past the worker's output cap, the main node keeps the
    # whole stdout as a file, where the client reads the line.
    out.write(mark + binascii.b2a_base64(data, newline=False).decode() + "\n")
    out.flush()


def _rc_define(pieces, space):
    # (filename, line, source, *the __future__ features of its module), or
    # (filename, line, None, wrapper, lines): the piece is the body of the
    # function `wrapper` of this script, compiled with it before the task's
    # process was forked (compile() in that process cost ~2 ms of fresh
    # memory a task); its code is moved to the file and line it came from.
    for filename, line, source, *features in pieces:
        if source is None:
            code = space[features[0]].__code__
            type(_rc_define)(_rc_moved(code, filename, line - code.co_firstlineno - 2),
                             space)()
            continue
        flags = 0
        for feature in features:            # annotations: not on Python 3.6
            flags |= getattr(getattr(__import__("__future__"), feature, None),
                             "compiler_flag", 0)
        exec(compile("\n" * (line - 1) + source, filename, "exec", flags, True), space)


def _rc_moved(code, filename, delta):
    consts = tuple(_rc_moved(value, filename, delta) if isinstance(value, type(code))
                   else value for value in code.co_consts)
    first = max(1, code.co_firstlineno + delta)     # a wrapper of a piece at line 1 or 2
    if hasattr(code, "replace"):
        return code.replace(co_filename=filename, co_firstlineno=first, co_consts=consts)
    return type(code)(code.co_argcount, code.co_kwonlyargcount, code.co_nlocals,  # 3.6, 3.7
                      code.co_stacksize, code.co_flags, code.co_code, consts, code.co_names,
                      code.co_varnames, filename, code.co_name, first, code.co_lnotab,
                      code.co_freevars, code.co_cellvars)


def _rc_invoke(function, *args, **kwargs):
    return function(*args, **kwargs)


def _rc_call(function, args, kwargs):
    try:
        return (0, function(*args, **kwargs))
    except BaseException as e:
        return _rc_slow("failure")(e)


def _rc_slow(name):
    if "_rc_failure" not in globals():
        exec(_RC_SLOW, globals())
    return globals()["_rc_" + name]


_RC_SLOW = """
import io


def _rc_failure(e):
    import traceback
    _rc_lines_of_pieces()
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
    if isinstance(e, SyntaxError):      # source the sender's Python compiled: too new here
        text += "(this device runs Python %d.%d.%d)\\n" % tuple(sys.version_info[:3])
    try:
        data = pickle.dumps(e, 4)
        pickle.loads(data)
    except BaseException:
        data = None
    return (1, data, type(e).__name__, str(e)[:10000], text[-50000:])


def _rc_tell_failures(outcomes):
    # The task completes (its stdout carries every outcome to the client):
    # its stderr is where rc task, rc logs and the dashboard show that a
    # call raised, and how.
    for number, outcome in enumerate(outcomes, 1):
        if outcome[0]:
            sys.stderr.write("rc.client: call %d of %d raised:\\n%s" % (number, len(outcomes),
                                                                        outcome[4]))
    sys.stderr.flush()


def _rc_lines_of_pieces():
    # The device has the function's source, not its file: put that source
    # in linecache under the file's name, so the traceback shows each line
    # of it as ProcessPoolExecutor's would.
    import linecache
    files = {}
    for filename, line, source, *wrapper in globals().get("_rc_pieces", ()):
        if source is None:      # a wrapper's body, in this script: indented, as its code
            code = globals()[wrapper[0]].__code__
            source = "".join(linecache.getlines(code.co_filename)[
                code.co_firstlineno + 1:code.co_firstlineno + 1 + wrapper[1]])
        lines, texts = files.setdefault(filename, []), source.split("\\n")
        if texts[-1] == "":
            texts.pop()
        for number, text in enumerate(texts, line - 1):
            lines.extend(["\\n"] * (number + 1 - len(lines)))
            lines[number] = text + "\\n"
    for filename, lines in files.items():
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


def _rc_load(data, home):
    class Loader(pickle.Unpickler):
        # The client's module `home` is this script's __main__ here.
        def find_class(self, module, name):
            return pickle.Unpickler.find_class(self, "__main__" if module == home
                                               else module, name)
    return Loader(io.BytesIO(data)).load()


def _rc_dumps_each(outcomes):
    kept = []
    for outcome in outcomes:
        try:
            pickle.dumps(outcome, 4)
            kept.append(outcome)
        except BaseException as e:
            kept.append(_rc_failure(e))
    return pickle.dumps(kept, 4)


def _rc_in_child(function, args, kwargs):
    # A packed call (Executor(pack=...)): in a process of its own, forked
    # from this one, its outcome sent back over a pipe; a call that crashes
    # or leaves with os._exit fails alone.
    sys.stderr.flush()          # or the child would print this process's buffer again
    read, write = _rc_os.pipe()
    try:
        pid = _rc_os.fork()
    except OSError as e:        # out of processes (RLIMIT_NPROC) or memory: this call fails
        _rc_os.close(read)
        _rc_os.close(write)
        return _rc_failure(e)
    if pid == 0:
        _rc_os.close(read)
        code = 0
        try:
            outcome = _rc_call(function, args, kwargs)
            try:
                data = pickle.dumps(outcome, 4)
            except BaseException as e:
                data = pickle.dumps(_rc_failure(e), 4)
            with _rc_os.fdopen(write, "wb") as f:
                f.write(data)
        except BaseException:
            code = 70
        finally:
            try:
                sys.stderr.flush()
            finally:
                _rc_os._exit(code)
    _rc_os.close(write)
    with _rc_os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = _rc_os.waitpid(pid, 0)
    if data:
        try:
            return pickle.loads(data)
        except BaseException as e:
            return _rc_failure(e)
    return _rc_died(_rc_os.WTERMSIG(status) if _rc_os.WIFSIGNALED(status) else 0,
                    _rc_os.WEXITSTATUS(status))


def _rc_in_subprocesses(calls, mark):
    # Packed calls where there is no fork (Windows): this script again, for
    # one call at a time.
    import subprocess
    outcomes = []
    for number in range(len(calls)):
        sys.stderr.flush()
        done = subprocess.run([sys.executable, "-I", _rc_os.path.abspath(sys.argv[0]),
                               "--rc-call", str(number)], stdout=subprocess.PIPE)
        text = done.stdout.decode("utf-8", "replace")
        position = text.rfind(mark)
        try:
            outcome = pickle.loads(binascii.a2b_base64(
                text[position + len(mark):].split("\\n", 1)[0]))[0]
        except BaseException:
            outcome = None
        if position < 0 or outcome is None:
            code = done.returncode
            outcome = _rc_died(-code if code < 0 else 0, code)
        outcomes.append(outcome)
    return outcomes


def _rc_died(signal_number, code):
    if signal_number:
        import signal
        try:
            how = "was killed by %s" % signal.Signals(signal_number).name
        except ValueError:
            how = "was killed by signal %d" % signal_number
    else:
        how = "exited with status %d" % code
    message = "the call's process %s before it returned" % how
    return (1, None, "BrokenProcessPool", message, message + "\\n")

"""


'''


def call_code(fn, calls, each=False, store=None, initializer=None):
    """(the python_exec script that makes `calls` ([(args, kwargs)]) of fn,
    each in a process of its own when `each`, the module whose definitions
    it carries, which is __main__ there, the inputs it needs). Pickled
    arguments over MAX_ARGUMENT_BYTES go as the input CALLS_FILE, stored
    with `store` (Cluster.put), as ProcessPoolExecutor takes arguments of
    any size. `initializer`, (function, args), runs first in the task's
    process, as a ProcessPoolExecutor's in each of its processes."""
    fn, calls = unwrap_partial(fn, calls)
    name, pieces, home = shipped(fn)
    title = getattr(fn, "__qualname__", name)
    if fn is invoke:            # a callable object, pickled as the calls' first argument
        callable_object = calls[0][0][0]
        home, title = module_of_yours(calls, callable_object), getattr(
            callable_object, "__qualname__", type(callable_object).__qualname__)
    init, wrappers = "", []
    if initializer is not None:
        init_function, init_calls = unwrap_partial(initializer[0], [(initializer[1], {})])
        init_name, init_pieces, init_home = shipped(init_function)
        if init_function is invoke:
            init_home = module_of_yours(init_calls, init_calls[0][0][0])
        init_data = pickle.dumps(init_calls[0], PICKLE_PROTOCOL)      # (args, kwargs)
        init_named = init_home is not None and init_home.encode() in init_data
        if init_named:
            init_pieces = init_pieces + argument_pieces(init_calls, init_home, init_pieces)
        init = ", init=(%r, %r, %r, %r)" % (init_name, placed(init_pieces, wrappers),
                                            base64.b64encode(
            init_data).decode(), init_home if init_named and init_home != "__main__" else None)
    try:
        data = pickle.dumps(calls, PICKLE_PROTOCOL)
    except Exception as e:
        raise TypeError("the arguments of %s cannot be pickled: %s" % (describe(fn), e))
    # Arguments that name nothing of fn's module unpickle as they are there;
    # others need that module read as the script's __main__ (a slower path),
    # and its classes they name that fn does not use sent too.
    named = home is not None and home.encode() in data
    renamed = home if named and home != "__main__" else None
    extra = argument_pieces(calls, home, pieces) if named else []
    if home not in (None, "__main__") and b"__main__" in data:
        refuse_script_arguments(fn, calls, home)
    inputs, calls_file = [], ""
    if len(data) > MAX_ARGUMENT_BYTES and store is not None:
        stored = store(data)
        inputs = [{"path": CALLS_FILE, "sha256": stored["sha256"], "size": stored["size"]}]
        calls_file, data = ", calls_file=%r" % CALLS_FILE, b""
    # A function whose source and globals are too long for the code (a
    # global table of megabytes) goes as a file, the same for all its tasks.
    stored = store(pieces_file(pieces)) if store is not None and \
        code_size(pieces) > PIECES_IN_CODE else None
    if stored is not None:
        inputs.append({"path": PIECES_FILE, "sha256": stored["sha256"],
                       "size": stored["size"]})
        pieces = [PIECES_FILE]
    pieces = placed(pieces + extra, wrappers)
    # The first line is what `rc tasks` and the dashboard show of the task.
    return "# %s, %d call%s (rc.client)\n%s%s_rc_run(%r, %r, %r, %r, %r%s%s%s)\n" % (
        title, len(calls), "" if len(calls) == 1 else "s",
        RUNNER, "".join(wrappers), name, pieces, base64.b64encode(data).decode(), RESULT_MARK,
        renamed, ", each=True" if each else "", calls_file, init), home, inputs


def placed(pieces, wrappers):
    """The pieces as _rc_define takes them: each that can be, the body of a
    function of the script (its text added to `wrappers`), which the worker
    compiles with the script before it forks the task's process, instead
    of a string the task's process compiles (~2 ms a task, most of a small
    chunk's own time: the compiler's first use in a fresh process)."""
    runner_pieces = []
    for piece in pieces:
        body = wrapped_body(piece) if isinstance(piece, tuple) else None
        if body is None:
            runner_pieces.append(piece)
            continue
        name = "_rc_piece_%d" % len(wrappers)
        wrappers.append("\n\ndef %s():\n%s\n\n" % (name, body[0]))
        runner_pieces.append((piece[0], piece[1], None, name, body[1]))
    return runner_pieces


@functools.lru_cache(maxsize=128)
def wrapped_body(piece):
    """(a function body running the piece's statements in the module's
    globals: every name they bind declared global, each line indented but
    those inside a string, the number of the piece's lines), or None when
    it cannot be one (__future__ features, an annotated or star-importing
    statement, a match: left to compile on the device as before)."""
    filename, line, source = piece[:3]
    if len(piece) > 3:
        return None
    try:
        names = names_bound(ast.parse(source))
        inside = rows_inside_strings(source)
    except (SyntaxError, ValueError, tokenize.TokenError, NotWrappable):
        return None
    texts = source.split("\n")
    if texts[-1] == "":
        texts.pop()
    body = "    %s\n%s" % ("global " + ", ".join(sorted(names)) if names else "pass", "\n".join(
        text if row in inside or not text else "    " + text
        for row, text in enumerate(texts, 1)))
    try:
        compile("def _rc_piece():\n" + body + "\n", filename, "exec")
    except (SyntaxError, ValueError):
        return None
    return body, len(texts)


class NotWrappable(Exception):
    pass


def names_bound(tree):
    """The names a module's statements bind in its globals (not those of
    the functions, classes and comprehensions they hold, but a walrus's)."""
    names = set()

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            return
        if isinstance(node, ast.Lambda):
            return
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            names.update(inner.target.id for inner in ast.walk(node)
                         if type(inner).__name__ == "NamedExpr")
            return
        if isinstance(node, (ast.AnnAssign, ast.Nonlocal)) or type(node).__name__ in (
                "Match", "match_case") or isinstance(node, ast.ImportFrom) and any(
                alias.name == "*" for alias in node.names):
            raise NotWrappable()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.Global):
            names.update(node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(tree)
    return names


def rows_inside_strings(source):
    """The rows (from 1) of the source that begin inside a string token
    (a triple-quoted string's later lines): indenting them would change it."""
    rows = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        rows.update(range(token.start[0] + 1, token.end[0] + 1))
    return rows


def argument_pieces(calls, home, pieces):
    """The pieces defining what of the module `home` the arguments name (a
    namedtuple of the script that the function passes on but never names)
    that `pieces`, the function's, do not: a ProcessPoolExecutor's process
    has all of its module."""
    referrer = Referrer(home)
    referrer.dump(calls)
    extra, known = [], set(pieces)
    for value in referrer.found.values():
        for piece in shipped_definition(value):
            if piece not in known:
                known.add(piece)
                extra.append(piece)
    return extra


def refuse_script_arguments(fn, calls, home):
    """A TypeError if the arguments of a function of the module `home` (not
    the script) name functions or classes of the script: the device runs
    one module of yours, as its __main__, where they would not be found."""
    referrer = Referrer("__main__")
    referrer.dump(calls)
    if referrer.found:
        names = ", ".join(sorted(referrer.found))
        raise TypeError("the arguments of %s name %s of your script, which cannot go to a"
                        " device with a function of %s (a call takes one module of yours):"
                        " define %s in %s, or the function in the script"
                        % (describe(fn), names, home, names, home))


class Referrer(pickle.Pickler):
    """Pickles to nowhere, noting the top-level classes and functions of the
    module `home` that the pickle names; with no home, of every module that
    is not a library's, their modules in `modules`."""

    def __init__(self, home=None):
        super().__init__(io.BytesIO(), PICKLE_PROTOCOL)
        self.home, self.found, self.modules, self.library = home, {}, set(), {}

    def persistent_id(self, value):       # asked of every object pickled
        if not isinstance(value, (type, types.FunctionType)) and \
                not decorated_at_top_level(value):      # an lru_cache, pickled by name
            return None
        module = getattr(value, "__module__", None)
        if self.home is None and isinstance(module, str):
            if module not in self.library:
                self.library[module] = is_library_module(module)
            if not self.library[module]:
                self.modules.add(module)
        elif self.home is not None and module == self.home:
            name = value.__qualname__.partition(".")[0]     # Outer of Outer.Inner
            self.found[name] = getattr(sys.modules.get(self.home), name, value)
        return None


def module_of_yours(calls, callable_object):
    """The one module, not a library's, whose classes or functions the
    pickle of the calls of a callable object (its first argument) names
    (the device is sent them), or None."""
    referrer = Referrer()
    referrer.dump(calls)
    if len(referrer.modules) > 1:
        raise TypeError("cannot ship %r to a device with these arguments: they name classes"
                        " or functions of modules %s, which the device has not, and one"
                        " module of yours goes with a call" % (
                            callable_object, ", ".join(sorted(referrer.modules))))
    return referrer.modules.pop() if referrer.modules else None


_definitions = {}


def shipped_definition(value):
    """The pieces of a class or function of a module the device has not, with
    what it uses of its module, made once per value."""
    with _shipped_lock:
        found = _definitions.get(id(value))
        if found is not None and found[0] is value:
            return found[1]
    shipment = Shipment(value)
    if isinstance(value, types.FunctionType):
        refuse_unshippable(value)
    shipment.add_definition(value.__name__, value)
    made = shipment.collected()
    with _shipped_lock:
        _definitions[id(value)] = (value, made)
    return made


def code_size(pieces):
    """Characters of the source (and pickled globals) of shipped() pieces."""
    return sum(len(piece[2]) for piece in pieces)


_pieces_files = {}


def pieces_file(pieces):
    """(the PIECES_FILE of shipped() pieces, its SHA-256), made once per shipment."""
    with _shipped_lock:
        found = _pieces_files.get(id(pieces))
        if found is not None and found[0] is pieces:
            return found[1]
    data = pickle.dumps(pieces, PICKLE_PROTOCOL)
    made = (data, hashlib.sha256(data).hexdigest())
    with _shipped_lock:
        _pieces_files[id(pieces)] = (pieces, made)
    return made


def unwrap_partial(fn, calls):
    """(the function to ship, its calls [(args, kwargs)]): a partial's
    arguments join each call's; a callable that is neither a function nor
    a library's function or class (str.upper, operator.itemgetter(1), a
    bound method, an instance with __call__, a class of yours) is the first
    argument of each call of invoke, pickled, as ProcessPoolExecutor sends a
    callable; what it names of a module of yours goes as source."""
    while isinstance(fn, functools.partial):
        calls = [(fn.args + tuple(args), dict(fn.keywords or {}, **kwargs))
                 for args, kwargs in calls]
        fn = fn.func
    method = isinstance(fn, types.FunctionType) and "." in fn.__qualname__ and \
        "<" not in fn.__qualname__          # Class.method, named through its class
    if method or not isinstance(fn, types.FunctionType) and not by_name(fn) and \
            not decorated_at_top_level(fn):
        if not callable(fn):
            raise TypeError("%r is not callable" % (fn,))
        try:
            pickle.dumps(fn, PICKLE_PROTOCOL)
        except Exception as e:
            raise TypeError("cannot ship %r to a device: it cannot be pickled (%s); pass a"
                            " function defined with def at the top level of a module"
                            " (docs/client.md)" % (fn, e))
        fn, calls = invoke, [((fn,) + tuple(args), kwargs) for args, kwargs in calls]
    return fn, calls


def same_callable(one, other):
    """Whether calls of both can share a pack: one function, or one method
    of one object (obj.method is a new bound method each time)."""
    return one is other or isinstance(one, types.MethodType) and isinstance(
        other, types.MethodType) and one.__self__ is other.__self__ and \
        one.__func__ is other.__func__


def invoke(function, *args, **kwargs):
    """Stands for the runner's _rc_invoke: function(*args, **kwargs)."""
    return function(*args, **kwargs)


def by_name(fn):
    """Whether fn is a function or class of a library module, which the
    device imports by name (math.sqrt, collections.Counter)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    return isinstance(module, str) and isinstance(qualname, str) and bool(qualname) and \
        "<" not in qualname and module != "__main__" and (
            is_library_module(module.split(".")[0]) or is_library_module(module))


_shipped = {}
_shipped_lock = threading.Lock()


def shipped(fn):
    """(name to call, [(filename, first line, source)]) for fn, made once per function."""
    if fn is invoke:
        return "_rc_invoke", [], None           # the runner's own
    key = id(fn)
    with _shipped_lock:
        found = _shipped.get(key)
        if found is not None and found[0] is fn:
            return found[1]
    made = Shipment(fn).pieces()
    with _shipped_lock:
        _shipped[key] = (fn, made)
    return made


def describe(fn):
    return "%s.%s" % (getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", repr(fn)))


LIBRARY_PATHS = tuple(os.path.realpath(p) + os.sep for p in {
    sysconfig.get_paths().get(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    if p)


def is_library_module(name):
    """A module every device is expected to have (the standard library) or
    to install itself (site-packages): referred to by import, never copied."""
    if name in sys.builtin_module_names or name == "builtins":
        return True
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    return bool(path) and os.path.realpath(path).startswith(LIBRARY_PATHS)


class Shipment:
    """The source of a function and of what it uses from its module:
    imports, helper functions and classes, constants (pickled)."""

    MAX_PIECES = 200

    def __init__(self, fn):
        self.fn = fn
        self.imports, self.definitions, self.constants = {}, {}, {}
        self.seen = set()

    def pieces(self):
        fn = self.fn
        if not isinstance(fn, types.FunctionType) and not decorated_at_top_level(fn):
            return self.by_reference(fn)
        refuse_unshippable(fn)
        if is_library_module(fn.__module__) and fn.__module__ != "__main__":
            return self.by_reference(fn)
        self.add_definition(fn.__name__, fn)
        return fn.__name__, self.collected(), fn.__module__

    def collected(self):
        """The pieces: imports, constants, then definitions in file order."""
        module = self.fn.__module__
        ordered = sorted(self.definitions.values(), key=lambda piece: (piece[0], piece[1]))
        pieces = [("<imports of %s>" % module, 1, "\n".join(
            statement for statement in self.imports.values()))] if self.imports else []
        pieces += [("<constants of %s>" % module, 1, "".join(self.constants.values()))] \
            if self.constants else []
        return pieces + ordered

    def by_reference(self, fn):
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
        if not by_name(fn):
            raise TypeError("cannot ship %r to a device: pass a function defined with def at"
                            " the top level of a module (docs/client.md)" % (fn,))
        head, _, rest = qualname.partition(".")
        source = "from %s import %s as _rc_function\n" % (module, head)
        if rest:
            source += "_rc_function = _rc_function.%s\n" % rest
        return "_rc_function", [("<%s>" % describe(fn), 1, source)], None

    def add_definition(self, name, value):
        if id(value) in self.seen:
            return
        self.seen.add(id(value))
        if len(self.seen) > self.MAX_PIECES:
            raise TypeError("%s uses more than %d functions and classes of its module; put"
                            " them in a package installed on the devices"
                            % (describe(self.fn), self.MAX_PIECES))
        module = sys.modules.get(value.__module__)
        statement = top_level_statement(module, value) if isinstance(value, type) else None
        try:
            if statement is None:       # a decorated function's: its def's, decorators too
                lines, first = inspect.getsourcelines(inspect.unwrap(value))
                filename = inspect.getsourcefile(inspect.unwrap(value)) or \
                    "<%s>" % describe(value)
            else:
                lines, first = statement
                filename = inspect.getsourcefile(module) or "<%s>" % describe(value)
        except (OSError, TypeError):
            raise TypeError("cannot ship %s to a device: its source cannot be read (made"
                            " inside a function, in an interactive session or with python"
                            " -c?); put it at the top level of a .py file" % describe(value))
        source = textwrap.dedent("".join(lines))
        if value.__name__ != name:
            source += "%s = %s\n" % (name, value.__name__)
        # `from __future__ import annotations` binds the name in its module
        future = ("annotations",) if getattr(module, "annotations", None) is getattr(
            __future__, "annotations", False) else ()
        self.definitions[name] = (filename, first, source) + future
        for used in sorted(self.names_used(value, source)):
            self.add_global(used, module, value)

    def names_used(self, value, source):
        """Global names the definition reads: from the bytecode of a function
        (and of a class's methods), from the syntax outside function bodies
        (decorators, base classes, class attributes)."""
        functions = [inspect.unwrap(value)] if not isinstance(value, type) else [
            getattr(member, "__func__", member) for member in vars(value).values()]
        names = set()
        for function in functions:
            if isinstance(function, property):
                function = function.fget
            if isinstance(function, types.FunctionType):
                names |= code_globals(function.__code__)
        try:
            tree = ast.parse(source)
        except SyntaxError:
            return names
        return names | outside_functions(tree)

    def add_global(self, name, module, user):
        space = getattr(module, "__dict__", {})
        if name not in space or name in self.definitions or name in self.imports \
                or name in self.constants:
            return          # a builtin, or a name the code never finds (an error there too)
        value = space[name]
        if isinstance(value, types.ModuleType):
            self.imports[name] = import_statement(module, name) or (
                "import %s as %s" % (value.__name__, name))
        elif (isinstance(value, (types.FunctionType, type)) or decorated_at_top_level(value)) \
                and not is_library_module(value.__module__):
            if isinstance(value, types.FunctionType):
                refuse_unshippable(value)
            self.add_definition(name, value)
        elif is_library_object(value):
            self.imports[name] = import_statement(module, name) or reference_import(name, value)
        else:
            try:
                data = base64.b64encode(pickle.dumps(value, PICKLE_PROTOCOL)).decode()
            except Exception as e:
                raise TypeError("%s uses the global %s (%s), which cannot be pickled to ship"
                                " it: %s" % (describe(user), name, type(value).__name__, e))
            self.constants[name] = ("%s = __import__('_pickle').loads(__import__('binascii')"
                                    ".a2b_base64(%r))\n" % (name, data))


def is_library_object(value):
    """A function or class of a library module (math.sqrt, collections.Counter)."""
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    return isinstance(module, str) and isinstance(qualname, str) and is_library_module(module)


def decorated_at_top_level(fn):
    """Whether fn is what a decorator made of a def at the top level of its
    module (functools.wraps's wrapper, an lru_cache): that def, decorators
    and all, ships as source, decorated again on the device."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    return hasattr(fn, "__wrapped__") and isinstance(inspect.unwrap(fn), types.FunctionType) \
        and getattr(module, getattr(fn, "__name__", ""), None) is fn


def refuse_unshippable(fn):
    if decorated_at_top_level(fn):
        fn = inspect.unwrap(fn)                 # the def's own function is checked
    what = describe(fn)
    if fn.__name__ == "<lambda>":
        raise TypeError("cannot ship the lambda %s to a device: define the function with def"
                        " at the top level of a module (docs/client.md)" % what)
    if "<locals>" in fn.__qualname__ or fn.__closure__:
        raise TypeError("cannot ship %s to a device: it is a nested function or closure;"
                        " define it at the top level of its module and pass what it"
                        " captures as arguments (docs/client.md)" % what)
    if "." in fn.__qualname__:
        raise TypeError("cannot ship the method %s to a device: wrap it in a module-level"
                        " function (docs/client.md)" % what)
    if inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn):
        raise TypeError("cannot ship %s: a coroutine or generator function gives no value"
                        " a process can return; return a list instead" % what)


def code_globals(code):
    """Names a code object (and those nested in it) loads as globals."""
    names = set()
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            names.add(instruction.argval)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= code_globals(constant)
    return names


def outside_functions(tree):
    """Names loaded in a definition's syntax outside any function body."""
    names, nodes = set(), [tree]
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            nodes.extend(getattr(node, "decorator_list", []))
            # kw_defaults holds None for a keyword-only argument without one
            nodes.extend(d for d in node.args.defaults + node.args.kw_defaults if d)
            nodes.extend(annotations(node))     # evaluated by def: names they use ship
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
        nodes.extend(ast.iter_child_nodes(node))
    return names


def annotations(node):
    """The annotations of a def's arguments and of what it returns."""
    args = node.args
    found = [getattr(node, "returns", None)]
    for arg in getattr(args, "posonlyargs", []) + args.args + args.kwonlyargs + [
            args.vararg, args.kwarg]:
        found.append(getattr(arg, "annotation", None))
    return [annotation for annotation in found if annotation is not None]


_module_statements = {}


def top_level_statement(module, cls):
    """(lines, first line number) of the statement at the top level of its
    module that makes the class: its `class` with its decorators (before
    Python 3.9 inspect gives a class's source from `class` on: a
    @dataclass went without its decorator), else an assignment to its name
    (`Point = namedtuple("Point", "x y")`, `Shade = Enum("Shade", "DARK")`:
    no source of its own); None when there is neither."""
    key = getattr(module, "__name__", None)
    if key not in _module_statements:
        _module_statements[key] = module_statements(module)
    lines, classes, assignments = _module_statements[key]
    span = classes.get(cls.__name__) or assignments.get(cls.__name__)
    return None if span is None else (lines[span[0] - 1:span[1]], span[0])


def module_statements(module):
    """(the module's source lines, {class name: (first, last line)}, {name
    assigned: (first, last line)}) of its top-level statements."""
    try:
        lines = inspect.getsourcelines(module)[0]
        tree = ast.parse("".join(lines))
    except (OSError, TypeError, SyntaxError):
        return [], {}, {}
    classes, assignments = {}, {}

    def first_line(node):
        return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    body = tree.body
    for node, after in zip(body, body[1:] + [None]):
        # end_lineno is 3.8's: before it, up to the next statement
        last = getattr(node, "end_lineno", None) or (
            first_line(after) - 1 if after is not None else len(lines))
        span = (first_line(node), last)
        if isinstance(node, ast.ClassDef):
            classes[node.name] = span
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assignments[target.id] = span
    return lines, classes, assignments


_module_imports = {}


def import_statement(module, name):
    """The module's own top-level import that binds `name`, as a statement
    of that binding alone ("import numpy as np"), or None."""
    key = getattr(module, "__name__", None)
    if key not in _module_imports:
        _module_imports[key] = module_imports(module)
    return _module_imports[key].get(name)


def module_imports(module):
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return {}
    found = {}
    statements = list(tree.body)
    while statements:
        node = statements.pop(0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                found.setdefault(bound, "import %s%s" % (
                    alias.name, " as %s" % alias.asname if alias.asname else ""))
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__":
            for alias in node.names:
                if alias.name != "*":
                    found.setdefault(alias.asname or alias.name, "from %s import %s%s" % (
                        node.module, alias.name, " as %s" % alias.asname if alias.asname else ""))
        elif isinstance(node, (ast.If, ast.Try)):
            # `try: import json except ImportError: ...`: the first binding wins
            for block in [node.body] + [h.body for h in getattr(node, "handlers", [])]:
                statements[0:0] = [n for n in block if isinstance(n, (ast.Import,
                                                                      ast.ImportFrom))]
    return found


def reference_import(name, value):
    module, qualname = value.__module__, value.__qualname__
    if "." in qualname or "<" in qualname:
        raise TypeError("cannot ship the global %s (%r): import it in the function instead"
                        % (name, value))
    return "from %s import %s%s" % (module, qualname, "" if qualname == name
                                    else " as %s" % name)
