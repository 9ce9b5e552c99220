"""rc-server: the one process that holds the workers' connections.

A single `selectors` loop reads frames from every connection, applies what
they say to the database in one short transaction per turn of the loop (a
turn that brought one completed result: one statement), and only then
answers (acks go out after the commit, so an acknowledged result is never
lost; a lone result's ack rides with the next frame to that worker). It
learns about new assignments and cancellations from the database alone:
when rc-scheduler rings its own bell (it assigned), it reads the
assignments not sent yet, in one statement; when its doorbell rings (a
cancel, a revocation...), or once per poll_interval, it asks `PRAGMA
data_version` whether another program committed, and if so looks for
assigned tasks it has not pushed yet, and for the rest.

Nothing a peer sends ends the process: an error while serving one
connection closes that connection; a turn's transaction that fails is
applied again message by message, so only the message that fails is
refused; and a turn that still raises is logged and the loop goes on.
Log lines about bad peers are rate-limited, as are the audit lines of
refused connections (rc.throttle).
"""
import collections
import fcntl
import hashlib
import os
import selectors
import signal
import socket
import ssl
import struct
import sys
import termios
import threading
import time

from rc import config as config_module
from rc import audit, bell, db, device_logs, device_secrets, devices, files, fleet, protocol
from rc import tasks
from rc import program, tails, throttle, tls
from rc.log import Logger
from rc.protocol import ProtocolError, field
from rc.state_dir import keep_files_private, read_secret
from rc.states import (ASSIGNED, CANCELLED, COMPLETED, CONTROL, CONTROL_ACK, DEVICE_LOG, ERROR,
                       FAILED, HEARTBEAT, WATCH,
                       HEARTBEAT_ACK, HELLO, LEASE_CHECK, LEASE_CHECK_ACK, MAIN_STOPPING,
                       OUTCOME_CANCELLED,
                       OUTCOME_HANDED_BACK, OUTCOME_NOT_ALLOWED, PING, PONG,
                       OUTCOMES, PRIORITY_NAMES, PROTOCOL_VERSION, REGISTER, REGISTER_ACK,
                       RUNNING, TASK_ACCEPT, TASK_ASSIGN, TASK_CANCEL, TASK_PROGRESS,
                       TASK_RESULT, TASK_RESULT_ACK, TIMED_OUT, MAX_FRAME_BYTES,
                       TASK_OUTPUT, TASK_WATCH, TAIL_BYTES)
from rc.states import INLINE_FILE_BYTES, INLINE_TOTAL_BYTES

READ_SIZE = 64 * 1024     # more would be mmap-ed and unmapped by malloc on every read
BACKPRESSURE_BYTES = 1024 * 1024      # stop reading from a peer this far behind on ours
MAX_OUTBOX_BYTES = 16 * 1024 * 1024   # a reader this far behind is dropped
SWEEP_INTERVAL = 1.0                  # seconds between looks for stalled connections
PROGRESS_WRITE_GAP = 0.25             # seconds between two writes of a task's progress
# Seconds a peer that ended its sending (a half-close) has to take the
# answers owed it before it is closed anyway.
HALF_CLOSED_GRACE = 30.0
# Seconds a peer may take no byte of the answers waiting for it (its socket
# buffers full) before it is closed: a worker reads what it is sent at once;
# one that stops reading (a half-close it then ignores, or a peer that only
# sends) would hold its connection and up to MAX_OUTBOX_BYTES of ours, and,
# once BACKPRESSURE_BYTES behind, is no longer read, so not even its
# half-close would be seen. Its work is sent again when it reconnects.
STALLED_READER_SECONDS = 10.0
# Bytes of the outbox handed to one send: over TLS a send returns nothing
# until all it was given is written, so a slow reader's progress would not
# show for a whole 16 MiB outbox (it shows per slice: ~2.6 s at 100 KB/s).
WRITE_SLICE = 256 * 1024
# Seconds a lone task_result_ack may wait to ride with the next frame to its
# device (the worker keeps the result until the ack comes, and waits for
# nothing else): a worker given one task after another then wakes once per
# task, not twice, and rc-server sends once.
RESULT_ACK_DELAY = 0.05
SHUT_OUT_SECONDS = 60.0               # how long an address with too many wrong proofs waits
# Seconds between reads of every active attempt: for those taken back from
# their device, and for work a reconnected device missed. Each change reads
# only the attempts waiting to be sent or asked to stop: reading all of them
# cost ~40 ms a change with 10,000 running.
FULL_SCAN_INTERVAL = 1.0
# Devices `rc revoke` or `rc forget` shut out, not yet hung up on; looked
# for at every turn, so through the devices_revoked index.
SHUT_OUT_BUT_CONNECTED = "revoked = 1 AND connected = 1"
# The columns push_tasks() needs.
PUSH_COLUMNS = ("task_id, attempt, device_id, state, task_type, payload, timeout, priority,"
                " cancel_requested")
# Assignments not sent yet and cancellations asked for, among the active attempts.
PUSHABLE_SQL = ("SELECT %s FROM tasks WHERE %s AND (state = ? OR cancel_requested = 1)"
                % (PUSH_COLUMNS, db.ACTIVE_SQL))
LOG_LINES_PER_MINUTE = 6      # lines per event and address about peers' errors; the rest counted
# device_connected audit lines per device and address a minute (bursts of as
# many); the rest are counted. A worker connects again after a lost link,
# with backoff; a compromised device reconnecting 300 times a second rotated
# the whole audit log (6 x audit_log_max_bytes) away in half an hour.
CONNECTED_LINES_PER_MINUTE = 10
# Seconds a worker takes at most to authenticate (a phone over TLS on poor
# Wi-Fi: under a second): at max_unauthenticated, a connection still at it
# after this long makes way first (Server.make_way).
AUTH_QUICK = 2.0
DEVICE_ID_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
RESULT_STATES = {"completed": COMPLETED, "failed": FAILED, "timed_out": TIMED_OUT,
                 "cancelled": CANCELLED}
# Small files ride task_assign only while the peer's outbox is under this:
# a device handed many tasks at once fetches the rest from rc-files, and
# the outbox stays far below MAX_OUTBOX_BYTES.
INLINE_OUTBOX_BYTES = 2 * 1024 * 1024
KNOWN_BLOBS_MAX = 4096        # sha256s remembered per connection as held by the device
# Bytes a connection may send in one frame before it has registered, past
# max_profile_bytes: room for a register's active_tasks and fenced_tasks
# (~1,600 of them; a worker holds a few hundred at most). With the full
# MAX_FRAME_BYTES, strangers holding max_unauthenticated connections, each
# in the middle of a frame, made rc-server hold a gigabyte.
REGISTER_LISTS_BYTES = 64 * 1024
OUTPUT_STORE_THREADS = 4      # threads syncing task_results' small files at once (fsyncs)
SYNC_BATCH = 64               # task_results one of them syncs at once, at most
# A peer with this many task_results waiting for OutputStore is not read
# from until fewer wait: what waits is bounded, its files included.
MAX_STORING_PER_PEER = 16
# Past this many bytes waiting for OutputStore from all devices together, a
# device with one result waiting is not read from until it is stored: what
# waits stays under this plus one result's files per connection.
MAX_STORING_BYTES = 64 * 1024 * 1024
# Seconds a stopping rc-server spends sending what it owes the workers it
# told to hold their tasks (their main_stopping at the end) before it hangs up.
STOP_DRAIN_SECONDS = 2.0


class OverRate(Exception):
    """A connection sent more than max_message_rate allows (Server.named_tasks)."""


class Peer:
    """One worker connection and what the server knows about it."""

    def __init__(self, sock, address):
        self.sock = sock
        self.address = "%s:%s" % address[:2]
        self.host = str(address[0])
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.device_id = None          # set once the worker has proved the token
        self.nonce = protocol.new_nonce()
        self.opened_at = time.monotonic()
        self.handshaking = False       # TLS handshake still going on
        self.partial_since = None      # when the unfinished frame in inbox began
        self.messages = None           # throttle.TokenBucket of what it may send, from its first
        self.received = None           # ... and of the bytes we may read from it
        self.paused_until = None       # over max_receive_mb: nothing read from it until then
        self.pushed = set()            # (task_id, attempt) sent as task_assign
        self.cancels_sent = set()
        self.closed = False
        # Liveness (see Server.check_liveness); times on time.monotonic().
        self.heard_at = self.opened_at   # when the last frame came
        self.pinged_at = None            # a ping not answered yet
        self.pushed_at = None            # the first task_assign sent since heard_at
        self.answers_pings = False       # a worker older than ping never answers one
        self.suspect = None              # None: whether the device is, not known yet
        # Small files (docs/protocol.md): whether the worker takes inputs in
        # task_assign, and the sha256s its cache holds as far as we know (its
        # heartbeat's cached_files, and what we sent it inline).
        self.inline_files = False
        self.known_blobs = set()
        # (task_id, attempt) of its task_results whose files OutputStore
        # writes: still the worker's as far as its heartbeats go meanwhile.
        self.storing = set()
        self.raw_wanted = None           # (envelope, bytes) of a frame whose raw bytes are due
        self.raw = None                  # those bytes, while its handler runs
        self.input_ended = None          # when it ended its sending (time.monotonic())
        self.taken_at = None             # when it last took a byte of its outbox, or
                                         # the outbox, empty till then, was filled
        self.kernel_queued = None        # bytes its socket held for it at the last look
        # A graceful stop (Server.hold_devices): whether its worker can hold its
        # tasks through one (register's restart_hold), and whether the device
        # was held by the last stop, until its first heartbeat on this connection.
        self.restart_hold = False
        self.held = False


def kernel_queued(sock):
    """Bytes the socket holds for its peer, sent or not, not acknowledged
    yet (SIOCOUTQ); None where the system cannot say."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                              b"\0\0\0\0"))[0]
    except (OSError, AttributeError, ValueError):
        return None


class Server:
    def __init__(self, config, log):
        self.config = config
        self.log = log
        self.join_token = JoinToken(config.token_path)
        self.cluster_id = read_secret(config.cluster_id_path)
        self.database = db.open_database(config.db_path)
        # Device secrets are stored sealed with this key (issue 17); any an
        # older version left in clear are sealed now.
        self.device_key, sealed = device_secrets.prepare(config, self.database)
        if sealed:
            log.info("device_secrets_sealed", devices=sealed)
        self.selector = selectors.DefaultSelector()
        self.peers_by_device = {}
        self.peers = set()
        # Peers not authenticated yet, oldest first (a dict keeps its order):
        # checked for auth_timeout apart from the many others.
        self.unauthenticated = {}
        self.partial = set()           # peers in the middle of a frame
        self.ending = set()            # peers that ended their sending, owed answers still
        self.owing = set()             # peers with answers their socket did not take yet
        self.paused = set()            # peers read no more until their paused_until
        self.next_sweep = 0.0
        # (address, None) for the join token, (address, device id) for a
        # device's own secret -> monotonic times of recent wrong proofs
        self.wrong_proofs = throttle.WrongProofs(config.auth_failures_per_minute,
                                                 SHUT_OUT_SECONDS)
        self.unauthenticated_by_host = collections.Counter()
        self.new_connections = throttle.NewConnections(config.new_connections_per_address)
        self.heartbeat_written = {}    # device id -> monotonic time its last heartbeat was
        self.history_written = {}      # device id -> ... its last row of heartbeat history
        self.tasks_named = {}          # device id -> throttle.TokenBucket (named_tasks)
        self.refusal_lines = throttle.Throttle(config.audit_refusals_per_minute)
        self.connected_lines = throttle.Throttle(CONNECTED_LINES_PER_MINUTE)
        self.log_limited = throttle.LimitedLog(log, LOG_LINES_PER_MINUTE)
        self.next_held_back = 0.0
        # Controls from before this start are history, not news.
        self.last_control = self.database.execute(
            "SELECT coalesce(max(control_id), 0) FROM controls").fetchone()[0]
        self.tls = tls.server_context(config) if config.tls else None
        self.batch = []                # (handler, peer, data) applied in one transaction
        self.notes = []                # log lines of that transaction (see note)
        self.unsent = set()            # peers with frames queued by send(later=True)
        self.acks_due = {}             # peer -> when its send(soon=True) frames must go, in order
        self.seen_version = None
        self.rung = True               # the doorbell rang since push_changes last looked
        self.assigned = False          # the scheduler's bell rang since (see push_changes)
        self.looked_at = 0.0           # monotonic time push_changes last asked data_version
        self.last_scan = 0.0
        self.stopping = False
        self.log_allowance = device_logs.Allowance(config.device_log_rate)
        self.watches_told = {}         # device id -> (peer, watched until) sent as watch
        self.task_watches_told = {}    # (task id, attempt) -> (peer, until, state) told
        # task_output and task_progress frames that came sooner than a worker sends them
        self.held_tails = throttle.Spaced(tails.WRITE_GAP, tails.merged)
        self.held_progress = throttle.Spaced(PROGRESS_WRITE_GAP)
        self.outputs = OutputStore(config)
        self.stored_bytes = 0          # OutputStore's bytes whose rows this turn commits
        self.released = False          # a taken-back task's next attempt may go: ring rc-scheduler

    # -- the loop ---------------------------------------------------------------

    def listen(self):
        # The family tcp_host is of: an AF_INET socket died at each start
        # on "::" (gaierror: Address family for hostname not supported).
        family, address = config_module.listen_address(self.config.tcp_host,
                                                       self.config.tcp_port)
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(1024)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.listener = listener
        self.doorbell = bell.Bell(self.config.run_dir, bell.SERVER)
        self.selector.register(self.doorbell, selectors.EVENT_READ, self.doorbell)
        self.assigned_bell = bell.Bell(self.config.run_dir, bell.SERVER_ASSIGNED)
        self.selector.register(self.assigned_bell, selectors.EVENT_READ, self.assigned_bell)
        self.selector.register(self.outputs.done_reader, selectors.EVENT_READ, self.outputs)
        return listener.getsockname()[1]

    def run(self):
        try:
            port = self.listen()
        except OSError as e:        # an address this machine has not, a port taken
            self.log.error("cannot_listen", host=self.config.tcp_host,
                           port=self.config.tcp_port, error=str(e))
            sys.exit(1)
        with db.write(self.database):
            devices.disconnect_all(self.database, time.time())
        self.log.info("server_started", host=self.config.tcp_host, port=port,
                      protocol=PROTOCOL_VERSION)
        while not self.stopping:
            try:
                self.turn(self.wait_time())
            except Exception as e:     # the last line of defence: never a dead server
                self.rollback()
                self.log_limited("error", "turn_failed", "turn", error=repr(e)[:500])
        self.log.info("server_stopping", connections=len(self.peers))
        # Refused from now on, not left waiting for a hello: a worker told
        # to come back tries again a second later, at the next rc-server.
        self.selector.unregister(self.listener)
        self.listener.close()
        held = self.hold_devices()
        for peer in list(self.acks_due):
            self.flush(peer)
        self.drain(held, STOP_DRAIN_SECONDS)
        for peer in list(self.peers):
            self.close(peer, "server stopping", record=False)
        self.doorbell.close()
        self.assigned_bell.close()

    def hold_devices(self):
        """A graceful stop (SIGTERM: make stop, supervisorctl stop or restart):
        each connected device whose worker can hold its tasks (it said so at
        register; one suspect may not be reading) is promised restart_hold
        seconds, in the database first (rc-reaper leaves it alone until then
        plus disconnect_grace), then told: its worker keeps its tasks running
        for that long, from when it reads this, instead of disconnect_fence,
        and reconnects each second. Should the write fail, nobody is told
        and the usual rules stand. The peers told."""
        hold = self.config.restart_hold
        peers = [peer for peer in self.peers_by_device.values()
                 if peer.restart_hold and not peer.suspect and not peer.closed]
        if not hold or not peers:
            return []
        now = time.time()
        try:
            with db.write(self.database):
                held = set(devices.hold(self.database, [peer.device_id for peer in peers],
                                        now + hold, now))
        except Exception as e:
            self.rollback()
            self.log.error("hold_failed", devices=len(peers), error=repr(e)[:500])
            return []
        # One revoked, forgotten or found suspect since the last look is not.
        peers = [peer for peer in peers if peer.device_id in held]
        for peer in peers:
            self.send(peer, MAIN_STOPPING, {"hold": hold})
        self.log.info("devices_held", devices=len(peers), hold=hold)
        return peers

    def drain(self, peers, seconds):
        """Send what the peers' outboxes hold, for up to `seconds`: the
        stopping notice must not be left behind in a full outbox."""
        deadline = time.monotonic() + seconds
        with selectors.DefaultSelector() as selector:
            for peer in peers:
                if peer.outbox and not peer.closed:
                    selector.register(peer.sock, selectors.EVENT_WRITE, peer)
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                    self.flush(key.data)
                    if key.data.closed or not key.data.outbox:
                        selector.unregister(key.fileobj)

    def turn(self, timeout):
        for key, events in self.selector.select(timeout):
            if key.data is None:
                self.accept_connections()
                continue
            if key.data is self.doorbell:
                self.doorbell.drain()      # push_changes below looks at the database
                self.rung = True
                continue
            if key.data is self.assigned_bell:
                self.assigned_bell.drain()
                self.assigned = True
                continue
            if key.data is self.outputs:
                self.take_stored_outputs()
                continue
            try:
                self.serve(key.data, events)
            except Exception as e:         # that peer's fault, or ours: it alone pays
                self.contain(key.data, "serve", e)
        if self.paused:
            self.resume_paused()
        self.apply_batch()
        self.push_changes()
        self.send_queued()
        self.close_ended()
        self.sweep()
        self.tell_held_back()

    def wait_time(self):
        """Seconds the loop may sleep: until push_changes looks again (see
        there), or a delayed ack is due (the first one is due first)."""
        due = self.looked_at + self.config.poll_interval
        if self.acks_due:
            due = min(due, next(iter(self.acks_due.values())))
        if self.paused:
            due = min(due, min(peer.paused_until for peer in self.paused))
        return max(0.0, due - time.monotonic())

    def serve(self, peer, events):
        if peer.closed:
            return
        if peer.handshaking:
            self.handshake(peer)
            return
        if events & selectors.EVENT_READ:
            self.read(peer)
        if events & selectors.EVENT_WRITE and not peer.closed:
            self.flush(peer)

    def contain(self, peer, step, error):
        """An unexpected error while serving one connection: log it (rate-
        limited) and close that connection, whatever state it is in."""
        self.log_limited("error", "connection_failed", peer.host, step=step,
                         address=peer.address, device_id=peer.device_id, error=repr(error)[:500])
        try:
            self.close(peer, "%s failed" % step)
        except Exception as e:
            self.log_limited("error", "close_failed", peer.host, error=repr(e)[:500])

    def tell_held_back(self):
        """Now and then, the count of lines held back by the rate limits, so
        an attack that stops still leaves its size in the logs."""
        now = time.monotonic()
        if now < self.next_held_back:
            return
        self.next_held_back = now + throttle.HELD_BACK_INTERVAL
        for (event, key), count in self.log_limited.throttle.held_back():
            self.log.warning("lines_suppressed", suppressed_event=event, key=key, count=count)
        for (host, code), count in self.refusal_lines.held_back():
            self.audit_line("connection_refusals_held_back", "unknown", host, code=code,
                            count=count)
        for (device_id, host), count in self.connected_lines.held_back():
            self.audit_line("device_connections_held_back", device_id, host, count=count)

    def rollback(self):
        if self.database.in_transaction:
            try:
                self.database.execute("ROLLBACK")
            except Exception as e:
                self.log_limited("error", "rollback_failed", "database", error=repr(e)[:500])

    def stop(self, *_):
        self.stopping = True     # the loop notices; nothing else happens in a handler

    # -- connections -------------------------------------------------------------

    def accept_connections(self):
        while True:
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:    # out of descriptors: keep serving those we have
                self.log_limited("error", "accept_failed", "listener", error=str(e))
                return
            address = throttle.as_accepted(address)
            try:
                self.take(sock, address)
            except Exception as e:
                # A port scanner resets before (or while) TLS wraps the socket.
                self.log_limited("warning", "connection_failed", str(address[0]), step="accept",
                                 address="%s:%s" % address[:2], error=repr(e)[:500])
                sock.close()

    def take(self, sock, address):
        """A new connection: closed at once past its address's
        new_connections_per_address (before any TLS work: a stranger's
        handshakes, as fast as it could make them, took a third of the
        loop), else TLS wrapping, then the handshake or hello."""
        key = self.new_connections.admit(address[0], self.log_limited)
        if key is None:
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        peer = Peer(sock, address)
        self.peers.add(peer)
        self.add_unauthenticated(peer)
        try:
            self.selector.register(sock, selectors.EVENT_READ, peer)
            too_many = self.too_many_authenticating(peer)
            if self.tls and too_many:
                self.new_connections.give_back(key)     # it cost no handshake
                self.close(peer, too_many)      # no TLS yet to say so
            elif self.tls:
                peer.handshaking = True
                self.handshake(peer)
            else:
                self.greet(peer)
        except Exception as e:
            self.contain(peer, "accept", e)

    def add_unauthenticated(self, peer):
        self.unauthenticated[peer] = None
        self.unauthenticated_by_host[peer.host] += 1

    def leave_unauthenticated(self, peer):
        if peer in self.unauthenticated:
            del self.unauthenticated[peer]
            self.unauthenticated_by_host[peer.host] -= 1
            if self.unauthenticated_by_host[peer.host] <= 0:
                del self.unauthenticated_by_host[peer.host]

    def make_way(self, newcomer):
        """At max_unauthenticated, a connection still authenticating makes
        way for the newcomer: the oldest, once it has taken longer than a
        worker needs (AUTH_QUICK), else the oldest of the address holding
        the most. Refusing newcomers let strangers on 126 addresses, 8
        connections each opened again at every auth_timeout, lock out every
        worker that reconnected; the busiest address alone made a fleet
        behind one NAT, back at once after a restart, close its own
        connections mid handshake while strangers on many kept theirs."""
        oldest = next(iter(self.unauthenticated))     # a dict keeps its order
        if time.monotonic() - oldest.opened_at < AUTH_QUICK:
            counts = self.unauthenticated_by_host
            host = max(counts, key=counts.get)
            oldest = next((peer for peer in self.unauthenticated
                           if peer.host == host and peer is not newcomer), None)
        if oldest is None or oldest is newcomer:
            return
        host = oldest.host
        why = "%d connections are authenticating (max_unauthenticated)" \
            % len(self.unauthenticated)
        if oldest.handshaking:      # no TLS yet to say so
            self.log_limited("warning", "authenticating_connection_closed", host,
                             address=oldest.address, reason=why)
            self.close(oldest, why)
        else:
            self.refuse(oldest, "too_many_connections", why + "; try again later")

    def too_many_authenticating(self, peer):
        """Why this connection must wait (None: it need not): too many still
        authenticating from its address, or in all once none made way."""
        if self.unauthenticated_by_host[peer.host] > self.config.max_unauthenticated_per_address:
            return "too many connections from %s are authenticating" % peer.host
        if len(self.unauthenticated) > self.config.max_unauthenticated:
            self.make_way(peer)
        if len(self.unauthenticated) > self.config.max_unauthenticated:
            return "too many connections are authenticating"
        return None

    def handshake(self, peer):
        """One step of a TLS handshake, without blocking the others."""
        try:
            peer.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.selector.modify(peer.sock, selectors.EVENT_READ, peer)
            return
        except ssl.SSLWantWriteError:
            self.selector.modify(peer.sock, selectors.EVENT_WRITE, peer)
            return
        except (ssl.SSLError, OSError) as e:
            self.close(peer, "tls handshake failed: %s" % e)
            return
        peer.handshaking = False
        self.selector.modify(peer.sock, selectors.EVENT_READ, peer)
        self.greet(peer)

    def greet(self, peer):
        """hello, or why not. An address shut out for wrong proofs still
        gets its hello: a device that proves its own secret may come in."""
        too_many = self.too_many_authenticating(peer)
        if too_many:
            self.refuse(peer, "too_many_connections", too_many + "; try again later")
        else:
            self.send(peer, HELLO, {"nonce": peer.nonce, "protocol": PROTOCOL_VERSION,
                                    "cluster_id": self.cluster_id})

    def frame_limit(self, peer):
        """Bytes one frame of this peer may hold: MAX_FRAME_BYTES once it
        has registered; a register's worth before."""
        if peer.device_id is not None:
            return MAX_FRAME_BYTES
        return min(MAX_FRAME_BYTES, self.config.max_profile_bytes + REGISTER_LISTS_BYTES)

    def read(self, peer):
        ended = False                  # whether an end of line came this time
        limit = self.frame_limit(peer)
        before = len(peer.inbox)
        while True:
            try:
                chunk = peer.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                    ssl.SSLWantWriteError):
                break
            except OSError as e:
                self.close(peer, "read failed: %s" % e)
                return
            if not chunk:
                # It ended its sending (a half-close): what it sent before
                # is still served and answered, then the connection closes.
                self.end_input(peer)
                break
            peer.inbox += chunk
            ended = ended or b"\n" in chunk
            # TLS may hold decrypted bytes the selector cannot see: take them
            # too; and a frame not ended yet (a task_result with its small
            # files, 16 KiB a TLS record) is read on while it is there,
            # rather than one record a turn of the loop.
            if not (self.tls and peer.sock.pending()) and (
                    chunk.endswith(b"\n") or len(peer.inbox) > limit):
                break
        if self.config.max_receive_mb:
            self.charge_bytes(peer, len(peer.inbox) - before)
        if not peer.inbox:
            return
        if not ended and peer.raw_wanted is None and len(peer.inbox) <= limit:
            # Nothing to split: a frame sent a byte (or a TLS record) at a
            # time must not cost a scan of all it sent so far, each time.
            self.note_partial(peer)
            return
        self.take_frames(peer)
        if not peer.closed:
            self.note_partial(peer)

    def end_input(self, peer):
        peer.input_ended = time.monotonic()
        self.ending.add(peer)
        self.watch(peer)            # read no more: it would be readable for ever

    def close_ended(self):
        """Close the peers that ended their sending once the answers owed them
        are sent (their results' files stored, the replies written), or
        HALF_CLOSED_GRACE after it ended if they do not take them."""
        now = time.monotonic()
        for peer in list(self.ending):
            if not peer.outbox and not peer.storing:
                self.close(peer, "closed by peer")
            elif now - peer.input_ended > HALF_CLOSED_GRACE:
                self.close(peer, "closed by peer; %d bytes of answers not taken"
                           % len(peer.outbox))

    def take_frames(self, peer):
        """Serve the frames the inbox holds, in order; a task_result that
        announces raw bytes (its small files) waits until they are all in."""
        while not peer.closed:
            if peer.raw_wanted is not None:
                envelope, size = peer.raw_wanted
                if len(peer.inbox) < size:
                    return
                with memoryview(peer.inbox) as inbox:     # one copy, not a slice's and its bytes'
                    raw = inbox[:size].tobytes()
                del peer.inbox[:size]
                peer.raw_wanted = None
                self.frame_ended(peer)
                self.dispatch(peer, envelope, raw)
                continue
            try:
                # Up to one with raw bytes.
                lines = protocol.split_frames(peer.inbox, self.frame_limit(peer))
            except ProtocolError as e:
                self.refuse(peer, "frame_too_large", str(e))
                return
            if not lines:
                return
            if not self.within_rate(peer, len(lines)):
                self.refuse_over_rate(peer)
                return
            self.frame_ended(peer)
            for line in lines:
                if peer.closed:
                    return
                self.receive(peer, line)

    def frame_ended(self, peer):
        """A frame is whole: the one after it began no earlier than now. A
        device whose frames come back to back, each read ending inside the
        next (a busy Wi-Fi link, max_receive_mb's pauses), had its first
        unfinished frame's time kept for as long as that lasted, and was
        refused frame_timeout as a slow-loris after frame_deadline. A frame that
        trickles, or raw bytes that do, is still timed from its start."""
        if peer.partial_since is not None:
            peer.partial_since = time.monotonic()

    def note_partial(self, peer):
        """Remember when a frame started to trickle in (see sweep); a frame
        whose raw bytes are still due is one too, even with none of them in."""
        if not peer.inbox and peer.raw_wanted is None:
            peer.partial_since = None
            self.partial.discard(peer)
        elif peer.partial_since is None:
            peer.partial_since = time.monotonic()
            self.partial.add(peer)

    def charge_bytes(self, peer, count):
        """max_receive_mb of bytes a second, bursts of twice that. Past it nothing more is read from the peer until the
        bucket holds a byte again; what it sends meanwhile waits in its
        socket, and TCP slows it. A device sending as fast as it can (frames
        of any type, each answered or dropped) held rc-server's loop from
        every other device, a core of the main node busy."""
        now = time.monotonic()
        if peer.received is None:
            rate = self.config.max_receive_mb * 1048576.0
            peer.received = throttle.TokenBucket(rate, 2.0 * rate, now)
        left = peer.received.take(count, now)
        if left < 0:
            peer.paused_until = now - left / peer.received.rate
            self.paused.add(peer)
            self.watch(peer)

    def resume_paused(self):
        """Read again from the peers whose pause is over; what TLS holds
        decrypted already, the selector does not see, so it is read now."""
        now = time.monotonic()
        for peer in [p for p in self.paused if p.paused_until <= now]:
            self.paused.discard(peer)
            peer.paused_until = None
            if peer.closed:
                continue
            self.watch(peer)
            if self.tls and peer.sock.pending():
                try:
                    self.read(peer)
                except Exception as e:
                    self.contain(peer, "serve", e)

    def within_rate(self, peer, count):
        """Whether this connection may send `count` messages more now."""
        now = time.monotonic()
        if peer.messages is None:
            peer.messages = self.message_bucket(now)
        return peer.messages.take(count, now) >= 0

    def message_bucket(self, now):
        """max_message_rate a second, bursts of twice that."""
        rate = self.config.max_message_rate
        return throttle.TokenBucket(rate, 2.0 * rate, now)

    def refuse_over_rate(self, peer):
        self.refuse(peer, "rate_limited", "more than %d messages a second (a task named"
                    " in a register, heartbeat or lease_check counts as one)" % self.config.max_message_rate)

    def named_tasks(self, device_id, data, name="active_tasks"):
        """active_tasks(), each (task, attempt) named costing one message of
        max_message_rate, per device across its connections: rc-server
        writes or looks up each (a lease_check of 10,000 is 20,000 UPDATEs,
        ~0.1 s of its loop), so a device naming 10,000 in each frame held a
        core of the main node, and every other device's answers ~0.4 s late,
        for 350 KB a frame, well within max_receive_mb; reconnecting, it
        would start each connection with a full burst, and a register may
        name 20,000 (active and fenced). A worker names the few it holds."""
        keys = active_tasks(data, name)
        if keys:
            now = time.monotonic()
            bucket = self.tasks_named.get(device_id)
            if bucket is None:
                bucket = self.tasks_named[device_id] = self.message_bucket(now)
            if bucket.take(len(keys), now) < 0:
                raise OverRate()
        return keys

    def receive(self, peer, line):
        self.heard_from(peer)
        try:
            envelope = protocol.decode(line)
        except ProtocolError as e:
            if protocol.INLINE_MARK in line:
                # Raw bytes may follow, as many as it says: where the next frame
                # begins is not known, and a task's file read as frames would
                # speak for its device.
                self.refuse(peer, "bad_frame", str(e))
                return
            self.send_error(peer, "bad_frame", str(e))
            return
        data = envelope["data"]
        # Not before it registered: a stranger would have its raw bytes (up
        # to MAX_FRAME_BYTES, past frame_limit) held until auth_timeout.
        if envelope["message_type"] == TASK_RESULT and "inline_bytes" in data \
                and peer.device_id is not None:
            size = data["inline_bytes"]
            if isinstance(size, bool) or not isinstance(size, int) \
                    or not 0 <= size <= MAX_FRAME_BYTES:
                # Where the next frame begins is not known: nothing more can be read.
                # (0: empty outputs only, as a worker sends for `touch out.txt`.)
                self.refuse(peer, "bad_frame", "inline_bytes must be a whole number from 0"
                            " to %d, not %r" % (MAX_FRAME_BYTES, str(size)[:40]))
                return
            if protocol.INLINE_MARK not in line:
                # split_frames stops at that text, not at what JSON decodes
                # to ("inline\u005fbytes", "inline_bytes" :): the frames after
                # this one may have been split from its bytes.
                self.refuse(peer, "bad_frame", "a task_result with raw bytes must spell %s"
                            " as such" % protocol.INLINE_MARK.decode())
                return
            peer.raw_wanted = (envelope, size)
            return
        self.dispatch(peer, envelope)

    def dispatch(self, peer, envelope, raw=None):
        kind, data = envelope["message_type"], envelope["data"]
        if peer.device_id is None and kind != REGISTER:
            self.refuse(peer, "not_registered", "register first, then send %s" % kind)
            return
        handler = self.HANDLERS.get(kind)
        if handler is None:
            self.send_error(peer, "unknown_message", "unknown message type %r" % kind[:50])
            return
        peer.raw = raw
        try:
            handler(self, peer, data)
        except ProtocolError as e:
            self.send_error(peer, "bad_request", "%s: %s" % (kind, e))
        except OverRate:
            self.refuse_over_rate(peer)
        finally:
            peer.raw = None

    def send(self, peer, message_type, data, later=False, raw=None, soon=False):
        """Queue a frame and send it now, or with `later` at the end of the
        turn, together with the rest of the turn's frames to that peer, or
        with `soon` along with the next frame sent to that peer, and at the
        latest RESULT_ACK_DELAY from now; `raw` bytes go right behind it (its
        data says how many: "inline_bytes")."""
        if peer.closed:
            return
        if not peer.outbox:
            peer.taken_at = time.monotonic()
        peer.outbox += protocol.encode(message_type, data, target_id=peer.device_id)
        if raw:
            peer.outbox += raw
        if len(peer.outbox) > MAX_OUTBOX_BYTES:
            self.close(peer, "not reading its messages")
        elif soon:
            self.acks_due.setdefault(peer, time.monotonic() + RESULT_ACK_DELAY)
        elif later:
            self.unsent.add(peer)
        else:
            self.flush(peer)

    def send_queued(self):
        for peer in self.unsent:
            if not peer.closed:
                self.flush(peer)
        self.unsent.clear()
        now = time.monotonic()
        while self.acks_due:
            peer, due = next(iter(self.acks_due.items()))
            if due > now:
                break
            self.flush(peer)        # takes it off acks_due, whatever happens
            self.acks_due.pop(peer, None)

    def flush(self, peer):
        """Send what the peer's outbox holds; any error closes that peer alone
        (flush runs from many places: the loop, a handler, a broadcast)."""
        try:
            self.write_out(peer)
        except Exception as e:
            self.contain(peer, "flush", e)

    def write_out(self, peer):
        self.acks_due.pop(peer, None)   # what it waited for goes now (or when writable)
        outbox = peer.outbox
        try:
            # Never shorter than the last try's (TLS): the outbox only grows at its end.
            sent = peer.sock.send(outbox if len(outbox) <= WRITE_SLICE else outbox[:WRITE_SLICE])
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError):
            sent = 0
        except OSError as e:
            self.close(peer, "write failed: %s" % e)
            return
        del peer.outbox[:sent]
        if sent:
            peer.taken_at = time.monotonic()
        self.watch(peer)

    def watch(self, peer):
        """What the selector waits for on the peer's socket. A peer that does
        not read what we send gets nothing more read from it until it does:
        its messages would only make more replies; nor does one with as
        many results waiting for their files to be stored as storing_limit()."""
        reading = selectors.EVENT_READ if len(peer.outbox) < BACKPRESSURE_BYTES \
            and len(peer.storing) < self.storing_limit() and not peer.input_ended \
            and peer.paused_until is None else 0
        wanted = reading | (selectors.EVENT_WRITE if peer.outbox else 0)
        if peer.outbox:
            self.owing.add(peer)
        elif peer in self.owing:
            self.owing.discard(peer)
            peer.kernel_queued = None
        key = self.selector.get_map().get(peer.sock)
        if not wanted:          # nothing to wait for (a selector takes no empty set)
            if key is not None:
                self.selector.unregister(peer.sock)
        elif key is None:
            self.selector.register(peer.sock, wanted, peer)
        elif key.events != wanted:
            self.selector.modify(peer.sock, wanted, peer)

    def storing_limit(self):
        """Results of one device that may wait for OutputStore at once."""
        return MAX_STORING_PER_PEER if self.outputs.waiting_bytes < MAX_STORING_BYTES else 1

    def send_error(self, peer, code, message):
        self.log_limited("warning", "peer_error", (peer.host, code), address=peer.address,
                         device_id=peer.device_id, code=code, message=message)
        self.send(peer, ERROR, {"code": code, "message": message})

    def refuse(self, peer, code, message):
        """Tell the peer why, then hang up; a line in the audit log (a few a
        minute per address and code: the rest are counted in the next)."""
        self.send_error(peer, code, message)
        self.close(peer, code)
        held = self.refusal_lines.allow((peer.host, code))
        if held is not None:
            self.audit_refusal(peer.device_id or "unknown", peer.address, code, message, held)

    def audit_refusal(self, actor, source, code, message, suppressed):
        fields = {"suppressed": suppressed} if suppressed else {}
        self.audit_line("connection_refused", actor, source, code=code, message=message,
                        **fields)

    def audit_line(self, event, actor, source, **fields):
        try:
            audit.record(self.config, event, actor, source, **fields)
        except OSError as e:      # a full disk must not take the server down with it
            self.log_limited("error", "audit_failed", "audit", error=str(e))

    def close(self, peer, reason, record=True):
        if peer.closed:
            return
        peer.closed = True
        self.acks_due.pop(peer, None)
        self.ending.discard(peer)
        self.owing.discard(peer)
        self.paused.discard(peer)
        try:
            self.selector.unregister(peer.sock)
        except (KeyError, ValueError, OSError):
            pass         # never registered, or its descriptor is gone already
        try:
            peer.sock.close()
        except OSError:
            pass
        self.peers.discard(peer)
        self.leave_unauthenticated(peer)
        self.partial.discard(peer)
        if peer.device_id and self.peers_by_device.get(peer.device_id) is peer:
            del self.peers_by_device[peer.device_id]
            if record:
                self.batch.append((Server.apply_disconnect, peer, None))
            self.log.info("device_disconnected", device_id=peer.device_id, reason=reason)

    def sweep(self):
        """Drop connections that stall: not authenticated in time, or in the
        middle of a frame for too long (a slow-loris). Once a second: with
        thousands of peers, not on every turn."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + min(SWEEP_INTERVAL, self.config.auth_timeout / 4)
        deadline = now - self.config.auth_timeout
        for peer in [p for p in self.unauthenticated if p.opened_at < deadline]:
            self.refuse(peer, "auth_timeout", "no register within %gs" % self.config.auth_timeout)
        deadline = now - self.config.frame_deadline
        for peer in [p for p in self.partial if p.partial_since < deadline]:
            self.refuse(peer, "frame_timeout", "a frame took over %gs to arrive"
                        % self.config.frame_deadline)
        self.close_stalled_readers(now)
        self.check_liveness(now)
        self.tell_watches()
        self.tell_task_watches()
        self.write_tails(self.held_tails.due(now))
        self.write_progress(self.held_progress.due(now))

    def close_stalled_readers(self, now):
        deadline = now - STALLED_READER_SECONDS
        for peer in list(self.owing):
            # What its socket holds going down is a reader taking bytes, slowly:
            # our socket takes more only once a third of its buffer is free.
            queued = kernel_queued(peer.sock)
            if queued is not None and peer.kernel_queued is not None \
                    and queued < peer.kernel_queued:
                peer.taken_at = now
            peer.kernel_queued = queued
            if peer.taken_at < deadline:
                self.close(peer, "took no byte of its %d bytes of answers for %gs"
                           % (len(peer.outbox), STALLED_READER_SECONDS))

    # -- liveness: a device frozen with its connection open ------------------------
    # A worker stopped by SIGSTOP, a closed laptop lid or Android's freezer
    # keeps its connection open and would look online for offline_timeout,
    # taking assignments it never accepts. Any frame from it counts as an
    # answer; a quiet connection is pinged; one that answers neither a ping
    # nor a task_assign within suspect_after is suspect: the scheduler gives
    # it nothing, and what it has not accepted goes back to the queue at once,
    # uncharged. Its next frame ends that.

    def heard_from(self, peer):
        peer.heard_at = time.monotonic()
        peer.pinged_at = peer.pushed_at = None
        if peer.device_id is not None and peer.suspect is not False:
            # Suspect no more (or, on a new connection, not left so by the last one).
            peer.suspect = False
            self.batch.append((Server.apply_heard_again, peer, None))

    def expect_answer(self, peer):
        """A task_assign went out: the worker accepts it, or says something, soon."""
        if peer.pushed_at is None:
            peer.pushed_at = time.monotonic()

    def check_liveness(self, now):
        ping_interval, suspect_after = self.config.ping_interval, self.config.suspect_after
        for peer in list(self.peers_by_device.values()):
            if peer.suspect:
                continue
            due = [t for t in (peer.pushed_at, peer.pinged_at if peer.answers_pings else None)
                   if t is not None]
            if due and now - min(due) >= suspect_after:
                peer.suspect = True
                self.batch.append((Server.apply_suspect, peer, now - min(due)))
            elif peer.pinged_at is None and (
                    now - peer.heard_at >= ping_interval or (
                        peer.pushed_at is not None and now - peer.pushed_at >= suspect_after / 2)):
                # Asked after half the wait: a worker with nothing to say about
                # an assignment (no free slot yet) still answers in time.
                peer.pinged_at = now
                self.send(peer, PING, {})

    def apply_suspect(self, peer, silent_for, now):
        devices.mark_suspect(self.database, peer.device_id, now)
        rows = self.database.execute(
            "SELECT %s FROM tasks WHERE device_id = ? AND %s AND state = ?"
            % (tasks.LEASE_COLUMNS, db.ACTIVE_SQL), (peer.device_id, ASSIGNED)).fetchall()
        why = "%s answered nothing for %.1fs before accepting it" % (peer.device_id, silent_for)
        handed_back = 0
        for row in rows:
            if tasks.hand_back_unaccepted(self.database, row, why, now):
                handed_back += 1
                self.note("warning", "task_taken_back", task_id=row["task_id"],
                          attempt=row["attempt"], device_id=peer.device_id, state=ASSIGNED,
                          reason=why)
        self.note("warning", "device_suspect", device_id=peer.device_id,
                  silent_for=round(silent_for, 3), handed_back=handed_back)

    def apply_heard_again(self, peer, data, now):
        if devices.clear_suspect(self.database, peer.device_id):
            self.note("info", "device_answering", device_id=peer.device_id)

    def on_pong(self, peer, data):
        peer.answers_pings = True      # heard_from has done the rest

    def on_lease_check(self, peer, data):
        self.batch.append((Server.apply_lease_check, peer,
                           self.named_tasks(peer.device_id, data, "tasks")))

    def apply_lease_check(self, peer, asked, now):
        """Which attempts are still this device's: the worker asks after a
        freeze or a long silence, before it starts or goes on with any. The
        answer holds for a while: leases of those it runs are renewed, and
        those not accepted yet get accept_timeout from now to be."""
        tasks.renew_leases(self.database, peer.device_id, asked,
                           now + self.config.lease_duration)
        self.database.executemany(
            "UPDATE tasks SET lease_expires = max(lease_expires, ?) WHERE task_id = ?"
            " AND attempt = ? AND device_id = ? AND state = ?",
            [(now + self.config.accept_timeout, key[0], key[1], peer.device_id, ASSIGNED)
             for key in asked])
        held = {(row["task_id"], row["attempt"]) for row in self.database.execute(
            "SELECT task_id, attempt FROM tasks WHERE device_id = ? AND %s" % db.ACTIVE_SQL,
            (peer.device_id,))}
        self.note_limited("info", "lease_check", peer.device_id, device_id=peer.device_id,
                          asked=len(asked), given_away=len(asked - held))
        return [(LEASE_CHECK_ACK, {"active_tasks": [
            {"task_id": key[0], "attempt": key[1]} for key in sorted(held)]})]

    # -- messages: checked here, applied in apply_batch -----------------------------

    def on_register(self, peer, data):
        if peer.device_id is not None:
            raise ProtocolError("already registered")
        device_id = field(data, "device_id", str)
        if not 0 < len(device_id) <= 64 or not set(device_id) <= DEVICE_ID_CHARACTERS:
            self.refuse(peer, "bad_request", "device_id must be 1-64 of [A-Za-z0-9._-]")
            return
        version = field(data, "protocol", int)
        if version != PROTOCOL_VERSION:
            self.refuse(peer, "bad_protocol", "this main node speaks protocol %d, not %r;"
                        " copy the current bin/worker.py" % (PROTOCOL_VERSION, version))
            return
        worker_nonce = field(data, "nonce", str)
        key, is_new, refusal = self.identity_key(peer, device_id, field(
            data, "auth", str, required=False, default="token"))
        if key is None:
            return
        expected = protocol.worker_proof(key, peer.nonce, worker_nonce, device_id)
        by_token = key == self.join_token.value()
        # Wrong proofs of the token count against the address; of a device's
        # own secret, against that device from that address: a stranger
        # guessing the token behind a NAT shuts out no joined device there.
        failures = (peer.host, None if by_token else device_id)
        # (address, None) for proofs of the join token, (address, device id)
        # for a device's own secret.
        if self.wrong_proofs.shut_out(failures):
            self.refuse(peer, "shut_out", "too many wrong proofs from %s; wait a minute"
                        % peer.host)
            return
        if not protocol.proofs_match(expected, data.get("proof")):
            self.log_limited("warning", "auth_failed", peer.host, address=peer.address,
                             device_id=device_id)
            self.wrong_proofs.add(failures)
            self.refuse(peer, "auth_failed", "wrong join token" if by_token
                        else "wrong device secret")
            return
        if refusal is not None:
            self.refuse(peer, *refusal)
            return
        if is_new and self.token_used_up():
            self.refuse(peer, "too_many_devices", "%d devices have joined with this join"
                        " token already (max_devices_per_token); ask the operator to raise it,"
                        " forget unused devices or rotate the token"
                        % self.config.max_devices_per_token)
            return
        self.check_profile(data)
        size = len(protocol.storable(profile_of(data), "register").encode())
        if size > self.config.max_profile_bytes:
            self.refuse(peer, "profile_too_large", "the profile is %d bytes encoded, over"
                        " max_profile_bytes (%d)" % (size, self.config.max_profile_bytes))
            return
        active = self.named_tasks(device_id, data)
        fenced = self.named_tasks(device_id, data, "fenced_tasks")
        previous = self.peers_by_device.get(device_id)
        if previous is not None:
            self.close(previous, "replaced by a new connection", record=False)
        peer.device_id = device_id
        self.peers_by_device[device_id] = peer
        self.leave_unauthenticated(peer)
        peer.pushed.update(active)
        peer.inline_files = data.get("inline_files") is True
        peer.restart_hold = data.get("restart_hold") is True
        self.batch.append((Server.apply_register, peer,
                           (data, worker_nonce, fenced, key, is_new, active)))

    @staticmethod
    def check_profile(data):
        """ProtocolError unless the profile's fields have the shapes allowed."""
        for name, kind in (("device_info", dict), ("hardware_specs", dict),
                           ("capabilities", list), ("task_types", list), ("tags", list),
                           ("availability", dict)):
            field(data, name, kind, required=False)
        field(data, "slots", int, required=False, low=0)

    def token_used_up(self):
        """Whether max_devices_per_token devices have first joined since the
        join token was last written (forgotten ones aside), counting those
        whose register is waiting in this turn's batch."""
        joined = self.database.execute(
            "SELECT count(*) FROM devices WHERE registered_at >= ? AND forgotten = 0",
            (self.join_token.written_at(),)).fetchone()[0]
        waiting = sum(1 for apply, _, data in self.batch
                      if apply is Server.apply_register and data[4])
        return joined + waiting >= self.config.max_devices_per_token

    def identity_key(self, peer, device_id, auth):
        """The key this device must prove: its own secret once it has one
        (so its id cannot be taken over with the join token), the join token
        for a first join; whether the device is new here; and the refusal
        (code, message) it gets once that key is proved, or None: what is
        known of an id (revoked, taken, another case) is said only to a
        device that proved the token or its secret, never to a stranger.
        (None, _, _), having refused the peer, when no key fits."""
        row = self.database.execute("SELECT sealed_secret, revoked, forgotten FROM devices"
                                    " WHERE device_id = ?", (device_id,)).fetchone()
        refusal = None
        if row and (row["revoked"] or row["forgotten"]):
            code = "forgotten" if row["forgotten"] else "revoked"
            refusal = (code, "device %s was %s on the main node" % (device_id, code))
        # Stored sealed (lib/rc/device_secrets.py); one this node cannot
        # open (sealed with another node's var/device_key) counts as none.
        secret = row and device_secrets.unseal(self.device_key, device_id, row["sealed_secret"])
        if auth == "device":
            if not secret and refusal is not None:
                self.refuse(peer, *refusal)      # its secret went with it: nothing to prove
                return None, False, None
            if not secret:
                self.refuse(peer, "unknown_device", "this main node has no secret for %s%s;"
                            " join with the token" % (device_id, " it can open (restored from"
                            " another main node's backup?)" if row and row["sealed_secret"]
                            else ""))
                return None, False, None
            return secret, False, refusal
        if auth != "token":
            self.refuse(peer, "bad_request", "auth must be token or device")
            return None, False, None
        if refusal is None and secret and self.config.device_secrets:
            refusal = ("device_id_taken", "%s has joined already and must prove its own"
                       " secret; a new device needs another --device-id" % device_id)
        if refusal is None and row is None:
            refusal = self.case_clash(device_id)
        return self.join_token.value(), row is None, refusal

    def case_clash(self, device_id):
        """A new id that differs only by case from a known device's ("Pi" and
        "pi") is refused: people, shells and rc commands would mix them up."""
        other = self.database.execute(
            "SELECT device_id FROM devices WHERE device_id = ? COLLATE NOCASE"
            " AND forgotten = 0 LIMIT 1", (device_id,)).fetchone()
        if other is None:
            return None
        return ("device_id_clash", "%s differs only by case from %s, which has joined"
                " already; device ids are compared without case: start this worker with"
                " another --device-id" % (device_id, other[0]))

    def on_heartbeat(self, peer, data):
        metrics = field(data, "system_metrics", dict, required=False, default={})
        protocol.storable(metrics, "system_metrics")
        availability = field(data, "availability", dict, required=False)
        # A task whose result's files are being stored has ended there, and
        # is not lost: its result follows (OutputStore).
        active = self.named_tasks(peer.device_id, data) | peer.storing
        fenced = self.named_tasks(peer.device_id, data, "fenced_tasks")
        # What the worker's file cache holds, for data-aware scheduling (issue 18).
        cached = devices.cached_files_text(data["cached_files"]) if "cached_files" in data \
            else None
        if cached is not None and peer.inline_files:
            self.know_blobs(peer, db.loads(cached))
        due = self.heartbeat_due(peer)
        self.batch.append((Server.apply_heartbeat, peer,
                           (metrics, availability, active, fenced, due, cached,
                            due and self.history_due(peer))))

    def heartbeat_due(self, peer):
        """Whether this heartbeat is written (metrics, history, leases): at
        most one per min_heartbeat_interval per device, so a device that
        sends thousands a second grows the database by one row a second.
        The others are still acknowledged and still carry what must not
        wait (fenced tasks, a change of availability)."""
        now = time.monotonic()
        last = self.heartbeat_written.get(peer.device_id)
        if last is not None and now - last < self.config.min_heartbeat_interval:
            return False
        self.heartbeat_written[peer.device_id] = now
        return True

    def history_due(self, peer):
        """Whether a heartbeat written also goes into the heartbeat history:
        one per heartbeat_interval (half of one: a worker's heartbeats come
        with jitter), so that it holds about heartbeat_history rows a device,
        as that setting says. Each one written went in before: a device
        heartbeating each second with 17 KB of metrics kept 86,400 rows
        (~1.4 GB) a day, where an honest one keeps 1,440 of ~300 bytes."""
        now = time.monotonic()
        last = self.history_written.get(peer.device_id)
        if last is not None and now - last < self.config.heartbeat_interval / 2:
            return False
        self.history_written[peer.device_id] = now
        return True

    def on_accept(self, peer, data):
        self.batch.append((Server.apply_accept, peer, task_key(data)))

    def on_progress(self, peer, data):
        progress = field(data, "progress", (int, float))
        if not 0 <= progress <= 100:
            raise ProtocolError("progress must be from 0 to 100")
        message = field(data, "message", str, required=False, default="")[:200]
        self.write_progress(self.held_progress.add((peer, task_key(data)), (progress, message),
                                                   time.monotonic()))

    def write_progress(self, writes):
        for (peer, key), (progress, message) in writes:
            self.batch.append((Server.apply_progress, peer, (key, progress, message)))

    def on_result(self, peer, data):
        key = task_key(data)
        status = field(data, "status", str)
        if status not in OUTCOMES:
            raise ProtocolError("status must be one of %s" % ", ".join(OUTCOMES))
        result = field(data, "result", dict, required=False, default={})
        for name in ("output", "stderr"):
            # Every reader takes them for text (rc map takes a dict for a stored stream's entry).
            if not isinstance(result.get(name, ""), (str, type(None))):
                raise ProtocolError("result.%s must be text, not %s"
                                    % (name, type(result[name]).__name__))
        error = field(data, "error", (str, type(None)), required=False)
        protocol.storable(result, "result")
        if key in peer.storing:
            # The same result again while the first one's files are stored:
            # that one is answered. (Queued again, it would pass the bound on
            # what waits for OutputStore, which counts (task, attempt) pairs.)
            self.log_limited("warning", "duplicate_result", peer.host, device_id=peer.device_id,
                             task_id=key[0], attempt=key[1])
            return
        # The fence (the device holds the attempt) and the globs its outputs
        # must match, in one look.
        globs = None if peer.raw is None else files.held_output_globs(
            self.database, peer.device_id, key[0], key[1])
        if globs is not None:
            # Its small files are checked and written here, and synced off the
            # loop (OutputStore); the result waits for them. (A stale result
            # stores none.)
            fields = (key, status, result, error)
            stored, notes, reserved, unsynced = self.write_outputs(
                globs, data.get("files_inline"), peer.raw)
            if not unsynced:        # nothing new to the store: nothing to wait for
                self.stored_outputs(peer, fields, stored, notes, reserved)
                return
            peer.storing.add(key)
            self.outputs.put((peer, fields, (stored, notes, reserved, unsynced),
                              len(peer.raw)))
            if len(peer.storing) >= self.storing_limit():
                self.watch(peer)        # read no more from it for now
            return
        self.batch.append((Server.apply_result, peer, (key, status, result, error, ())))

    def write_outputs(self, globs, entries, raw):
        """(stored, notes {index: why}, bytes reserved, unsynced) of a
        result's small files (files.check_inline_outputs, then
        write_inline_outputs); an error is contained to them, their room
        given back."""
        reserved = [0]
        try:
            plan, notes = files.check_inline_outputs(
                self.database, globs, entries, raw,
                lambda size: self.outputs.reserve(self.database, size, reserved))
            stored, notes, unsynced = files.write_inline_outputs(self.config, plan, notes)
        except Exception as e:
            self.outputs.recorded(reserved[0])
            return [], {-1: "rc-server: no inline file stored: %r" % (e,)}, 0, []
        return stored, notes, reserved[0], unsynced

    def take_stored_outputs(self):
        """Results whose small files OutputStore has synced join the turn's batch."""
        for (peer, fields, _, _), stored, notes, reserved in self.outputs.take():
            peer.storing.discard(fields[0])
            if not peer.closed:
                self.watch(peer)        # read from it again, if it was not
            self.stored_outputs(peer, fields, stored, notes, reserved)

    def stored_outputs(self, peer, fields, stored, notes, reserved):
        """A result whose small files are stored (or refused: said in its
        stderr, in the entries' order, and the log) joins the turn's batch."""
        key, status, result, error = fields
        notes = [notes[index] for index in sorted(notes)]
        if notes:
            result["stderr"] = "\n".join(notes) + "\n" + (result.get("stderr") or "")
            self.log_limited("warning", "inline_files_refused", peer.host,
                             device_id=peer.device_id, task_id=key[0], attempt=key[1],
                             refused=notes[:5])
        self.stored_bytes += reserved
        self.batch.append((Server.apply_result, peer, (key, status, result, error, stored)))

    def on_control_ack(self, peer, data):
        control_id = field(data, "control_id", int, low=1)
        ok = field(data, "ok", bool)
        detail = field(data, "detail", (str, type(None)), required=False)
        self.batch.append((Server.apply_control_ack, peer, (control_id, ok, (detail or "")[:500])))

    # -- the device's own log, and watches -------------------------------------------

    def on_device_log(self, peer, data):
        """Lines of the worker's own log: the message refused whole when
        one is malformed; those over the device's allowance counted, not kept."""
        lines, trim = self.log_allowance.admit(peer.device_id, device_logs.checked_lines(data))
        if lines:
            self.batch.append((Server.apply_device_log, peer, (lines, trim)))

    def apply_device_log(self, peer, data, now):
        lines, trim = data
        device_logs.store(self.database, peer.device_id, lines, now,
                          self.config.device_log_lines if trim else None)

    def tell_watches(self):
        """Devices someone watches (POST /api/v1/devices/ID/watch writes the
        column) report every watch_report_interval until the watch ends; a
        new or longer watch, or a new connection, is told once. One indexed
        read a sweep (about a second)."""
        now = time.time()
        watched = dict(devices.watched(self.database, now))
        for device_id in [d for d in self.watches_told if d not in watched]:
            del self.watches_told[device_id]
        for device_id, until in watched.items():
            peer = self.peers_by_device.get(device_id)
            if peer is None or self.watches_told.get(device_id) == (peer, until):
                continue
            self.watches_told[device_id] = (peer, until)
            # No sooner than a heartbeat can be written (min_heartbeat_interval).
            interval = max(self.config.watch_report_interval,
                           self.config.min_heartbeat_interval)
            self.send(peer, WATCH, {"interval": interval, "seconds": round(until - now, 3)})

    def tell_task_watches(self):
        """Tasks someone watches (POST /api/v1/tasks/ID/watch): the device
        running each attempt is told once, and again when the watch grows,
        the device connects again or the task starts (a worker watches the
        tasks it runs, not those waiting in its queue) (lib/rc/tails.py).
        One indexed read a sweep."""
        now = time.time()
        told, self.task_watches_told = self.task_watches_told, {}
        for task_id, attempt, device_id, until, state in tails.watched(self.database, now):
            peer = self.peers_by_device.get(device_id)
            if peer is None:
                continue
            self.task_watches_told[(task_id, attempt)] = (peer, until, state)
            if told.get((task_id, attempt)) != (peer, until, state):
                self.send(peer, TASK_WATCH, {"task_id": task_id, "attempt": attempt,
                                             "seconds": round(until - now, 3)})

    def on_task_output(self, peer, data):
        """What a watched task's stream added: bytes `start` to `end` of it,
        the latest TAIL_BYTES at most, as text."""
        key = task_key(data)
        stream = field(data, "stream", str)
        if stream not in tails.STREAMS:
            raise ProtocolError("stream must be one of %s" % ", ".join(tails.STREAMS))
        start = field(data, "start", int, low=0)
        end = field(data, "end", int, low=0)
        text = field(data, "data", str)
        if end < start or len(text) > TAIL_BYTES:
            raise ProtocolError("task_output must have start <= end and at most %d characters"
                                % TAIL_BYTES)
        told = self.task_watches_told.get(key)
        if told is None or told[0] is not peer:
            return       # a task nobody watches, or not this device's: nothing to keep
        self.write_tails(self.held_tails.add(key + (stream,), (peer, start, end, text),
                                             time.monotonic()))

    def write_tails(self, writes):
        for key, (peer, start, end, text) in writes:
            self.batch.append((Server.apply_task_output, peer, (key, start, end, text)))

    def apply_task_output(self, peer, data, now):
        (task_id, attempt, stream), start, end, text = data
        tails.store(self.database, task_id, attempt, peer.device_id, stream, start, end, text,
                    now)

    HANDLERS = {REGISTER: on_register, HEARTBEAT: on_heartbeat, TASK_ACCEPT: on_accept,
                TASK_PROGRESS: on_progress, TASK_RESULT: on_result,
                CONTROL_ACK: on_control_ack, PONG: on_pong, LEASE_CHECK: on_lease_check,
                DEVICE_LOG: on_device_log, TASK_OUTPUT: on_task_output}

    # -- applying a turn's messages: one transaction (or one statement) ------------

    def apply_batch(self):
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        now = time.time()
        try:
            replies = self.apply_together(batch, now)
        except Exception as e:
            # One message the database will not take (an IntegrityError, a
            # value it cannot hold...) must not cost everybody else's work.
            self.rollback()
            self.notes = []
            self.log_limited("error", "batch_failed", "batch", messages=len(batch),
                             error=repr(e)[:500])
            replies = self.apply_one_by_one(batch, now)
        # Committed (or refused, and their blobs left to the upkeep's sweep):
        # the quota counts them by their rows now.
        self.outputs.recorded(self.stored_bytes)
        self.stored_bytes = 0
        if self.released:
            self.released = False
            bell.ring(self.config.run_dir, bell.SCHEDULER)
        if any(apply in FREES_SLOTS for apply, _, _ in batch):
            # rc-web first: a client waiting for this result is on a task's way;
            # the scheduler, looking for more to assign, is not (and listens
            # only while tasks wait for room).
            bell.ring(self.config.run_dir, bell.WEB)
            bell.ring(self.config.run_dir, bell.SCHEDULER_ROOM)
        # Only now is everything above durable; acknowledge it. A lone ack
        # of a result waits for the next frame to that device (send's soon);
        # any other reply goes this turn, with the acks queued before it.
        for peer, reply in replies:
            lone_ack = len(reply) == 1 and reply[0][0] == TASK_RESULT_ACK
            for message_type, data in reply:
                self.send(peer, message_type, data, later=True, soon=lone_ack)
        notes, self.notes = self.notes, []
        self.tell(notes)

    def apply_together(self, batch, now):
        """The turn's messages in one transaction (or one statement): the
        replies to send once it has committed."""
        alone = self.complete_alone(batch, now)
        if alone:
            return [alone] if alone[1] else []
        replies = []
        with db.write(self.database):
            for apply, peer, data in batch:
                reply = apply(self, peer, data, now)
                if reply:
                    replies.append((peer, reply))
        return replies

    def apply_one_by_one(self, batch, now):
        """After the turn's transaction failed: each message in its own, and
        the peer whose message fails again is refused (it reconnects and
        sends again what it still holds)."""
        replies, notes = [], []
        for apply, peer, data in batch:
            try:
                with db.write(self.database):
                    reply = apply(self, peer, data, now)
            except Exception as e:
                self.rollback()
                self.notes = []
                self.log_limited("error", "message_not_stored", peer.host, address=peer.address,
                                 device_id=peer.device_id, step=apply.__name__,
                                 error=repr(e)[:500])
                self.refuse(peer, "not_stored", "the main node could not store your %s: %s"
                            % (apply.__name__.replace("apply_", ""), str(e)[:200]))
                continue
            notes += self.notes
            self.notes = []
            if reply:
                replies.append((peer, reply))
        self.notes = notes
        return replies

    def note(self, level, event, **fields):
        """Log what the turn's transaction does once it has committed: never
        a rollback, and the commit does not wait on the log."""
        self.notes.append((level, event, fields))

    def note_limited(self, level, event, key, **fields):
        """note() for a line a device can make us repeat at will (an answer
        for an attempt it does not hold, a lease check): a few a minute per
        event and key, the rest counted (log_limited). Else 10,000 messages
        a second would rotate every other line out of the log in a minute."""
        if self.log_limited.admit(event, key, fields):
            self.note(level, event, **fields)

    def note_audit(self, event, actor, source, **fields):
        """An audit line, written once the turn's transaction has committed."""
        self.notes.append((None, event, dict(fields, actor=actor, source=source)))

    def tell(self, notes):
        """The turn's log lines, in one write (see Logger.log_many), and its
        audit lines."""
        self.log.log_many([note for note in notes if note[0] is not None])
        for level, event, fields in notes:
            if level is None:
                fields = dict(fields)
                self.audit_line(event, fields.pop("actor"), fields.pop("source"), **fields)

    def apply_register(self, peer, data, now):
        data, worker_nonce, fenced, key, is_new, active = data
        if devices.held_until(self.database, peer.device_id) is not None:
            # Back from a hold: what it still runs is its own again, however
            # long the hold was (rc-reaper left the leases alone meanwhile).
            peer.held = True
            tasks.renew_leases(self.database, peer.device_id, active,
                               now + self.config.lease_duration)
        devices.register(self.database, peer.device_id, data, peer.address, now,
                         self.config.max_device_slots)
        if is_new:
            fleet.tasks_for_new_device(self.database, self.config, peer.device_id)
        # device_logs: this main node takes device_log messages (older ones do not).
        ack = dict(fence_settings(self.config), files_port=self.config.files_port,
                   device_logs=True,
                   # Small files may ride task_result (older main nodes: absent).
                   inline_files={"file_bytes": INLINE_FILE_BYTES,
                                 "total_bytes": INLINE_TOTAL_BYTES},
                   proof=protocol.server_proof(key, peer.nonce, worker_nonce, peer.device_id))
        first_join = key == self.join_token.value()
        if first_join:
            # From now on the device proves its own secret, not the token.
            secret = protocol.new_device_secret()
            # Stored sealed with var/device_key, never in clear (issue 17).
            devices.set_secret(self.database, peer.device_id,
                               device_secrets.seal(self.device_key, peer.device_id, secret))
            ack["device_secret"] = protocol.seal(key, peer.nonce, worker_nonce,
                                                 peer.device_id, secret)
        if first_join:
            self.note_audit("device_joined", peer.device_id, peer.address)
        else:      # as often as the device likes: a few a minute, the rest counted
            held = self.connected_lines.allow((peer.device_id, peer.host))
            if held is not None:
                self.note_audit("device_connected", peer.device_id, peer.address,
                                **({"suppressed": held} if held else {}))
        self.take_back_fenced(peer.device_id, fenced, now)
        self.note_limited("info", "device_registered", peer.device_id,
                          device_id=peer.device_id, address=peer.address,
                          slots=data.get("slots"), active_tasks=len(peer.pushed),
                          first_join=first_join)
        return [(REGISTER_ACK, ack)]

    def take_back_fenced(self, device_id, keys, now):
        """Tasks the worker stopped itself after losing us: the main node's
        absence, not the task's doing, so the retry is not charged to it.
        Given back by the device (tasks.give_back): one that accepted every
        task and named it fenced next was given it again after each backoff,
        claiming the most idle slots, and no task ran elsewhere."""
        for task_id, attempt in keys:
            row = self.database.execute(
                "SELECT %s FROM tasks WHERE task_id = ? AND attempt = ? AND device_id = ?"
                " AND state IN (?, ?)" % tasks.LEASE_COLUMNS,
                (task_id, attempt, device_id, ASSIGNED, RUNNING)).fetchone()
            if row and tasks.give_back(self.database, row, device_id, "fenced by %s" % device_id,
                                       now, self.config):
                self.note("info", "task_fenced", task_id=task_id, attempt=attempt,
                          device_id=device_id)

    def apply_heartbeat(self, peer, data, now):
        metrics, availability, active, fenced, due, cached, history = data
        if peer.held:       # it has its register_ack, so holds nothing any more
            devices.end_hold(self.database, peer.device_id)
            peer.held = False
        if due:
            if cached is not None:     # like metrics: at most once per min_heartbeat_interval
                devices.set_cached_files(self.database, peer.device_id, cached)
            devices.heartbeat(self.database, peer.device_id, metrics, now, availability,
                              history)
            tasks.renew_leases(self.database, peer.device_id, active,
                               now + self.config.lease_duration)
        else:
            devices.set_availability(self.database, peer.device_id, availability)
        self.take_back_fenced(peer.device_id, fenced, now)
        replies = [(HEARTBEAT_ACK, {})]
        held = {(row["task_id"], row["attempt"]): row for row in self.database.execute(
            "SELECT %s FROM tasks WHERE device_id = ? AND %s"
            % (tasks.LEASE_COLUMNS, db.ACTIVE_SQL), (peer.device_id,))}
        for key, row in held.items():
            # Running here, yet the worker no longer has it: it restarted or lost it.
            if row["state"] == RUNNING and key not in active:
                tasks.take_back(self.database, row, "lost by worker %s" % peer.device_id,
                                now, self.config)
                self.note("warning", "task_lost", task_id=key[0], attempt=key[1],
                          device_id=peer.device_id)
        for key in active - set(held):
            # The worker runs an attempt that is no longer its own: stop it.
            replies.append((TASK_CANCEL, {"task_id": key[0], "attempt": key[1]}))
        return replies

    def apply_disconnect(self, peer, data, now):
        devices.disconnected(self.database, peer.device_id, now)

    def apply_accept(self, peer, key, now):
        if tasks.accept(self.database, key[0], key[1], peer.device_id, now,
                        self.config.lease_duration):
            self.note("debug", "task_started", task_id=key[0], attempt=key[1],
                      device_id=peer.device_id)
            return None
        self.note_limited("warning", "stale_accept", peer.device_id, task_id=key[0],
                          attempt=key[1], device_id=peer.device_id)
        return [(TASK_CANCEL, {"task_id": key[0], "attempt": key[1]})]

    def apply_progress(self, peer, data, now):
        key, progress, message = data
        tasks.record_progress(self.database, key[0], key[1], peer.device_id, progress,
                              message)

    def complete_alone(self, batch, now):
        """A turn that brought one completed result and nothing else (each
        task on an idle cluster) needs one UPDATE, which commits on its own:
        (peer, reply) then; None when the batch needs apply_batch's
        transaction, and nothing was written (a lone completed result that
        is stale then meets that UPDATE twice, the second time inside
        apply_result: rare, and cheaper than a second way through it). A
        lone acceptance is one UPDATE whatever it finds, so it too commits
        on its own."""
        if len(batch) != 1:
            return None
        apply, peer, data = batch[0]
        if apply is Server.apply_accept:
            with db.write_statements(self.database, 1):
                return peer, apply(self, peer, data, now)
        if apply is Server.apply_result and not data[4]:      # inline files: more rows
            with db.write_statements(self.database, 1):
                reply = self.complete(peer, data, now)
            if reply:
                return peer, reply
        return None

    def complete(self, peer, data, now):
        """The common case of apply_result in one statement (finish() checks
        what the row must be): the reply, or None when that is not the case."""
        key, status, result, error = data[:4]
        if status == COMPLETED and tasks.finish(self.database, key[0], key[1], peer.device_id,
                                                COMPLETED, result, error, status, now):
            peer.pushed.discard(key)
            self.note("info", "task_finished", task_id=key[0], attempt=key[1],
                      device_id=peer.device_id, status=status)
            return [(TASK_RESULT_ACK, {"task_id": key[0], "attempt": key[1]})]
        return None

    def apply_result(self, peer, data, now):
        key, status, result, error, stored = data
        reply = self.complete(peer, data, now)
        if reply:
            # finish() found the attempt this device's: its files are the task's.
            files.record_inline_outputs(self.database, key[0], key[1], stored, True, now)
            return reply
        peer.pushed.discard(key)
        ack = (TASK_RESULT_ACK, {"task_id": key[0], "attempt": key[1]})
        row = self.database.execute(
            "SELECT %s FROM tasks WHERE task_id = ? AND attempt = ? AND device_id = ?"
            " AND state IN (?, ?)" % tasks.LEASE_COLUMNS,
            (key[0], key[1], peer.device_id, ASSIGNED, RUNNING)).fetchone()
        # Rows for its blobs in any case (the upkeep's sweep then removes
        # them), and the task's own when the attempt is this device's.
        files.record_inline_outputs(self.database, key[0], key[1], stored, row is not None,
                                    now)
        if row is None and self.database.execute(
                "SELECT 1 FROM tasks WHERE task_id = ? AND attempt = ? AND device_id = ?"
                " AND state = ?", (key[0], key[1], peer.device_id, status)).fetchone():
            # Recorded already: its ack was lost (rc-server restarted before
            # it went), and the worker sends it again, as it should.
            self.note("info", "result_again", task_id=key[0], attempt=key[1],
                      device_id=peer.device_id, status=status)
            return [ack]
        if row is None:
            # A device answering for an attempt taken back from it (rc drain
            # --now, a lease run out) says it stopped: expected, not a warning.
            taken_back = status in (OUTCOME_CANCELLED, OUTCOME_HANDED_BACK)
            self.note_limited("info" if taken_back else "warning", "stale_result",
                              peer.device_id, task_id=key[0], attempt=key[1],
                              device_id=peer.device_id, status=status)
            if taken_back and tasks.release_after_take_back(self.database, peer.device_id,
                                                            key[0], key[1], now):
                self.released = True     # its checkpoint is in: the next attempt may go
            return [ack, (ERROR, {"code": "stale_result", "task_id": key[0],
                                  "attempt": key[1],
                                  "message": "task %s attempt %s is not assigned to %s;"
                                  " result ignored" % (key[0], key[1], peer.device_id)})]
        if status in (OUTCOME_NOT_ALLOWED, OUTCOME_HANDED_BACK) or (
                status == OUTCOME_CANCELLED and not row["cancel_requested"]):
            # Not the task's fault: another device may run it.
            why = "%s by %s%s" % (status.replace("_", " "), peer.device_id,
                                  ": " + error if error else "")
            if status != OUTCOME_CANCELLED and row["state"] == ASSIGNED:
                tasks.bounce(self.database, row, peer.device_id, why, now, self.config)
            else:      # it ran: a hand-back with its checkpoint (battery, owner)
                tasks.give_back(self.database, row, peer.device_id, why, now, self.config)
        elif status == FAILED and (result or {}).get("environment_failed") is True \
                and tasks.environment_failed(self.database, row, peer.device_id, error, now,
                                             self.config):
            pass
        elif status == FAILED and (result or {}).get("device_fault") is True \
                and tasks.device_fault(self.database, row, peer.device_id, error, now,
                                       self.config):
            pass
        elif status in (FAILED, TIMED_OUT) and tasks.retry_failed(
                self.database, row, status, result, error, now, self.config):
            pass
        else:
            tasks.finish(self.database, key[0], key[1], peer.device_id, RESULT_STATES[status],
                         result, error, status, now)
        self.note("info", "task_finished", task_id=key[0], attempt=key[1],
                  device_id=peer.device_id, status=status)
        return [ack]

    # -- what other programs decided -------------------------------------------------

    def cancel_taken_back(self, rows):
        """Attempts we sent that are no longer their device's (drained with
        --now, forgotten, lease expired), found by the full read of every
        active attempt: tell the worker to stop them within the second, not
        at its next heartbeat."""
        held = active_by_device(rows)
        for peer in list(self.peers_by_device.values()):
            for key in peer.pushed - held.get(peer.device_id, set()):
                peer.pushed.discard(key)
                self.send(peer, TASK_CANCEL, {"task_id": key[0], "attempt": key[1]},
                          later=True)

    def push_controls(self):
        """Broadcasts queued by `rc broadcast`, to the connected devices they
        name; each worker answers with control_ack."""
        for row in self.database.execute("SELECT control_id, command, targets FROM controls"
                                         " WHERE control_id > ? ORDER BY control_id",
                                         (self.last_control,)).fetchall():
            self.last_control = row["control_id"]
            targets = db.loads(row["targets"], {})
            data = {"control_id": row["control_id"], "command": row["command"]}
            if row["command"] == "upgrade":
                # The worker downloads worker.py over plain HTTP from rc-web; this
                # hash, on the authenticated connection, is how it knows the file.
                data["sha256"] = served_worker_sha256()
            for device in devices.list_devices_where(self.database, "d.connected = 1", ()):
                peer = self.peers_by_device.get(device["device_id"])
                if peer and not tasks.unmet_requirements(targets, device):
                    self.send(peer, CONTROL, data)

    def apply_control_ack(self, peer, data, now):
        control_id, ok, detail = data
        self.database.execute(
            "INSERT OR REPLACE INTO control_acks(control_id, device_id, time, ok, detail)"
            " SELECT control_id, ?, ?, ?, ? FROM controls WHERE control_id = ?",
            (peer.device_id, now, int(ok), detail, control_id))

    def push_changes(self):
        """Send assignments and cancellations committed by other programs.

        Looked for when the doorbell rang, else once per poll_interval, as
        an idle loop does anyway: not after every turn, so that a turn that
        only brought a result (and committed it) costs no second statement.
        After the scheduler's own ring (bell.SERVER_ASSIGNED), only the
        attempts to send are read."""
        now = time.monotonic()
        full_scan = now - self.last_scan >= FULL_SCAN_INTERVAL
        assigned, self.assigned = self.assigned, False
        if not (self.rung or full_scan or now - self.looked_at >= self.config.poll_interval):
            if assigned:
                # rc-scheduler's ring: what it assigned goes out now, read in
                # one statement on the task's way. data_version is left for
                # the next look, which then reads these rows again (pushed
                # already: nothing is sent twice), and sees any other change.
                self.push_tasks(self.database.execute(PUSHABLE_SQL, (ASSIGNED,)).fetchall())
            return
        self.rung, self.looked_at = False, now
        version, revoked, last_control = db.data_version_and(
            self.database, "EXISTS (SELECT 1 FROM devices WHERE %s),"
            " (SELECT coalesce(max(control_id), 0) FROM controls)" % SHUT_OUT_BUT_CONNECTED)
        if version == self.seen_version and not full_scan:
            return
        self.seen_version = version
        if revoked:
            self.refuse_revoked()
        if full_scan:
            self.last_scan = now
            rows = self.database.execute("SELECT %s FROM tasks WHERE %s"
                                         % (PUSH_COLUMNS, db.ACTIVE_SQL)).fetchall()
            self.cancel_taken_back(rows)
        else:
            rows = self.database.execute(PUSHABLE_SQL, (ASSIGNED,)).fetchall()
        self.push_tasks(rows)
        if last_control > self.last_control:
            self.push_controls()

    def refuse_revoked(self):
        """Hang up on devices `rc revoke` or `rc forget` shut out."""
        for row in self.database.execute("SELECT device_id, forgotten FROM devices"
                                         " WHERE " + SHUT_OUT_BUT_CONNECTED).fetchall():
            peer = self.peers_by_device.get(row["device_id"])
            if peer is not None:
                code = "forgotten" if row["forgotten"] else "revoked"
                self.refuse(peer, code, "this device was %s on the main node" % code)

    def push_tasks(self, rows):
        """Assignments not sent yet, and cancellations asked for."""
        for row in rows:
            peer = self.peers_by_device.get(row["device_id"])
            if peer is None:
                continue
            key = (row["task_id"], row["attempt"])
            if row["cancel_requested"] and row["state"] == ASSIGNED and key not in peer.pushed:
                # Never sent, so it cannot be running: cancel it here and now.
                with db.write(self.database):
                    tasks.finish(self.database, key[0], key[1], peer.device_id, CANCELLED,
                                 None, None, "cancelled by user", time.time())
            elif row["cancel_requested"]:
                if key not in peer.cancels_sent:
                    peer.cancels_sent.add(key)
                    self.send(peer, TASK_CANCEL, {"task_id": key[0], "attempt": key[1]},
                              later=True)
            elif row["state"] == ASSIGNED and key not in peer.pushed:
                peer.pushed.add(key)
                self.expect_answer(peer)
                assign = {
                    "task_id": key[0], "attempt": key[1], "task_type": row["task_type"],
                    "payload": db.loads(row["payload"]), "timeout": row["timeout"],
                    "priority": PRIORITY_NAMES.get(row["priority"], "normal")}
                raw = self.add_inline_inputs(peer, assign) if peer.inline_files else None
                self.send(peer, TASK_ASSIGN, assign, later=True, raw=raw)

    def add_inline_inputs(self, peer, assign):
        """The task's small inputs for its task_assign (docs/protocol.md):
        their entries go in it, and their bytes, returned, right behind it.
        Sent once per connection, not at all if its heartbeat said the
        device holds them, nor while the outbox is long."""
        payload = assign["payload"]
        if not isinstance(payload, dict) or len(peer.outbox) >= INLINE_OUTBOX_BYTES:
            return None
        refs = files.input_refs(payload)
        if not refs:
            return None
        entries, raw = files.inline_inputs(self.config, refs, peer.known_blobs,
                                           INLINE_TOTAL_BYTES)
        if not entries:
            return None
        assign["files_inline"], assign["inline_bytes"] = entries, len(raw)
        self.know_blobs(peer, [entry["sha256"] for entry in entries])
        return raw

    @staticmethod
    def know_blobs(peer, hashes):
        if len(peer.known_blobs) + len(hashes) > KNOWN_BLOBS_MAX:
            peer.known_blobs.clear()       # forgetting costs a resend, never a wrong file
        peer.known_blobs.update(hashes)


# After these, the scheduler may have work to give out.
FREES_SLOTS = (Server.apply_register, Server.apply_result, Server.apply_disconnect,
               Server.apply_heartbeat, Server.apply_heard_again)


class OutputStore:
    """Makes the small files of task_results durable off rc-server's loop:
    the loop checks, hashes and writes each into place (files.
    write_inline_outputs: what needs the database, on its own warm
    connection, and ~0.1 ms of CPU for 100 KiB), then one of
    OUTPUT_STORE_THREADS threads fsyncs the files and their directories
    (files.sync_placed: 0.3 ms here, tens of ms on an SD card), which the
    loop must not wait for: every other device's heartbeat would. A thread
    takes every job queued at that moment (at most SYNC_BATCH): under load
    one wake-up and one hand-back serve many results, and a directory two
    of them share is synced once. A finished job comes back through a
    socket pair the loop's selector watches, and its rows are written with
    its result, in the loop's transaction; its room in the quota is given
    back once they are (recorded)."""

    def __init__(self, config):
        import queue
        self.config = config
        self.jobs = queue.SimpleQueue()
        self.finished = collections.deque()
        self.done_reader, self.done_writer = socket.socketpair()
        self.done_reader.setblocking(False)
        self.done_writer.setblocking(False)
        self.handing = threading.Lock()     # finished, and whether the loop is woken
        self.unrecorded = 0       # bytes placed whose rows are not committed yet (the quota)
        self.waiting_bytes = 0    # raw bytes of the results put and not taken back
        self.threads = []

    def put(self, job):
        """job: (peer, result fields, (stored, notes, bytes reserved,
        unsynced) of Server.write_outputs, how many raw bytes the
        task_result holds: its InlineBlobs keep them until the rows)."""
        self.waiting_bytes += job[3]
        if not self.threads:
            for number in range(OUTPUT_STORE_THREADS):
                thread = threading.Thread(target=self.run, name="output-store-%d" % number,
                                          daemon=True)
                thread.start()
                self.threads.append(thread)
        self.jobs.put(job)

    def take(self):
        """[(job, stored [(name, sha256, size, InlineBlob)], notes {index: why}, bytes
        reserved)] finished since the last take; recorded(those bytes) once
        their rows commit."""
        try:
            while self.done_reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self.handing:
            taken = list(self.finished)
            self.finished.clear()
        self.waiting_bytes -= sum(job[3] for job, _, _, _ in taken)
        return taken

    def reserve(self, connection, size, reserved):
        """Room for `size` more bytes beside those placed and not recorded
        yet (FileStoreError quota or disk_full), held until recorded(); the
        loop's alone, as recorded() is."""
        files.check_room(connection, self.config, self.unrecorded + size)
        self.unrecorded += size
        reserved[0] += size

    def recorded(self, size):
        self.unrecorded -= size

    def run(self):
        import queue
        while True:
            jobs = [self.jobs.get()]
            while len(jobs) < SYNC_BATCH:
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            self.hand_back([self.synced(job, errors) for job, errors in
                            zip(jobs, self.sync([job[2][3] for job in jobs]))])

    @staticmethod
    def sync(placed_by_job):
        """files.sync_placed of every job's files at once: each job's errors."""
        placed = [item for unsynced in placed_by_job for item, _, _ in unsynced]
        try:
            errors = files.sync_placed(placed)
        except Exception as e:       # contained to these results' files
            errors = [e] * len(placed)
        by_job = []
        for unsynced in placed_by_job:
            by_job.append(errors[:len(unsynced)])
            errors = errors[len(unsynced):]
        return by_job

    @staticmethod
    def synced(job, errors):
        """(job, stored, notes, bytes reserved), the files that could not be
        synced taken out of stored and said in notes."""
        stored, notes, reserved, unsynced = job[2]
        failed = {(index, name): error for (_, index, name), error in zip(unsynced, errors)
                  if error}
        if not failed:
            return job, stored, notes, reserved
        notes = dict(notes)
        for (index, name), error in failed.items():
            notes[index] = "rc-server: output %r not stored: %s" % (name[:200], error)
        names = {name for _, name in failed}
        return job, [entry for entry in stored if entry[0] not in names], notes, reserved

    def hand_back(self, finished):
        """To the loop; woken only if it had none of these waiting (take()
        takes them all): one turn, one transaction, for the results stored
        meanwhile."""
        with self.handing:
            self.finished.extend(finished)
            if len(self.finished) > len(finished):
                return
        try:
            self.done_writer.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass           # the loop has a wake-up waiting already


class JoinToken:
    """The join token, read again when its file changes (`rc token --rotate`)."""

    def __init__(self, path):
        self.path = path
        self.seen = None
        self.token = None

    def value(self):
        stamp = os.stat(self.path).st_mtime_ns
        if stamp != self.seen:
            self.token, self.seen = read_secret(self.path), stamp
        return self.token

    def written_at(self):
        """When the current token was made (seconds since the epoch): the
        devices registered since joined with it."""
        self.value()
        return self.seen / 1e9


def fence_settings(config):
    """What a worker needs to stop its own tasks before the main node gives
    them to someone else: it must give up a little before its lease ends
    (heartbeats, which renew the lease, come every heartbeat_interval) and
    well before a dropped connection's grace runs out; and hand back a task
    still waiting for a slot well before accept_timeout takes it back. A
    task not started yet may go elsewhere once we have heard nothing from the
    worker for assignment_lease (suspect_after): after a silence that long,
    or a freeze, the worker asks (lease_check) before it starts one."""
    return {"heartbeat_interval": config.heartbeat_interval,
            "fence_interval": config.lease_duration - config.heartbeat_interval / 2,
            "disconnect_fence": config.disconnect_grace / 2,
            "queue_wait": config.accept_timeout / 2,
            "assignment_lease": min(config.suspect_after, config.accept_timeout)}


def served_worker_sha256():
    """SHA-256 of the worker.py that rc-web serves (GET /worker.py)."""
    with open(config_module.WORKER_PATH, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def active_by_device(rows):
    held = {}
    for row in rows:
        held.setdefault(row["device_id"], set()).add((row["task_id"], row["attempt"]))
    return held


def profile_of(register_data):
    """What a register message says about the device: all but the task lists."""
    return {name: value for name, value in register_data.items()
            if name not in ("active_tasks", "fenced_tasks")}


def task_key(data):
    task_id = field(data, "task_id", int)
    attempt = field(data, "attempt", int)
    if task_id < 1 or attempt < 1 or task_id > 2 ** 62 or attempt > 2 ** 31:
        raise ProtocolError("task_id and attempt must be positive")
    return task_id, attempt


def active_tasks(data, name="active_tasks"):
    """A list of {task_id, attempt} as a set of pairs."""
    items = field(data, name, list, required=False, default=[])
    if len(items) > 10000:
        raise ProtocolError("too many %s" % name)
    keys = set()
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError("%s must hold objects" % name)
        keys.add(task_key(item))
    return keys


def raise_file_limit(log):
    """Each worker holds a descriptor; the usual soft limit of 1,024 is too
    few for a large fleet, so take what the hard limit allows."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 1048576 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    log.info("file_limit", descriptors=soft)


def main():
    keep_files_private()
    config = program.load_config("rc-server")
    program.end_with_supervisord(config.run_dir)
    log = Logger("rc-server", config.log_level)
    program.require_state(config, log)
    raise_file_limit(log)
    server = Server(config, log)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    server.run()


if __name__ == "__main__":
    main()
