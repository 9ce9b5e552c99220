"""Blob files with no row (lib/rc/files.py drop_orphan_blobs): what a crash
between placing a blob and committing its row leaves in var/files/. The
reaper's files sweep removes them once they are an hour old, looking
through 16 of the 256 directories a sweep, on a real store and database."""
import hashlib
import io
import os
import time

import pytest

from rc import files


class Crash(Exception):
    """The process dies here."""


def stored_without_row(config, connection, data, monkeypatch):
    """A blob stored as rc-files stores one, up to a crash between the
    rename into place and its row."""
    def crash(*args, **kwargs):
        raise Crash()
    with monkeypatch.context() as patch:
        patch.setattr(files, "record", crash)
        with pytest.raises(Crash):
            files.store_stream(connection, config, io.BytesIO(data), len(data))
    digest = hashlib.sha256(data).hexdigest()
    path = files.blob_path(config, digest)
    assert os.path.exists(path) and not files.exists(connection, digest)
    return digest, path


def age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def sweep_round(connection, config, now=None):
    """Sweeps enough for every directory to be looked through once."""
    rounds = 256 // files.ORPHAN_BLOB_DIRS
    return sum(files.sweep(connection, config, now or time.time()) for _ in range(rounds))


def test_a_blob_left_without_its_row_goes_after_an_hour(cluster_home, monkeypatch):
    config, connection = cluster_home
    orphan, orphan_path = stored_without_row(config, connection, b"crashed before its row",
                                             monkeypatch)
    recent, recent_path = stored_without_row(config, connection, b"its row is on its way",
                                             monkeypatch)
    kept, _ = files.store_stream(connection, config, io.BytesIO(b"stored whole"), 12)
    kept_path = files.blob_path(config, kept)
    age(orphan_path, files.ORPHAN_BLOB_AGE + 60)
    age(kept_path, files.ORPHAN_BLOB_AGE + 60)
    age(recent_path, files.ORPHAN_BLOB_AGE - 60)
    assert sweep_round(connection, config) == 1
    assert not os.path.exists(orphan_path)
    assert os.path.exists(recent_path)              # younger than an hour: left alone
    assert os.path.exists(kept_path) and files.exists(connection, kept)
    assert os.listdir(files.partial_dir(config)) == []
    # Once an hour old, the other goes too; the stored one stays.
    age(recent_path, files.ORPHAN_BLOB_AGE + 1)
    assert sweep_round(connection, config) == 1
    assert not os.path.exists(recent_path) and os.path.exists(kept_path)


def test_a_sweep_looks_through_a_sixteenth_of_the_store(cluster_home, monkeypatch):
    config, connection = cluster_home
    _, path = stored_without_row(config, connection, b"orphan", monkeypatch)
    age(path, files.ORPHAN_BLOB_AGE + 60)
    sweeps = 0
    while os.path.exists(path):
        files.sweep(connection, config, time.time())
        sweeps += 1
        assert sweeps <= 256 // files.ORPHAN_BLOB_DIRS
    assert 1 <= sweeps


def test_a_blob_placed_again_while_it_is_removed_is_put_back(cluster_home, monkeypatch):
    """Found old and rowless, but by the time it is moved aside another
    upload has put the same bytes there (a new file) and is about to write
    its row: that file is put back, not removed."""
    config, connection = cluster_home
    digest, path = stored_without_row(config, connection, b"uploaded again", monkeypatch)
    found = os.lstat(path).st_ino
    with open(path + ".new", "wb") as f:
        f.write(b"uploaded again")
    os.replace(path + ".new", path)                 # as Writer.place puts a blob in place
    assert files.remove_orphan(config, os.path.dirname(path), digest, found) == 0
    with open(path, "rb") as f:
        assert f.read() == b"uploaded again"
    assert os.listdir(files.partial_dir(config)) == []


def same_directory(count, prefix="ab"):
    """`count` distinct bytes whose SHA-256 begins with `prefix`: blobs of one directory."""
    found, number = [], 0
    while len(found) < count:
        data = b"blob %d" % number
        if hashlib.sha256(data).hexdigest().startswith(prefix):
            found.append(data)
        number += 1
    return found


def test_a_directory_of_many_old_blobs_is_looked_through_in_chunks(cluster_home, monkeypatch):
    """More old blobs in one directory than one query names (SWEEP_CHUNK):
    the ones with rows stay, the ones without go."""
    config, connection = cluster_home
    monkeypatch.setattr(files, "SWEEP_CHUNK", 3)
    datas = same_directory(10)
    kept = [files.store_stream(connection, config, io.BytesIO(data), None)[0]
            for data in datas[:7]]
    orphans = [stored_without_row(config, connection, data, monkeypatch)[1]
               for data in datas[7:]]
    directory = os.path.dirname(orphans[0])
    for name in os.listdir(directory):
        age(os.path.join(directory, name), files.ORPHAN_BLOB_AGE + 60)
    monkeypatch.setattr(files, "_orphan_blobs_checked_to", [0xab])
    assert files.drop_orphan_blobs(connection, config, time.time()) == 3
    assert sorted(os.listdir(directory)) == sorted(kept)


def test_each_reaper_starts_its_round_of_directories_at_a_random_one():
    """A reaper restarted more often than a round of 16 sweeps takes must
    not look through the first directories only: each process starts at a
    random one (all four equal by chance: 1 in 256**3)."""
    import subprocess
    import sys
    code = "from rc import files; print(files._orphan_blobs_checked_to[0])"
    starts = {subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE,
                             universal_newlines=True).stdout.strip() for _ in range(4)}
    assert len(starts) > 1, starts
