"""A rate limit per key, for lines an attacker could otherwise make us write
without end: log lines about bad peers, audit lines about refused
connections. Each key (an address and a code, say) gets a burst, then
`per_minute`; what is held back is counted, and the count goes with the
next line that is let through (or with held_back(), once the key may speak
again), so nothing is hidden, only summed."""
import ipaddress
import threading
import time

MAX_KEYS = 10000      # keys a throttle tracks before it forgets the quiet ones
HELD_BACK_INTERVAL = 2.0   # seconds between a program's looks for held-back lines to sum up
IPV6_PREFIX = 64      # one IPv6 client usually holds a whole /64
# Seconds a spent new_connections_per_address takes to come back whole: an
# address that used all of it may open a twentieth of it a second after.
NEW_CONNECTIONS_REFILL_SECONDS = 20.0


class Throttle:
    def __init__(self, per_minute, burst=None, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = float(max(1, per_minute if burst is None else burst))
        self.clock = clock
        self.keys = {}       # key -> [allowance, when it was worked out, held back]

    def allow(self, key):
        """How many lines of this key were held back since the last one let
        through (0 or more) when this one may go; None when it is held back."""
        if key not in self.keys and len(self.keys) >= MAX_KEYS:
            self.forget_quiet()
        entry = self.refill(key)
        if entry[0] >= 1.0:
            entry[0] -= 1.0
            held, entry[2] = entry[2], 0
            return held
        entry[2] += 1
        return None

    def held_back(self):
        """(key, count) for each key whose held-back lines may now be told
        (one summary line each); keys with nothing to tell and a full
        allowance are forgotten, so the table stays as small as the attack
        of the last minute."""
        told = []
        for key in list(self.keys):
            entry = self.refill(key)
            if entry[2] and entry[0] >= 1.0:
                entry[0] -= 1.0
                told.append((key, entry[2]))
                entry[2] = 0
            elif not entry[2] and entry[0] >= self.burst:
                del self.keys[key]
        return told

    def forget_quiet(self):
        """Drop the keys with nothing held back, so an attacker cycling
        through addresses cannot grow the table without end; if all of them
        hold something back, start afresh (their counts are lost, not the
        program)."""
        for key in [k for k, entry in self.keys.items() if not entry[2]]:
            del self.keys[key]
        if len(self.keys) >= MAX_KEYS:
            self.keys.clear()

    def refund(self, key):
        """Give back what allow() took from `key` (what it counted cost nothing)."""
        entry = self.refill(key)
        entry[0] = min(self.burst, entry[0] + 1.0)

    def refill(self, key):
        now = self.clock()
        entry = self.keys.get(key)
        if entry is None:
            entry = self.keys[key] = [self.burst, now, 0]
        entry[0] = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        entry[1] = now
        return entry


def as_accepted(address):
    """accept()'s address with an IPv4 client of a socket on "::" as the
    IPv4 address it is: ("::ffff:10.0.0.7", port) was written so in the
    logs and the audit, and was not loopback to read_access=local."""
    if address[0].startswith("::ffff:") and "." in address[0]:
        return (address[0][len("::ffff:"):],) + tuple(address[1:2])
    return address


def address_key(address):
    """Whose connection this is, for a limit per address: an IPv4 address,
    or an IPv6 address's /64."""
    if ":" not in address:     # accept()'s IPv4 is written one way already (and 10x quicker)
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network("%s/%d" % (ip, IPV6_PREFIX), strict=False))


class NewConnections:
    """New connections per address (its address_key), for a server to whom each
    costs real work before anyone has proved anything: a TLS handshake was
    ~0.9 ms of rc-server's one loop, ~2.5 ms of rc-files' CPU, and a
    stranger made 540 a second from one address. `burst` at once (a fleet
    behind one NAT, back together after a restart), then a twentieth of it
    a second; 0: no limit. Not thread-safe: the accepting thread alone."""

    def __init__(self, burst, clock=time.monotonic):
        self.limit = burst
        self.throttle = Throttle(burst * 60.0 / NEW_CONNECTIONS_REFILL_SECONDS, burst,
                                 clock) if burst else None

    def admit(self, address, log_limited):
        """The key of a connection just accepted from `address` when it may
        be served (it is counted); None when it must be closed now, which
        `log_limited` (a LimitedLog) writes a few a minute per address."""
        key = address_key(address)
        if self.allow(key):
            return key
        log_limited("warning", "too_many_new_connections", key, address=key, limit=self.limit)
        return None

    def allow(self, key):
        """Whether a connection from `key` (address_key) may be served; it is counted."""
        return self.throttle is None or self.throttle.allow(key) is not None

    def give_back(self, key):
        """A connection allow() counted, closed before any work."""
        if self.throttle is not None:
            self.throttle.refund(key)


class LimitedLog:
    """A program's log for lines a hostile peer or row could repeat at will:
    a few a minute per event and key, the next one saying how many were
    held back (`suppressed`). Safe to call from several threads (rc-web's)."""

    def __init__(self, log, per_minute=6, burst=None):
        self.log = log
        self.throttle = Throttle(per_minute, burst)
        self.lock = threading.Lock()

    def __call__(self, level, event, key, /, **fields):
        if self.admit(event, key, fields):
            self.log.log(level, event, **fields)

    def admit(self, event, key, fields):
        """Whether the line may be written now (`fields` then hold the count
        of those held back before it, as `suppressed`), for a caller that
        writes it later (rc-server's notes, once its turn has committed)."""
        with self.lock:
            held = self.throttle.allow((event, key))
        if held:
            fields["suppressed"] = held
        return held is not None


class TokenBucket:
    """`rate` a second, bursts of `burst`: take() spends and says what is
    left, below 0 when overdrawn (rc-server's limits of one connection)."""
    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate, burst, now):
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def take(self, count, now):
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate) - count
        self.at = now
        return self.tokens


class Spaced:
    """A write per key at most every `gap` seconds, for frames a device may
    send faster than its worker does (task_output, task_progress): what
    comes sooner waits here, merged into what waited (`merge(held, new)`,
    by default the newer), and due() gives it back once its gap has passed.
    The database pays for one write a gap whatever is sent, and the last
    word is written."""

    def __init__(self, gap, merge=lambda held, new: new):
        self.gap, self.merge = gap, merge
        self.held = {}       # key -> what waits
        self.written = {}    # key -> when it was last written (monotonic)

    def add(self, key, value, now):
        """A frame's value; the writes it makes due now: [(key, value)] or []."""
        self.held[key] = self.merge(self.held[key], value) if key in self.held else value
        return self.due(now, [key])

    def due(self, now, keys=None):
        """The writes due now, of every key or of `keys`; a key written a gap
        ago and quiet since is forgotten (the table holds one gap's keys)."""
        writes = []
        for key in list(self.held) if keys is None else keys:
            if now - self.written.get(key, now - self.gap) >= self.gap:
                self.written[key] = now
                writes.append((key, self.held.pop(key)))
        if keys is None:
            self.written = {key: when for key, when in self.written.items()
                            if now - when < self.gap}
        return writes


class WrongProofs:
    """Wrong proofs per key (an address, or an address and a device id) in
    the last `window` seconds; a key with `limit` of them is shut out until
    they age. rc-server and rc-files both keep one. A key is forgotten once
    its proofs have aged, at the first add() a window after the last look at
    them all: a stranger whose every attempt comes from a new address (127.x
    on the main node, an IPv6 /64's) grew rc-server ~560 bytes an attempt,
    for good."""

    def __init__(self, limit, window=60.0, clock=time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self.times = {}      # key -> monotonic times of recent wrong proofs, oldest first
        self.next_sweep = clock() + window

    def add(self, key):
        now = self.clock()
        if now >= self.next_sweep:
            since = now - self.window
            self.times = {k: times for k, times in self.times.items() if times[-1] > since}
            self.next_sweep = now + self.window
        self.times.setdefault(key, []).append(now)

    def shut_out(self, key):
        since = self.clock() - self.window
        recent = [t for t in self.times.get(key, ()) if t > since]
        if recent:
            self.times[key] = recent
        else:
            self.times.pop(key, None)     # the table holds only the last minute's keys
        return len(recent) >= self.limit
