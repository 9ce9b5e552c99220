"""The state directory (var/ by default): made once at install, kept after.

It holds the database, the logs, supervisord's socket and pid, and the two
secrets: the join token workers prove they know, and the admin token that
every HTTP request that changes the cluster must carry (a device holding the
join token cannot drive the cluster), and the key device secrets are sealed
with (lib/rc/device_secrets.py). Secrets are made once and never overwritten.

Everything in it is the owner's alone: files 0600, directories 0700. Every
main-node program sets PRIVATE_UMASK as it starts (so do supervisord, for
the logs it opens, and init), and init takes group and other bits off what
an older version left readable."""
import os
import secrets
import stat

from rc import db, device_secrets, tls

PRIVATE_UMASK = 0o077        # no group or other bits on anything we create


def keep_files_private():
    """From now on this process creates files and directories owner-only;
    returns the umask it had (the user's, for files made outside var/)."""
    return os.umask(PRIVATE_UMASK)


def init(config):
    """Create what a fresh cluster needs, and bring an older one up to date
    (schema, sealed device secrets, file modes); harmless to run again.
    Returns what it changed, for `rc init` to say."""
    previous = os.umask(PRIVATE_UMASK)
    try:
        for directory in (config.home, os.path.dirname(config.db_path), config.log_dir,
                          config.run_dir):
            os.makedirs(directory, exist_ok=True)
        changed, failed = make_private(config.home)     # first, whatever fails below
        # An install from before the admin token had the same secret as web_token.
        old = os.path.join(config.home, "web_token")
        if os.path.exists(old) and not os.path.exists(config.admin_token_path):
            os.rename(old, config.admin_token_path)
        for path in (config.token_path, config.admin_token_path, config.cluster_id_path):
            ensure_secret(path)
        tls.ensure_certificate(config)
        connection = db.open_database(config.db_path)
        try:
            _, sealed = device_secrets.prepare(config, connection)
        finally:
            connection.close()
    finally:
        os.umask(previous)
    return {"secrets_sealed": sealed, "made_private": changed, "not_private": failed}


def make_private(home):
    """Take group and other bits off everything under `home` (an install
    from before they were kept off). Symlinks are neither followed nor
    changed, sockets left alone (their bits mean nothing here); a directory
    is closed before anything in it is looked at. Returns (paths changed,
    [(path, error)] that could not be)."""
    changed, failed = [], []
    _make_private(home, changed, failed)
    for directory, names, files in os.walk(home):     # top-down; links not followed
        for name in names + files:
            _make_private(os.path.join(directory, name), changed, failed)
    return changed, failed


def _make_private(path, changed, failed):
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode) or not mode & 0o077:
            return
        os.chmod(path, stat.S_IMODE(mode) & ~0o077)
        changed.append(path)
    except FileNotFoundError:
        pass       # gone meanwhile (a program's temporary file)
    except OSError as e:
        failed.append((path, e.strerror or str(e)))


def rotate_token(config, path=None):
    """A new join token (or the secret at `path`: the admin token). Devices
    that have joined prove their own secrets, so they keep working; only
    new joins need the new token."""
    path = path or config.token_path
    token = new_secret()
    temporary = path + ".new"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(token + "\n")
    os.replace(temporary, path)     # never half a token on disk
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
