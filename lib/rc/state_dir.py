"""The state directory (var/ by default): made once at install, kept after.

It holds the database, the logs, supervisord's socket and pid, and the two
secrets: the join token workers prove they know, and the admin token that
every HTTP request that changes the cluster must carry (a device holding the
join token cannot drive the cluster). Secrets are files readable by the
owner only, made once and never overwritten."""
import os
import secrets

from rc import db, tls


def init(config):
    """Create what a fresh cluster needs; harmless to run again."""
    for directory in (config.home, os.path.dirname(config.db_path), config.log_dir,
                      config.run_dir):
        os.makedirs(directory, exist_ok=True)
    db.open_database(config.db_path).close()
    # An install from before the admin token had the same secret as web_token.
    old = os.path.join(config.home, "web_token")
    if os.path.exists(old) and not os.path.exists(config.admin_token_path):
        os.rename(old, config.admin_token_path)
    for path in (config.token_path, config.admin_token_path, config.cluster_id_path):
        ensure_secret(path)
    tls.ensure_certificate(config)


def rotate_token(config):
    """A new join token. Devices that have joined prove their own secrets,
    so they keep working; only new joins need the new token."""
    token = new_secret()
    temporary = config.token_path + ".new"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(token + "\n")
    os.replace(temporary, config.token_path)     # never half a token on disk
    return token


def ensure_secret(path):
    if os.path.exists(path):
        return read_secret(path)
    secret = new_secret()
    # O_EXCL: two installs at once cannot both write, and nobody else can read it.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(secret + "\n")
    return secret


# Secrets people copy into a shell or a command line: a fixed prefix, then hex,
# so no shell or argument parser misreads one (token_urlsafe began with "-"
# one time in 64 and could hold "-" and "_" anywhere). Secrets made before
# keep working: they are read and compared as they are.
SECRET_PREFIX = "rc1_"
SECRET_BYTES = 24       # 192 bits


def new_secret():
    return SECRET_PREFIX + secrets.token_hex(SECRET_BYTES)


def read_secret(path):
    with open(path, encoding="utf-8") as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError("%s is empty; delete it and run make install" % path)
    return secret
