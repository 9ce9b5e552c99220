"""Stop 43's attack on issues 18 and 19's newest surfaces (the file store
and transfer, the client interfaces) as a LAN stranger, as a holder of the
admin token sending the worst of every value, as a device that lies and as
a task's own code. One shared cluster: the good worker alone."""
import http.client
import json
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_harness import wait_for  # noqa: E402
from test_inline_files import with_the_good_worker  # noqa: E402
from rc import web_results  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from with_the_good_worker(tmp_path_factory.mktemp("hostile-s43"))


def admin_token(cluster):
    return open(cluster.config.admin_token_path).read().strip()


def post(cluster, path, value, timeout=60):
    connection = http.client.HTTPConnection("127.0.0.1", cluster.config.web_port,
                                            timeout=timeout)
    try:
        connection.request("POST", path, json.dumps(value).encode(), {
            "Authorization": "Bearer " + admin_token(cluster),
            "Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), json.loads(answer.read())
    finally:
        connection.close()


def queued_with(cluster, marker):
    return [row[0] for row in cluster.db.execute(
        "SELECT task_id FROM tasks WHERE payload LIKE ?", ("%" + marker + "%",))]


# -- the web terminal's `submit --wait`, many at once ---------------------------------

def test_submit_wait_through_the_command_route_waits_in_a_long_polls_slot(cluster):
    """Before: POST /api/v1/command with `submit ... --wait` held one of
    rc-web's threads for up to 30 s, without the cap GET ...?wait= has:
    60 of them from two addresses held every thread, and /health from a
    third address waited 25 s. Now it takes a long poll's slot (4 from one
    address): the fifth is refused at once, 503, nothing queued for it; so
    is a `tail`, which holds one for up to 3 s."""
    marker = "s43-held-%s" % os.getpid()
    command = {"command": "submit echo %s --require device_id=nobody-here --wait" % marker}
    answers = []
    held = [threading.Thread(target=lambda: answers.append(post(cluster, "/api/v1/command",
                                                                command)))
            for _ in range(web_results.MAX_WAITERS_PER_ADDRESS)]
    for thread in held:
        thread.start()
    try:
        wait_for(lambda: len(queued_with(cluster, marker)) == len(held), 30,
                 "the waiting submits to queue their tasks")
        status, headers, answer = post(cluster, "/api/v1/command", command)
        assert status == 503, (status, answer)
        assert "nothing submitted" in answer["error"] and "GET /api/v1/tasks/ID/result" \
            in answer["error"], answer
        assert headers.get("Retry-After") == "1"
        assert len(queued_with(cluster, marker)) == len(held)
        # `tail` of a running task waits up to 3 s for its first report: a
        # long poll's slot too (a reader's, when read_access is open).
        status, _, answer = post(cluster, "/api/v1/command", {
            "command": "tail %d" % queued_with(cluster, marker)[0]})
        assert status == 503 and "GET /api/v1/tasks/ID/output" in answer["error"], answer
    finally:
        for task_id in queued_with(cluster, marker):
            cluster.rc("cancel", str(task_id))
        for thread in held:
            thread.join()
    assert [status for status, _, _ in answers] == [200] * len(held), answers
    # The slots are given back: the next one waits again (and ends at its cancel).
    status, _, answer = post(cluster, "/api/v1/command", {
        "command": "submit echo %s-after --wait --wait-timeout 30" % marker})
    assert status == 200 and answer["output"] == "%s-after\n" % marker, answer


# -- a device revoked while it holds an rc-files connection ---------------------------

def checkpoint_tar(name, data):
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        member = tarfile.TarInfo(name)
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def test_a_revoked_device_stores_and_reads_nothing_on_a_connection_opened_before(cluster):
    """Before: rc-files looked at `revoked` only when a connection proved
    its device's secret. A device revoked (its secret stolen, say) kept the
    rc-files connection it had opened before, and on it stored a checkpoint
    for the task it had held, which had gone back to the queue: the next
    attempt, on any device, would have started from the revoked device's
    files. Now each request looks again, and the connection is closed."""
    import hashlib
    from test_files_hostile import authenticated, ask
    from test_inline_files import Device
    from rc import files, tasks, transfer
    mallory = Device(cluster, "s43-revoked")
    assign = mallory.take("sleep 60", "--output", "*", "--retries", "3")
    task_id, attempt = assign["task_id"], assign["attempt"]
    sock, reader, welcome = authenticated(cluster, "s43-revoked")
    assert welcome == {"ok": True}
    # A put begun before the revocation, whose bytes come after it.
    slow, slow_reader, welcome = authenticated(cluster, "s43-revoked")
    assert welcome == {"ok": True}
    late = checkpoint_tar("state.pickle", b"sent after the revocation")
    assert ask(slow, slow_reader, {"put": {
        "task_id": task_id, "attempt": attempt, "name": files.CHECKPOINT_NAME,
        "size": len(late), "sha256": hashlib.sha256(late).hexdigest()}}) == \
        {"ok": True, "have": 0}
    try:
        cluster.rc("revoke", "s43-revoked")
        wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "queued", 30,
                 "the revoked device's task to go back to the queue")
        data = checkpoint_tar("state.pickle", b"what the next attempt would unpickle")
        request = {"task_id": task_id, "attempt": attempt, "name": files.CHECKPOINT_NAME,
                   "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                   "whole": True}
        assert len(data) <= transfer.WHOLE_PUT_BYTES
        sock.sendall(json.dumps({"put": request}).encode() + b"\n" + data)
        answer = json.loads(reader.readline())
        assert answer.get("error", {}).get("code") == "unknown_device", answer
        assert reader.readline() == b""         # and the connection is closed
        slow.sendall(late)
        answer = json.loads(slow_reader.readline())
        assert answer.get("error", {}).get("code") == "unknown_device", answer
    finally:
        sock.close()
        slow.close()
        mallory.close()
        cluster.rc("cancel", str(task_id))
    task = tasks.get(cluster.db, task_id)
    assert "checkpoint" not in task["payload"], task["payload"]
    assert [row for row in files.task_files(cluster.db, task_id)
            if row["kind"] == files.CHECKPOINT] == []


# -- outputs of an attempt that did not end the task ----------------------------------

def test_outputs_an_earlier_attempt_left_are_not_the_tasks(cluster):
    """Before: a task's files were, name by name, the latest attempt that
    stored each: a device that put an output (planted.txt, any name its
    globs match) and then let its attempt go (here taken back by `rc drain
    --now`; a dropped connection does it too) had that file served as the
    task's, beside what the attempt that completed it left: `rc get`, `rc
    map --into` and GET .../files/NAME wrote it as the task's output. Now a
    task's outputs and streams are its last attempt's only."""
    import hashlib
    import urllib.error
    import urllib.request
    from test_files_hostile import authenticated, ask
    from test_inline_files import Device, entry
    from rc import files, tasks
    liar = Device(cluster, "s43-liar")
    first = liar.take("true", "--output", "*.txt", "--retries", "3")
    task_id = first["task_id"]
    sock, reader, welcome = authenticated(cluster, "s43-liar")
    try:
        data = b"forged by an attempt that never ended the task\n"
        assert ask(sock, reader, {"put": {
            "task_id": task_id, "attempt": first["attempt"], "name": "planted.txt",
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}) == \
            {"ok": True, "have": 0}
        sock.sendall(data)
        assert json.loads(reader.readline()) == {"ok": True, "stored": True}
    finally:
        sock.close()
    cluster.rc("drain", "s43-liar", "--now")
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "queued", 20,
             "the drained attempt to go back to the queue")
    # It says it stopped, as a worker does: the next attempt need not wait
    # for its last checkpoint (HAND_BACK_CHECKPOINT_WAIT).
    liar.send("task_result", {"task_id": task_id, "attempt": first["attempt"],
                              "status": "cancelled", "error": None,
                              "result": {"output": "", "stderr": "", "exit_code": None}})
    cluster.rc("resume", "s43-liar")
    while True:
        second = liar.next("task_assign")
        if second["task_id"] == task_id:
            break
    assert second["attempt"] > first["attempt"]
    liar.send("task_accept", {"task_id": task_id, "attempt": second["attempt"]})
    wait_for(lambda: tasks.get(cluster.db, task_id)["state"] == "running", 20,
             "the second attempt to run")
    try:
        done = liar.finish(second, [entry("result.txt", b"the attempt that completed\n")])
    finally:
        liar.close()
    assert done["state"] == "completed", done
    outputs = {row["name"]: row["attempt"] for row in files.task_files(cluster.db, task_id)
               if row["kind"] in (files.OUTPUT, files.STREAM)}
    assert outputs == {"result.txt": second["attempt"]}, outputs
    request = urllib.request.Request(
        "http://127.0.0.1:%d/api/v1/tasks/%d/files/planted.txt"
        % (cluster.config.web_port, task_id),
        headers={"Authorization": "Bearer " + admin_token(cluster)})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=20)
    assert refused.value.code == 404


# -- rc get and rc map --into in a shared directory -----------------------------------

def test_rc_get_writes_through_no_link_planted_in_a_folder_of_an_outputs_name(cluster,
                                                                            tmp_path):
    """Before: `rc get ID -o DIR` (and `rc map --into DIR`) made the folders
    of an output's name with os.makedirs and opened the file under them,
    following a link another local user planted in a shared DIR: DIR/sub to
    the user's ~/.ssh, and an output sub/authorized_keys (a name a device
    chooses within the task's globs) was written into ~/.ssh. The last
    part was safe already (O_NOFOLLOW); now each folder is too."""
    from rc import files, files_cli
    victim, shared = tmp_path / "dot-ssh", tmp_path / "shared"
    victim.mkdir()
    shared.mkdir()
    os.symlink(str(victim), str(shared / "sub"))
    source = tmp_path / "from-a-device"
    source.write_bytes(b"ssh-ed25519 AAAA the device's key\n")
    umask = os.umask(0o077)         # as bin/rc stores files: for the owner only
    try:
        digest, size = files.store_path(cluster.db, cluster.config, str(source))
    finally:
        os.umask(umask)
    entry = {"kind": files.OUTPUT, "name": "sub/authorized_keys", "sha256": digest,
             "size": size}
    with pytest.raises(files_cli.FileOptionError) as refused:
        files_cli.write_out(cluster.db, cluster.config, entry, str(shared))
    assert "is a link" in str(refused.value), refused.value
    assert os.listdir(str(victim)) == []
    # Folders that are folders are made or entered as before.
    (shared / "made").mkdir()
    for name in ("made/here/authorized_keys", "new/deep/x.txt", "top.txt"):
        written = files_cli.write_out(cluster.db, cluster.config, dict(entry, name=name),
                                      str(shared))
        assert written == os.path.join(str(shared), name)
        assert open(written, "rb").read() == source.read_bytes()
    assert sorted(os.listdir(str(shared / "made" / "here"))) == ["authorized_keys"]


# -- a task's folder swapped for a link while the worker reads its outputs ------------

def test_an_output_whose_folder_becomes_a_link_after_it_was_checked_is_not_sent(tmp_path):
    """The worker, as root, checks each output (inside the task directory,
    a regular file, none of its own state's, no hard links out) and opens
    it later, O_NOFOLLOW on its last part only. With --task-user USER, the
    tasks of one uid can reach into each other's directories (a cwd kept
    there, all of its folders theirs): one swapped a folder of another's
    output for a link to the worker's state directory between the check
    and the open, and the worker sent its own device secret as that task's
    output. Now the file opened must be the file checked."""
    from test_worker_identity import load_worker_module
    worker = load_worker_module()
    task, state = tmp_path / "task", tmp_path / "state"
    (task / "sub").mkdir(parents=True)
    state.mkdir()
    (task / "sub" / "out.txt").write_bytes(b"the task's output\n")
    (state / "out.txt").write_bytes(b"the device's secret\n")
    protected = {(os.stat(str(state / "out.txt")).st_dev,
                  os.stat(str(state / "out.txt")).st_ino)}
    found, notes = worker.find_outputs(str(task), worker.output_globs({"outputs": ["**"]}),
                                       protected)
    assert [entry[0] for entry in found] == ["sub/out.txt"] and notes == []
    os.rename(str(task / "sub"), str(task / "gone"))          # the other task's swap
    os.symlink(str(state), str(task / "sub"))
    name, path, *checked = found[0]
    read = b""
    try:
        with worker.open_output(path, *checked) as source:    # as Files.upload opens it
            read = source.read()
    except OSError as e:
        assert "replaced" in str(e)
    assert b"secret" not in read
