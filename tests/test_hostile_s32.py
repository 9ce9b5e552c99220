"""Round 32 of attacks: denial of service. A stranger on the LAN (no token,
no device secret) or one enrolled device gone bad tries to stop everyone
else's work on a running TLS cluster, or to grow its memory, disk or
database without bound. Each test failed on the code before its fix; after
each attack the programs keep their pids and a good worker's tasks
complete (hostile_harness.unharmed)."""
import selectors
import socket
import threading
import time

import pytest

from hostile_harness import unharmed
from rc import protocol
from test_bad_input import read_frame, register_frame
from test_inline_files import with_the_good_worker

pytestmark = pytest.mark.e2e

MAX_UNAUTHENTICATED = 64        # rc-server's cap, low: fewer sockets to fill it with
PER_ADDRESS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for cluster in with_the_good_worker(tmp_path_factory.mktemp("hostile-s32"), "good",
                                        max_unauthenticated=MAX_UNAUTHENTICATED,
                                        max_unauthenticated_per_address=PER_ADDRESS):
        assert cluster.config.tls
        yield cluster


def joined(cluster, device_id):
    """A connection of a device that proved the token (its first time) or
    its own secret: (its register_ack, the socket); generous timeouts, the
    machine may be busy."""
    sock = cluster.connect(timeout=20)
    hello = read_frame(sock, timeout=20)
    assert hello and hello["message_type"] == "hello", hello
    nonce, mine = hello["data"]["nonce"], protocol.new_nonce()
    secret = cluster.secrets.get(device_id)
    proof = protocol.worker_proof(secret or cluster.token, nonce, mine, device_id)
    sock.sendall(register_frame(cluster, nonce, device_id, proof, mine,
                                auth="device" if secret else "token"))
    ack = read_frame(sock, timeout=20)
    assert ack and ack["message_type"] == "register_ack", ack
    if not secret:
        cluster.secrets[device_id] = protocol.unseal(cluster.token, nonce, mine, device_id,
                                                     ack["data"]["device_secret"])
    return ack, sock


class Strangers:
    """`per_address` idle TCP connections from each address to a port,
    never a TLS ClientHello; one that is cut is opened again at once."""

    def __init__(self, port, addresses, per_address):
        self.port, self.selector = port, selectors.DefaultSelector()
        self.stop, self.opened = threading.Event(), 0
        self.wanted = len(addresses) * per_address
        for address in addresses:
            for _ in range(per_address):
                self.open(address)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def open(self, address):
        sock = socket.socket()
        sock.bind((address, 0))
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        self.selector.register(sock, selectors.EVENT_READ, address)
        self.opened += 1

    def run(self):
        while not self.stop.is_set():
            for key, _ in self.selector.select(0.2):
                try:
                    cut = not key.fileobj.recv(4096)
                except OSError:
                    cut = True
                if cut:
                    self.selector.unregister(key.fileobj)
                    key.fileobj.close()
                    self.open(key.data)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def test_strangers_on_many_addresses_lock_no_worker_out_of_rc_server(cluster):
    """rc-server refused every new connection once max_unauthenticated were
    authenticating: strangers on max_unauthenticated / 8 + 1 addresses (126
    by default), 8 idle connections each, opened again at each auth_timeout,
    locked out every worker that (re)connected, closed before its TLS
    handshake. Now the oldest connection of the address holding the most
    makes way for a newcomer, and a worker gets in at once."""
    addresses = ["127.0.0.%d" % (40 + n)
                 for n in range(MAX_UNAUTHENTICATED // PER_ADDRESS + 2)]
    with unharmed(cluster, "good"):
        strangers = Strangers(cluster.config.tcp_port, addresses, PER_ADDRESS)
        try:
            time.sleep(2)          # rc-server has accepted them all by now
            assert strangers.opened >= strangers.wanted > MAX_UNAUTHENTICATED
            for attempt in range(5):          # a worker reconnecting, again and again
                _, sock = joined(cluster, "returning")
                sock.close()
            assert strangers.opened > strangers.wanted     # they were made to wait
        finally:
            strangers.close()
