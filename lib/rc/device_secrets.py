"""Device secrets at rest: sealed with a key the database never holds.

A joined device proves its own secret with an HMAC on fresh nonces, so
rc-server must be able to recover the secret itself; kept in clear, any
copy of rc.db (a backup, a file left readable) would let its holder log in
as every device. So each secret is stored sealed: XORed with the pad
HMAC-SHA256(device_key, nonce || device_id), with a fresh random nonce per
device, and tagged with a second HMAC so that a seal made with another key
(or tampered with) is recognised rather than turned into a wrong secret.

device_key is var/device_key: 32 random bytes in hex, owner-only, made at
init, never written to the database or a backup. A database copy without
that file holds nothing that proves a device. A seal this node cannot open
(a backup restored onto another main node) counts as no secret: rc-server
answers `unknown_device` and the worker joins again with the join token.
hmac and hashlib only: no cryptography dependency for this.
"""
import hashlib
import hmac
import os
import secrets

from rc import db

KEY_FILE = "device_key"       # in the state directory, beside the join token
KEY_BYTES = 32
NONCE_BYTES = 16
TAG_BYTES = 16                # enough to tell a wrong key from the right one
SECRET_BYTES = 32             # protocol.new_device_secret(): 64 hex digits


class DeviceKeyError(Exception):
    """var/device_key cannot be used; the message says why and what to do."""


def key_path(config):
    return os.path.join(config.home, KEY_FILE)


def ensure_key(config):
    """The device key, made once (owner-only; O_EXCL, so two starts at once
    cannot both write one) and never overwritten."""
    path = key_path(config)
    os.makedirs(config.home, mode=0o700, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key(path)
    with os.fdopen(descriptor, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    return read_key(path)


def read_key(path):
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise DeviceKeyError("%s is not %d hex digits; restore it from where you keep a copy,"
                             " or delete it and have every device join again"
                             % (path, 2 * KEY_BYTES))
    return key


def _hmac(key, label, *parts):
    message = label + b"|" + b"|".join(parts)
    return hmac.new(key, message, hashlib.sha256).digest()


def seal(key, device_id, secret):
    """The secret (hex) as the database keeps it: nonce.ciphertext.tag, in hex."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    plain = bytes.fromhex(secret)
    pad = _hmac(key, b"rc-device-seal", nonce, device_id.encode())
    sealed = bytes(a ^ b for a, b in zip(plain, pad))
    tag = _hmac(key, b"rc-device-tag", nonce, device_id.encode(), sealed)[:TAG_BYTES]
    return ".".join(part.hex() for part in (nonce, sealed, tag))


def unseal(key, device_id, stored):
    """The secret (hex), or None when `stored` is empty, malformed, or was
    sealed with another key or for another device."""
    try:
        nonce, sealed, tag = (bytes.fromhex(part) for part in stored.split("."))
    except (AttributeError, ValueError):
        return None
    if len(nonce) != NONCE_BYTES or len(sealed) != SECRET_BYTES:
        return None
    expected = _hmac(key, b"rc-device-tag", nonce, device_id.encode(), sealed)[:TAG_BYTES]
    if not hmac.compare_digest(expected, tag):
        return None
    pad = _hmac(key, b"rc-device-seal", nonce, device_id.encode())
    return bytes(a ^ b for a, b in zip(sealed, pad)).hex()


def seal_clear_secrets(connection, key):
    """Seal the secrets an older version kept in clear (devices.secret) and
    clear that column; returns how many. Idempotent: runs at every init and
    rc-server start, and finds nothing once done.

    Clearing a column leaves the old bytes in SQLite's free space (and the
    WAL), so when there was anything to seal the file is rebuilt (VACUUM)
    and the WAL truncated: afterwards no byte of rc.db holds a clear secret."""
    with db.write(connection):
        rows = connection.execute("SELECT device_id, secret, sealed_secret, revoked FROM devices"
                                  " WHERE secret IS NOT NULL").fetchall()
        for row in rows:
            keep = not row["revoked"] and row["sealed_secret"] is None and _is_secret(row["secret"])
            connection.execute("UPDATE devices SET secret = NULL, sealed_secret = ?"
                               " WHERE device_id = ?",
                               (seal(key, row["device_id"], row["secret"]) if keep
                                else row["sealed_secret"], row["device_id"]))
    if rows:
        connection.execute("VACUUM")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return len(rows)


def _is_secret(text):
    try:
        return len(bytes.fromhex(text)) == SECRET_BYTES
    except (TypeError, ValueError):
        return False


def unopenable(connection, key):
    """Device ids whose stored seal this key cannot open: they join again
    with the join token (a backup restored onto another main node)."""
    return [row[0] for row in connection.execute(
        "SELECT device_id, sealed_secret FROM devices WHERE sealed_secret IS NOT NULL")
        if unseal(key, row[0], row[1]) is None]


def prepare(config, connection):
    """At start: the key (made if missing), and no clear secret left in the
    database; returns (key, how many were sealed now)."""
    key = ensure_key(config)
    return key, seal_clear_secrets(connection, key)
