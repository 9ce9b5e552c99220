"""attack33: what session 32 added (the restart hold, Idempotency-Key on
POST /api/v1/tasks), attacked by a device gone bad and a client that
reuses its keys. Each test failed before the fix its docstring names."""
import io
import threading
import time

from cluster_harness import wait_for
from rc import config as config_module
from rc import db, fleet, state_dir
from rc.log import Logger
from rc.server import Server
from test_restart_hold_s32 import frames_until_closed
from test_server import Client, token_of


# -- the restart hold: only for a device the main node still trusts ---------------------

def test_a_graceful_stop_holds_no_device_revoked_or_forgotten_meanwhile(tmp_path):
    """`rc forget` (or `rc revoke`) commits, and rc-server stops before its
    next look hangs up on the device (refuse_revoked, at most a turn
    later; here never): the forgotten device's tasks are queued again
    already, so a hold would have its worker run them on for restart_hold
    beside their next attempt, and rc-reaper leave the device alone. It is
    neither held nor told; the device beside it is both. Before: both were
    (main_stopping to the forgotten one, held_until written for it)."""
    config = config_module.load(environ={"RC_HOME": str(tmp_path)})
    config.tcp_host, config.tcp_port, config.tls = "127.0.0.1", 0, False
    config.device_secrets, config.restart_hold = False, 120.0
    state_dir.init(config)
    instance = Server(config, Logger("rc-server", "debug", io.BytesIO()))
    instance.refuse_revoked = lambda: None      # the stop comes before that look
    thread = threading.Thread(target=instance.run)
    thread.start()
    try:
        port = wait_for(lambda: getattr(instance, "listener", None)
                        and instance.listener.getsockname()[1], 10, "rc-server listening")
        token = token_of(instance)
        kept, forgotten, revoked = Client(port), Client(port), Client(port)
        for client, name in ((kept, "kept"), (forgotten, "forgotten"), (revoked, "revoked")):
            assert client.register(token, name, restart_hold=True)["message_type"] \
                == "register_ack"
        writer = db.open_database(config.db_path)
        fleet.forget(writer, config, "forgotten")
        with db.write(writer):
            writer.execute("UPDATE devices SET revoked = 1 WHERE device_id = 'revoked'")
    finally:
        instance.stop()
        thread.join(30)
    told = {name: [f["message_type"] for f in frames_until_closed(client)]
            for client, name in ((kept, "kept"), (forgotten, "forgotten"),
                                 (revoked, "revoked"))}
    assert told["kept"][-1:] == ["main_stopping"], told
    assert "main_stopping" not in told["forgotten"] + told["revoked"], told
    held = dict(writer.execute("SELECT device_id, held_until FROM devices").fetchall())
    assert held["kept"] is not None
    assert held["forgotten"] is None and held["revoked"] is None, held
    writer.close()
    instance.database.close()
