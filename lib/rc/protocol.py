"""The wire protocol between rc-server and workers: framing, envelopes and
the mutual HMAC proof of the join token. docs/protocol.md describes it for
people; bin/worker.py implements the other side with the standard library."""
import hashlib
import hmac
import json
import json.scanner
import math
import secrets
import time

import orjson

from rc.bounded import LARGEST as INT64_MAX
from rc.bounded import SMALLEST as INT64_MIN
from rc.states import MAX_FRAME_BYTES

MAIN_NODE_ID = "main"
# INT64_MIN..INT64_MAX is what SQLite can hold in an INTEGER column (one
# range for the wire, HTTP and the CLI: lib/rc/bounded.py): a larger int
# raises OverflowError in the middle of a transaction, so none gets past
# decode() or field().
# orjson reads integers up to 2**64 - 1 exactly (larger ones, and negative
# ones past INT64_MIN, become floats): only a run of 19 or more digits can
# be out of range, so only a frame holding one is walked. Found by mapping
# every digit to "0" and every other byte to " " and looking for 19 zeros:
# a regular expression took 13 ns a byte, 1.8 ms for a 140 KB frame with a
# base64 file in it (docs/protocol.md, "Small files"); this takes under 2.
DIGITS_ONLY = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
LONG_DIGIT_RUN = b"0" * 19


def has_long_digit_run(line):
    return LONG_DIGIT_RUN in line.translate(DIGITS_ONLY)


class ProtocolError(Exception):
    """A peer sent something the protocol does not allow; the message says what."""


def new_nonce():
    return secrets.token_hex(16)


def worker_proof(token, server_nonce, worker_nonce, device_id):
    """What a worker sends to show it knows the join token."""
    return _sign(token, "rc-worker", server_nonce, worker_nonce, device_id)


def server_proof(token, server_nonce, worker_nonce, device_id):
    """What the main node sends back to show it knows the token too."""
    return _sign(token, "rc-server", server_nonce, worker_nonce, device_id)


def _sign(token, role, server_nonce, worker_nonce, device_id):
    message = "|".join((role, server_nonce, worker_nonce, device_id)).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def seal(token, server_nonce, worker_nonce, device_id, secret):
    """The device's own secret (64 hex digits) as it crosses the wire: XORed
    with a pad only holders of the join token can make, from this
    connection's nonces, so a listener learns nothing from it."""
    pad = bytes.fromhex(_sign(token, "rc-seal", server_nonce, worker_nonce, device_id))
    return bytes(a ^ b for a, b in zip(bytes.fromhex(secret), pad)).hex()


unseal = seal     # XOR with the same pad undoes it


def new_device_secret():
    return secrets.token_hex(32)


def proofs_match(expected, given):
    return isinstance(given, str) and hmac.compare_digest(expected, given)


def encode(message_type, data, sender_id=MAIN_NODE_ID, target_id=None):
    """One frame: the envelope as a JSON line (raw bytes that follow it, if
    its data says "inline_bytes", are the caller's to send)."""
    envelope = {"message_type": message_type, "sender_id": sender_id,
                "timestamp": time.time(), "message_id": secrets.token_hex(8),
                "data": data}
    if target_id is not None:
        envelope["target_id"] = target_id
    frame = orjson.dumps(envelope, option=orjson.OPT_APPEND_NEWLINE)
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("frame of %d bytes is over the %d byte limit"
                            % (len(frame), MAX_FRAME_BYTES))
    return frame


def decode(line):
    """The envelope in one received line, checked for shape.

    orjson refuses what JSON does not allow (NaN, Infinity, invalid UTF-8,
    lone surrogates, numbers out of range); a second, stdlib parse refuses
    duplicate keys, which orjson would silently resolve to the last one.
    That parse is left out for a line that is byte for byte what orjson
    writes of what it read (as a worker's frames nearly always are): a text
    with a key twice in an object cannot be the writing of a dict. The
    writing costs ~1 us, the parse ~13 for a task_result here."""
    try:
        envelope = orjson.loads(line)
        if not written_as_read(envelope, line):
            _find_duplicate_keys(line.decode("utf-8").lstrip(JSON_SPACE), 0)
    except (orjson.JSONDecodeError, ValueError) as e:
        raise ProtocolError("frame is not valid JSON: %s" % str(e)[:200])
    except RecursionError:
        raise ProtocolError("frame is nested too deeply")
    if not isinstance(envelope, dict):
        raise ProtocolError("frame must be a JSON object")
    if not isinstance(envelope.get("message_type"), str):
        raise ProtocolError("frame has no message_type")
    if not isinstance(envelope.get("data", {}), dict):
        raise ProtocolError("data must be an object")
    if has_long_digit_run(line):
        check_numbers(envelope, "frame")
    envelope.setdefault("data", {})
    return envelope


def written_as_read(value, line):
    """Whether orjson writes `value` (what it read from `line`) as `line`."""
    try:
        return orjson.dumps(value) == line
    except orjson.JSONEncodeError:      # nested past orjson's writing depth
        return False


# A frame whose data holds "inline_bytes": N is followed on the wire by N
# raw bytes, its small files (docs/protocol.md, "Small files"); a line that
# holds this may be one, so no line after it is split off before it is read.
INLINE_MARK = b'"inline_bytes":'


def check_numbers(value, where):
    """ProtocolError naming the first number in `value` (a decoded JSON
    value) that SQLite cannot hold: an int outside signed 64 bits, a float
    that is not finite. Iterative: the walk has no depth limit to reach."""
    pending = [(value, where)]
    while pending:
        value, where = pending.pop()
        if isinstance(value, dict):
            pending.extend((item, "%s.%s" % (where, str(key)[:50])) for key, item in value.items())
        elif isinstance(value, list):
            pending.extend((item, "%s[%d]" % (where, n)) for n, item in enumerate(value))
        else:
            check_number(value, where)


def check_number(value, where, low=INT64_MIN, high=INT64_MAX):
    """`value` itself when it is a number within [low, high] (finite, for a
    float), or not a number at all; ProtocolError naming `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError("%s is %r: numbers must be finite" % (where, value))
    if not low <= value <= high:
        raise ProtocolError("%s is %s, outside %s to %s" % (where, _short(value), low, high))
    return value


def _short(number):
    text = repr(number)
    return text if len(text) <= 40 else text[:20] + "..." + text[-10:]


def _no_duplicate_keys(pairs):
    if len(dict(pairs)) != len(pairs):
        raise ValueError("duplicate key in an object")
    return None     # the value is not used: orjson's parse is the one kept


# The C scanner inside json.loads, called directly: the line is already known
# to be one valid JSON value, so json.loads' own checks around it (and a new
# decoder for every call) would only triple the cost of every frame.
_find_duplicate_keys = json.scanner.make_scanner(
    json.JSONDecoder(object_pairs_hook=_no_duplicate_keys))
JSON_SPACE = " \t\n\r"


def storable(value, what):
    """`value` as the JSON text the database will hold, or ProtocolError
    (orjson refuses nesting deeper than 254, which JSON itself allows)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as e:
        raise ProtocolError("%s cannot be stored: %s" % (what, e))


def split_frames(buffer, limit=MAX_FRAME_BYTES):
    """Complete lines taken off the front of a bytearray, which keeps the
    rest; none after a line that holds INLINE_MARK (raw bytes may follow it).

    Raises ProtocolError when a line, complete or not, is over `limit` bytes."""
    lines = []
    start = 0
    while True:
        end = buffer.find(b"\n", start)
        if end < 0:
            break
        if end - start > limit:
            raise ProtocolError("frame over the %d byte limit" % limit)
        lines.append(bytes(buffer[start:end]))
        start = end + 1
        if INLINE_MARK in lines[-1]:
            del buffer[:start]
            return lines
    del buffer[:start]
    if len(buffer) > limit:
        raise ProtocolError("frame over the %d byte limit" % limit)
    return lines


def field(data, name, kind, required=True, default=None, low=INT64_MIN, high=INT64_MAX):
    """data[name] checked to be of `kind` (a type or tuple of types); a
    number also to lie within [low, high] (by default, what SQLite holds)."""
    if name not in data:
        if required:
            raise ProtocolError("missing field %r" % name)
        return default
    value = data[name]
    if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
        raise ProtocolError("field %r has the wrong type" % name)
    if not isinstance(value, kind):
        raise ProtocolError("field %r has the wrong type" % name)
    return check_number(value, "field %r" % name, low, high)


def _as_tuple(kind):
    return kind if isinstance(kind, tuple) else (kind,)
