"""rc-files: moves task files between the main node's file store and workers.

A program of its own, on its own port (`files_port`), so that moving a 4 GB
file never shares a loop with rc-server's heartbeats, assignments and
results (docs/architecture.md). One thread per connection, blocking
sockets: a transfer is long and mostly waits on the network or the disk,
and ssl, hashlib and file I/O all release the GIL while they work, so
threads move bytes in parallel without a hand-written TLS state machine. At
most MAX_CONNECTIONS at once, each with one CHUNK_BYTES buffer: memory is
bounded whatever the file sizes.

TLS with the worker port's certificate when `tls` is on (the fingerprint
workers pin already). Each connection proves a joined device's own secret
(HMAC on fresh nonces, role "rc-files"); the join token is never enough.
A device reads only the blobs its current tasks read, and stores only for
the (task, attempt) it holds now. docs/protocol.md describes the framing.
It never assigns, finishes or retries a task.
"""
import hmac
import socket
import ssl
import sys
import threading
import time

import orjson

from rc import config as rc_config
from rc import db, device_secrets, files, program, protocol, throttle, tls
from rc.state_dir import read_secret

MAX_CONNECTIONS = 128         # connections served at once; more are closed at once
MAX_PER_DEVICE = 16           # of those, one device's (a worker uses one per task at most)
MAX_LINE_BYTES = 64 * 1024    # a control line, newline included
CHUNK_BYTES = 256 * 1024      # bytes one connection holds in memory while moving a file
SENDFILE_BYTES = 4 * 1024 * 1024  # bytes one sendfile call moves (progress is counted between)
WHOLE_PUT_BYTES = CHUNK_BYTES  # a put this small may come with its request (put "whole")
IDLE_TIMEOUT = 300.0          # seconds a connection may sit between requests
DATA_TIMEOUT = 60.0           # seconds a transfer may stall before it is cut
MIN_TRANSFER_RATE = 16 * 1024  # bytes/s below which a transfer counts as idle when rc-files is full
SLOW_GRACE = 5.0              # seconds a transfer may take to reach that rate
ACCEPT_POLL = 0.5             # seconds between looks at the stop flag
DEVICE_ID_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
NONCE_HEX = 32
MAX_NAME_BYTES = 4096


class Refusal(Exception):
    """A request is refused: {"error": {"code", "message"}}; `close` when
    the connection cannot go on (it may be out of step)."""

    def __init__(self, code, message, close=False):
        super().__init__(message)
        self.code, self.close = code, close


def proof(secret, server_nonce, worker_nonce, device_id):
    """What a device sends to rc-files: its own secret proven on both nonces."""
    return protocol._sign(secret, "rc-files", server_nonce, worker_nonce, device_id)


class FilesServer:
    def __init__(self, config, log):
        self.config, self.log = config, log
        # Lines a peer can make us repeat at will, file_sent and file_stored
        # among them (a device may get its task's input again and again): a
        # few a minute per event and key, the rest counted.
        self.log_limited = throttle.LimitedLog(log)
        self.next_held_back = 0.0
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.wrong_proofs = throttle.WrongProofs(config.auth_failures_per_minute)
        self.authenticating = {}    # host -> connections still proving who they are
        self.new_connections = throttle.NewConnections(config.new_connections_per_address)
        self.by_device = {}         # device_id -> connections it holds
        self.busy_partials = set()  # puts in progress, by partial file name
        # Connections make_room may hang up -> since when: sessions waiting for
        # their next request, and connections that have proved nothing yet.
        self.idle_sessions = {}
        self.transfers = set()      # sessions answering a request (Session.began, .moved)
        database = db.open_database(config.db_path)
        self.device_key, _ = device_secrets.prepare(config, database)
        database.close()
        self.cluster_id = read_secret(config.cluster_id_path)
        self.context = tls.server_context(config) if config.tls else None
        try:
            family, address = rc_config.listen_address(config.tcp_host, config.files_port)
            # On "::" IPv4 too, as rc-server (create_server would make it IPv6 only).
            self.listener = socket.create_server(
                address, family=family, reuse_port=False, backlog=128,
                dualstack_ipv6=family == socket.AF_INET6 and socket.has_dualstack_ipv6())
        except OSError as e:        # an address this machine has not, a port taken
            log.error("cannot_listen", host=config.tcp_host, port=config.files_port,
                      error=str(e))
            sys.exit(1)
        self.listener.settimeout(ACCEPT_POLL)

    @property
    def port(self):
        return self.listener.getsockname()[1]

    def serve(self, should_stop):
        self.log.info("files_started", host=self.config.tcp_host, port=self.port,
                      tls=bool(self.context))
        while not should_stop():
            self.tell_held_back()
            try:
                sock, address = self.listener.accept()
                address = throttle.as_accepted(address)
            except socket.timeout:
                continue
            except OSError as e:        # out of descriptors, say: wait, go on
                self.log_limited("error", "accept_failed", "accept", error=str(e))
                time.sleep(ACCEPT_POLL)
                continue
            # Each costs a thread, a timer and a TLS handshake (~2.5 ms of
            # CPU): past new_connections_per_address, closed before all that.
            if self.new_connections.admit(address[0], self.log_limited) is None:
                sock.close()
                continue
            if not self.slots.acquire(blocking=False) and not self.make_room():
                self.log_limited("warning", "too_many_connections", address[0],
                                 address=address[0])
                sock.close()
                continue
            threading.Thread(target=self.handle, args=(sock, address), daemon=True).start()
        self.listener.close()

    def handle(self, sock, address):
        connection, session, admitted, unproven = None, None, False, None
        # However slowly a stranger sends, the handshake ends at auth_timeout.
        # (wrap_socket moves the descriptor to a new object: the timer asks for the current one)
        deadline = threading.Timer(self.config.auth_timeout, self.cut_unproven,
                                   (lambda: sock, lambda: session))
        deadline.start()
        try:
            admitted = self.may_authenticate(address[0])
            if not admitted:
                self.log_limited("warning", "too_many_authenticating", address[0],
                                 address=address[0])
                return
            unproven = Unproven(lambda: sock, address[0])
            self.idle(unproven, True)
            sock.settimeout(self.config.auth_timeout)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_side=True)
            connection = db.connect(self.config.db_path)
            session = Session(self, sock, address, connection)
            session.unproven = unproven
            session.run()
        except (OSError, ssl.SSLError, EOFError) as e:
            self.log.debug("files_connection_lost", address=address[0], error=str(e)[:200])
        except Exception as e:       # contained to this connection
            self.log_limited("error", "files_connection_failed", address[0],
                             address=address[0], error=repr(e)[:500])
        finally:
            deadline.cancel()
            if admitted:
                self.idle(unproven, False)
                self.leave(address[0], session)
            if connection is not None:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                connection.close()
            try:
                sock.close()
            except OSError:
                pass
            self.slots.release()

    def tell_held_back(self):
        """Now and then, the count of lines held back by log_limited, so an
        attack that stops still leaves its size in the log."""
        now = time.monotonic()
        if now < self.next_held_back:
            return
        self.next_held_back = now + throttle.HELD_BACK_INTERVAL
        with self.log_limited.lock:
            held = self.log_limited.throttle.held_back()
        for (event, key), count in held:
            self.log.warning("lines_suppressed", suppressed_event=event, key=key, count=count)

    def make_room(self):
        """At MAX_CONNECTIONS, the connection idle the longest (a session
        between requests, or one that has proved nothing yet) is hung up and
        its slot goes to the new connection: connections held idle (100
        device ids one join token may make, 16 each; strangers on 16
        addresses, 8 each, again at each auth_timeout) never lock workers
        out of their transfers. With none idle, the slowest transfer below
        MIN_TRANSFER_RATE goes: a byte a second is never idle, and never
        cut by DATA_TIMEOUT. True when a slot was taken."""
        with self.lock:
            if self.idle_sessions:
                oldest = min(self.idle_sessions, key=self.idle_sessions.get)
                del self.idle_sessions[oldest]
            else:
                oldest = self.slowest_transfer()
                if oldest is None:
                    return False
                self.transfers.discard(oldest)
        self.log_limited("warning", "files_idle_connection_closed", oldest.host,
                         device_id=oldest.device_id, address=oldest.host,
                         reason="%d connections are open, the most rc-files serves"
                         % MAX_CONNECTIONS)
        oldest.hang_up()
        return self.slots.acquire(timeout=ACCEPT_POLL)

    def slowest_transfer(self):
        """The transfer (past SLOW_GRACE) furthest below MIN_TRANSFER_RATE, or None."""
        now = time.monotonic()
        slow = [(session.moved / (now - session.began), session) for session in self.transfers
                if now - session.began >= SLOW_GRACE
                and session.moved < MIN_TRANSFER_RATE * (now - session.began)]
        return min(slow, key=lambda pair: pair[0])[1] if slow else None

    def transferring(self, session, busy):
        with self.lock:
            if busy:
                session.began, session.moved = time.monotonic(), 0
                self.transfers.add(session)
            else:
                self.transfers.discard(session)

    def idle(self, session, waiting):
        with self.lock:
            if waiting:
                self.idle_sessions[session] = time.monotonic()
            else:
                self.idle_sessions.pop(session, None)

    @staticmethod
    def cut_unproven(sock, session):
        if session() is None or not session().counted:
            try:
                sock().shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- caps: connections authenticating per address, held per device -----------------

    def may_authenticate(self, host):
        with self.lock:
            if self.authenticating.get(host, 0) >= self.config.max_unauthenticated_per_address:
                return False
            self.authenticating[host] = self.authenticating.get(host, 0) + 1
            return True

    def authenticated(self, host, device_id):
        """Counted against the device from now on; False when it holds too many."""
        with self.lock:
            self.forget_authenticating(host)
            if self.by_device.get(device_id, 0) >= MAX_PER_DEVICE:
                return False
            self.by_device[device_id] = self.by_device.get(device_id, 0) + 1
            return True

    def leave(self, host, session):
        with self.lock:
            if session is not None and session.counted:
                self.by_device[session.device_id] -= 1
                if not self.by_device[session.device_id]:
                    del self.by_device[session.device_id]
            elif session is None or session.device_id is None:
                self.forget_authenticating(host)

    def forget_authenticating(self, host):
        left = self.authenticating.get(host, 0) - 1
        if left > 0:
            self.authenticating[host] = left
        else:
            self.authenticating.pop(host, None)

    # -- wrong proofs: a few a minute per address and device --------------------------

    def shut_out(self, key):
        with self.lock:
            return self.wrong_proofs.shut_out(key)

    def failed(self, key):
        with self.lock:
            self.wrong_proofs.add(key)

    def claim_partial(self, name):
        with self.lock:
            if name in self.busy_partials:
                return False
            self.busy_partials.add(name)
            return True

    def release_partial(self, name):
        with self.lock:
            self.busy_partials.discard(name)


class Unproven:
    """A connection that has proved nothing yet, for make_room to hang up."""

    device_id = None

    def __init__(self, sock, host):
        self.sock, self.host = sock, host     # sock(): wrap_socket makes a new object

    def hang_up(self):
        try:
            self.sock().shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Session:
    """One connection: the handshake, then requests one at a time."""

    unproven = None       # its Unproven until it proves a device's secret

    def __init__(self, server, sock, address, connection):
        self.server, self.config, self.log = server, server.config, server.log
        self.sock, self.host, self.connection = sock, address[0], connection
        self.reader = sock.makefile("rb", buffering=CHUNK_BYTES)
        self.buffer = bytearray(CHUNK_BYTES)
        self.device_id = None
        self.counted = False      # counted against its device's MAX_PER_DEVICE
        self.began, self.moved = 0.0, 0   # the request being answered: since when, bytes moved

    def run(self):
        try:
            if not self.authenticate():
                return
            while self.serve_one():
                pass
        finally:
            self.reader.close()

    def serve_one(self):
        """Read and answer one request; False when the connection is done."""
        try:
            self.sock.settimeout(IDLE_TIMEOUT)
            self.server.idle(self, True)
            try:
                request = self.read_line()
            finally:
                self.server.idle(self, False)
            if request is None:
                return False
            self.sock.settimeout(DATA_TIMEOUT)
            self.server.transferring(self, True)
            try:
                return self.answer(request)
            finally:
                self.server.transferring(self, False)
        except Refusal as e:
            self.send({"error": {"code": e.code, "message": str(e)}})
            return not e.close

    def hang_up(self):
        """End the connection from another thread (make_room)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- framing ----------------------------------------------------------------------

    def send(self, message):
        self.sock.sendall(orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE))

    def read_line(self):
        """The next control message (a JSON object), or None at the end."""
        line = self.reader.readline(MAX_LINE_BYTES + 1)
        if not line:
            return None
        if not line.endswith(b"\n"):
            if len(line) > MAX_LINE_BYTES:
                raise Refusal("bad_request", "a control line is over %d bytes"
                              % MAX_LINE_BYTES, close=True)
            return None       # cut in the middle
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise Refusal("bad_request", "not a JSON line: %s" % str(e)[:200], close=True)
        if not isinstance(message, dict) or len(message) != 1 \
                or not isinstance(next(iter(message.values())), dict):
            raise Refusal("bad_request", "a request is one object like {\"get\": {...}}",
                          close=True)
        return message

    # -- the handshake -------------------------------------------------------------------

    def authenticate(self):
        nonce = protocol.new_nonce()
        self.send({"hello": {"nonce": nonce, "cluster_id": self.server.cluster_id,
                             "whole_put": WHOLE_PUT_BYTES}})
        try:
            message = self.read_line()
            if message is None:
                return False
            auth = message.get("auth")
            if auth is None:
                raise Refusal("bad_request", "the first message must be auth", close=True)
            self.check_proof(nonce, auth)
        except Refusal as e:
            self.send({"error": {"code": e.code, "message": str(e)}})
            return False
        self.server.idle(self.unproven, False)
        self.send({"ok": True})
        return True

    def check_proof(self, nonce, auth):
        device_id, worker_nonce = auth.get("device_id"), auth.get("nonce")
        if not isinstance(device_id, str) or not 0 < len(device_id) <= 64 \
                or not set(device_id) <= DEVICE_ID_CHARACTERS:
            raise Refusal("bad_request", "device_id must be 1-64 of [A-Za-z0-9._-]")
        if not isinstance(worker_nonce, str) or len(worker_nonce) != NONCE_HEX:
            raise Refusal("bad_request", "nonce must be %d hex digits" % NONCE_HEX)
        key = (self.host, device_id)
        if self.server.shut_out(key):
            raise Refusal("shut_out", "too many wrong proofs for %s from %s; wait a minute"
                          % (device_id, self.host))
        row = self.connection.execute(
            "SELECT sealed_secret, revoked, forgotten FROM devices WHERE device_id = ?",
            (device_id,)).fetchone()
        secret = row and not row["revoked"] and not row["forgotten"] and \
            device_secrets.unseal(self.server.device_key, device_id, row["sealed_secret"])
        if not secret:
            raise Refusal("unknown_device", "no usable secret for device %s here (not joined,"
                          " revoked or forgotten)" % device_id)
        expected = proof(secret, nonce, worker_nonce, device_id)
        given = auth.get("proof")
        if not isinstance(given, str) or not hmac.compare_digest(expected, given):
            self.server.failed(key)
            self.server.log_limited("warning", "files_auth_failed", self.host,
                                    address=self.host, device_id=device_id)
            raise Refusal("auth_failed", "wrong device secret")
        if not self.server.authenticated(self.host, device_id):
            self.device_id = device_id
            raise Refusal("too_many_connections", "%s holds %d connections to rc-files"
                          " already" % (device_id, MAX_PER_DEVICE))
        self.device_id, self.counted = device_id, True

    # -- requests ------------------------------------------------------------------------

    def answer(self, request):
        """Serve one request; False when the peer said bye."""
        (verb, arguments), = request.items()
        if verb in ("get", "put"):
            self.check_still_joined()
        if verb == "get":
            self.get(arguments)
        elif verb == "put":
            self.put(arguments)
        elif verb == "bye":
            return False
        else:
            raise Refusal("bad_request", "unknown request %r (get, put, bye)" % verb[:50],
                          close=True)
        return True

    def check_still_joined(self):
        """A Refusal, the connection closed, once the device was revoked or
        forgotten since it proved its secret: a revoked device kept the
        connection it had, and on it put a checkpoint that the next
        attempt of a task it had held, on any device, would start from.
        Asked before each request, and again as a put's rows are written
        (its bytes may have taken minutes to come)."""
        if not self.joined():
            raise Refusal("unknown_device", "device %s was revoked or forgotten since this"
                          " connection proved its secret" % self.device_id, close=True)

    def joined(self):
        row = self.connection.execute(
            "SELECT revoked, forgotten FROM devices WHERE device_id = ?",
            (self.device_id,)).fetchone()
        return row is not None and not row["revoked"] and not row["forgotten"]

    def get(self, arguments):
        sha256, offset = arguments.get("sha256"), arguments.get("offset", 0)
        if not files.is_sha256(sha256):
            raise Refusal("bad_request", "sha256 must be 64 lower-case hex digits, not %r"
                          % (str(sha256)[:80],))
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise Refusal("bad_request", "offset must be a whole number >= 0, not %r"
                          % (offset,))
        readers = files.tasks_reading(self.connection, self.device_id, sha256)
        if not readers:
            raise Refusal("not_yours", "no task of %s reads %s" % (self.device_id, sha256))
        try:
            blob, size = files.open_blob(self.connection, self.config, sha256)
        except files.FileStoreError as e:
            raise Refusal(e.code, str(e))
        with blob:
            if offset > size:
                raise Refusal("bad_request", "offset %d is past the end (%d bytes)"
                              % (offset, size))
            header = {"ok": True, "size": size, "length": size - offset}
            if size - offset <= CHUNK_BYTES:      # a small file: one write, header and bytes
                blob.seek(offset)
                body = blob.read(size - offset)
                if len(body) != size - offset:
                    raise EOFError("blob ended %d bytes early" % (size - offset - len(body)))
                self.sock.sendall(orjson.dumps(header, option=orjson.OPT_APPEND_NEWLINE) + body)
                self.moved += len(body)
            else:
                self.send(header)
                self.send_bytes(blob, offset, size - offset)
        # Named by the tasks it is for, that `rc logs --task` finds it: the first
        # as task_id, as every line names one, and all of them when several.
        several = {"task_ids": readers} if len(readers) > 1 else {}
        self.server.log_limited("info", "file_sent", (self.device_id, sha256),
                                device_id=self.device_id, task_id=readers[0], sha256=sha256,
                                offset=offset, size=size, **several)

    def send_bytes(self, blob, offset, count):
        if not isinstance(self.sock, ssl.SSLSocket):
            while count > 0:      # the kernel copies; no buffer here. In pieces: progress
                n = self.sock.sendfile(blob, offset, min(count, SENDFILE_BYTES))
                if not n:
                    raise EOFError("blob ended %d bytes early" % count)
                offset, count, self.moved = offset + n, count - n, self.moved + n
            return
        blob.seek(offset)
        view = memoryview(self.buffer)
        while count > 0:
            n = blob.readinto(view[:min(count, CHUNK_BYTES)])
            if not n:
                raise EOFError("blob ended %d bytes early" % count)
            self.sock.sendall(view[:n])
            count -= n
            self.moved += n

    def put(self, arguments):
        """Store a file of a device's task. A "whole" put (at most
        WHOLE_PUT_BYTES) sends all its bytes right after the request, with
        no "have" answer between: a small output costs one round trip. Its
        bytes are read even when it is refused, so the connection stays in step."""
        whole = arguments.get("whole") is True
        try:
            task_id, attempt, name, size, sha256 = self.put_fields(arguments)
        except Refusal as e:
            e.close = e.close or whole
            raise
        if whole and size > WHOLE_PUT_BYTES:
            raise Refusal("bad_request", "a whole put is at most %d bytes, not %d"
                          % (WHOLE_PUT_BYTES, size), close=True)
        try:
            stored, room = self.admit(task_id, attempt, name, size, sha256)
        except Refusal:
            if whole:
                self.skip(size)
            raise
        if stored is not None:
            # Held already (another task stored the same bytes): nothing to send.
            if whole:
                self.skip(size)
            else:
                self.send({"ok": True, "have": size})
        else:
            self.receive(task_id, attempt, name, size, sha256, room, whole)
        kind = self.record(task_id, attempt, name, size, sha256, received=stored is None)
        self.send({"ok": True, "stored": True})     # then the log line: the worker waits
        self.server.log_limited("info", "file_stored", (self.device_id, sha256),
                                device_id=self.device_id, task_id=task_id, attempt=attempt,
                                name=name, kind=kind, size=size, sha256=sha256)

    def admit(self, task_id, attempt, name, size, sha256):
        """(the size of the blob, None) if the store holds it, else (None,
        the room left) once it fits; a Refusal if the device may not store
        it now."""
        if not files.may_store(self.connection, self.device_id, task_id, attempt, name):
            raise Refusal("stale_attempt", "%s does not hold task %s attempt %s now"
                          % (self.device_id, task_id, attempt))
        if not files.asked_for(self.connection, task_id, name):
            raise Refusal("bad_name", "output name %r matches none of task %d's --output"
                          " globs" % (name[:200], task_id))
        if files.outputs_full(self.connection, task_id, attempt, name):
            raise Refusal("too_many_outputs", "task %d attempt %d has %d outputs stored, the"
                          " most one attempt may" % (task_id, attempt, files.FILES_MAX_OUTPUTS))
        stored = files.stored_size(self.connection, sha256)
        # Held, but not the device's to read: it sends the bytes, hashed on
        # arrival. "have" at once would let a device that knows a hash make
        # any blob its task's checkpoint and then fetch it (and learn sizes).
        if stored is not None and not files.device_may_read(self.connection, self.device_id,
                                                             sha256):
            stored = None
        if stored is not None:
            if stored != size:
                raise Refusal("bad_request", "%s is %d bytes, not %d" % (sha256, stored, size))
            return stored, None
        partial = files.put_partial_name(task_id, attempt, name, sha256)
        try:
            room = files.check_room(self.connection, self.config, size, partial=partial)
        except files.FileStoreError as e:
            raise Refusal(e.code, str(e))
        return None, room

    def skip(self, count):
        """Read and drop the `count` bytes of a refused whole put."""
        view = memoryview(self.buffer)
        while count > 0:
            n = self.reader.readinto(view[:min(count, CHUNK_BYTES)])
            if not n:
                raise EOFError("the upload was cut with %d bytes to go" % count)
            count -= n
            self.moved += n

    def put_fields(self, arguments):
        values = []
        for field in ("task_id", "attempt", "size"):
            value = arguments.get(field)
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value <= protocol.INT64_MAX:
                raise Refusal("bad_request", "%s must be a whole number >= 0, not %r"
                              % (field, str(value)[:80]))
            values.append(value)
        task_id, attempt, size = values
        name, sha256 = arguments.get("name"), arguments.get("sha256")
        if not files.is_sha256(sha256):
            raise Refusal("bad_request", "sha256 must be 64 lower-case hex digits, not %r"
                          % (str(sha256)[:80],))
        if name not in files.STREAM_NAMES and name != files.CHECKPOINT_NAME:
            problem = files.path_problem(name)
            if problem:
                raise Refusal("bad_name", "output name %r %s" % (str(name)[:200], problem))
        return task_id, attempt, name, size, sha256

    def receive(self, task_id, attempt, name, size, sha256, room, whole=False):
        partial = files.put_partial_name(task_id, attempt, name, sha256)
        if not self.server.claim_partial(partial):
            if whole:
                self.skip(size)
            raise Refusal("busy", "%s is being stored by another connection" % name)
        try:
            writer = files.Writer(self.config, partial, room)
            if writer.have > size or (whole and writer.have):
                writer.truncate()
            if not whole:
                self.send({"ok": True, "have": writer.have})
            try:
                self.read_into(writer, size - writer.have)
            except files.FileStoreError as e:     # the disk filled up under us
                writer.abort()
                raise Refusal(e.code, str(e), close=True)
            except BaseException:
                writer.file.close()      # kept: the next try resumes from here
                raise
            try:
                writer.place(sha256)      # its row comes with the task's (record())
            except files.FileStoreError as e:
                raise Refusal(e.code, str(e))
        finally:
            self.server.release_partial(partial)

    def read_into(self, writer, count):
        view = memoryview(self.buffer)
        while count > 0:
            n = self.reader.readinto(view[:min(count, CHUNK_BYTES)])
            if not n:
                raise EOFError("the upload was cut with %d bytes to go" % count)
            writer.write(view[:n])
            count -= n
            self.moved += n

    def record(self, task_id, attempt, name, size, sha256, received):
        """The rows of a put, in one transaction: the blob's, whether it was
        just received (kept even when the attempt turns out stale: the blob
        is in place, and the next sweep removes both) or held already, then
        the task's; the file's kind. A blob the sweep removed since admit()
        or since it was placed is refused as busy: the worker puts it again,
        and this time sends its bytes."""
        now = time.time()
        with db.write(self.connection):
            joined = self.joined()
            holds = joined and files.may_store(self.connection, self.device_id, task_id,
                                               attempt, name)
            # A blob new to the store whose attempt ended meanwhile is no
            # task's: the next sweep takes it, or it would hold the quota
            # for files_retention_days.
            fresh = received and not holds and not files.exists(self.connection, sha256)
            try:
                files.record_present(self.connection, self.config, sha256, size,
                                     0 if fresh else now)
            except files.FileStoreError as e:
                raise Refusal(e.code, str(e))
            if holds:
                kind = files.add_task_file(self.connection, task_id, attempt, name, sha256,
                                           size, now)
        if not joined:
            self.check_still_joined()
        if not holds:
            raise Refusal("stale_attempt", "%s no longer holds task %s attempt %s"
                          % (self.device_id, task_id, attempt))
        return kind


def run(config, log, should_stop):
    program.require_state(config, log)
    FilesServer(config, log).serve(should_stop)


def main():
    program.serve("rc-files", run)


if __name__ == "__main__":
    main()
