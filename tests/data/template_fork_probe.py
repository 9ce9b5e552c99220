"""Run by test_spawner with bin/worker.py's path: this process plays the
spawner (a subreaper), its child the template, which forks a task each way
the worker's template can (fork_sibling, answer_through_child); printed:
whose child each task was, as the task saw it and as waitpid finds it."""
import importlib.util, json, os, socket, sys, threading, time
spec = importlib.util.spec_from_file_location("rc_worker_fork", sys.argv[1])
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
report = {"forks_as_sibling": worker.sibling_forker() is not None}


def task(fds):
    # Python works after the fork: a thread starts and ends, the pid is ours.
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    os.write(fds[0], json.dumps([os.getpid(), os.getppid()]).encode())
    os._exit(7)


worker.run_template_child = task


def reaped(pid):
    """The task's wait status, ours to reap: ChildProcessError if it never
    becomes our child. Through a child, it is ours once that go-between has
    exited, which it may not have yet (a busy machine) when the pid comes."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# As the spawner is: the through_child task's parent exits, and it comes to us.
worker.libc_call("prctl", worker.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
for how in ("sibling", "through_child"):
    if how == "sibling" and not report["forks_as_sibling"]:
        continue
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader, writer = os.pipe()
    template = os.fork()
    if template == 0:
        if how == "sibling":
            pid = worker.sibling_forker()()
            if pid == 0:
                task([writer])
            theirs.send(json.dumps({"pid": pid}).encode())
        else:
            worker.answer_through_child(theirs, [writer])
        os._exit(0)
    os.close(writer)
    pid = json.loads(ours.recv(100))["pid"]
    os.waitpid(template, 0)
    seen = json.loads(os.read(reader, 100))
    status = reaped(pid)
    report[how] = {"pid": pid, "seen": seen, "status": os.WEXITSTATUS(status),
                   "me": os.getpid()}
print(json.dumps(report))
