"""Names shared by every program and by the worker.

This module imports nothing, so it can be read by anything. `bin/worker.py`
keeps its own copy of the wire-level names (it must stay one file);
tests/test_shared_definitions.py checks that the two agree.
"""

PROTOCOL_VERSION = 1

# A frame is one JSON object on one line; anything longer is an error.
MAX_FRAME_BYTES = 1024 * 1024

# -- task states ---------------------------------------------------------------
QUEUED = "queued"
ASSIGNED = "assigned"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"

TASK_STATES = (QUEUED, ASSIGNED, RUNNING, COMPLETED, FAILED, TIMED_OUT, CANCELLED)
TERMINAL_STATES = (COMPLETED, FAILED, TIMED_OUT, CANCELLED)
# States in which a task holds one of its device's slots.
ACTIVE_STATES = (ASSIGNED, RUNNING)

# -- priorities: higher number runs first ---------------------------------------
PRIORITIES = {"low": 0, "normal": 1, "high": 2, "urgent": 3}
PRIORITY_NAMES = {number: name for name, number in PRIORITIES.items()}

# -- task types the worker knows ----------------------------------------------
TASK_TYPES = ("echo", "sleep", "system_info", "python_eval", "python_exec", "shell")
# Types the worker runs inside itself in microseconds: they take no slot, so
# a device busy with long tasks still answers them at once.
INSTANT_TASK_TYPES = ("echo", "system_info")
# The one payload field each type takes from the command line (None: no argument).
PAYLOAD_FIELD = {"echo": "message", "sleep": "seconds", "system_info": None,
                 "python_eval": "expression", "python_exec": "code",
                 "shell": "command"}
# What one without the admin token sees in place of each of a task's --env
# values (lib/rc/records.py, docs/security.md): a secret given with --env is
# for the task and the admin, not for everyone who may read the cluster.
# Never a value a task is given (tasks.check_env refuses it).
WITHHELD = "(withheld)"

# -- device states -------------------------------------------------------------
ONLINE = "online"
OFFLINE = "offline"
DEVICE_STATES = (ONLINE, OFFLINE)

# -- message types on the wire ---------------------------------------------------
HELLO = "hello"                    # server -> worker: challenge nonce
REGISTER = "register"              # worker -> server: identity, proof, profile
REGISTER_ACK = "register_ack"      # server -> worker: server's proof, settings
HEARTBEAT = "heartbeat"            # worker -> server: metrics, active tasks
HEARTBEAT_ACK = "heartbeat_ack"
TASK_ASSIGN = "task_assign"        # server -> worker
TASK_ACCEPT = "task_accept"        # worker -> server: started running it
TASK_PROGRESS = "task_progress"    # worker -> server
TASK_RESULT = "task_result"        # worker -> server
TASK_RESULT_ACK = "task_result_ack"  # server -> worker: result is committed
TASK_CANCEL = "task_cancel"        # server -> worker
ERROR = "error"                    # either way; the sender may then close
CONTROL = "control"                # server -> worker: reload, report_profile, drain, upgrade
CONTROL_ACK = "control_ack"        # worker -> server: done, or why not
PING = "ping"                      # server -> worker: a quiet connection; answer now
PONG = "pong"                      # worker -> server: the answer (carries the ping's nonce)
LEASE_CHECK = "lease_check"        # worker -> server: which of these attempts are still mine?
LEASE_CHECK_ACK = "lease_check_ack"  # server -> worker: those that are, and those that are not
DEVICE_LOG = "device_log"          # worker -> server: its warnings, errors and task events
WATCH = "watch"                    # server -> worker: someone watches; heartbeat more often
MAIN_STOPPING = "main_stopping"    # server -> worker: a graceful stop; your tasks are held
TASK_WATCH = "task_watch"          # server -> worker: send this attempt's output as it comes
TASK_OUTPUT = "task_output"        # worker -> server: what a watched task's stream added

MESSAGE_TYPES = (HELLO, REGISTER, REGISTER_ACK, HEARTBEAT, HEARTBEAT_ACK,
                 TASK_ASSIGN, TASK_ACCEPT, TASK_PROGRESS, TASK_RESULT,
                 TASK_RESULT_ACK, TASK_CANCEL, ERROR, CONTROL, CONTROL_ACK,
                 PING, PONG, LEASE_CHECK, LEASE_CHECK_ACK, DEVICE_LOG, WATCH,
                 MAIN_STOPPING, TASK_WATCH, TASK_OUTPUT)

# -- why a task attempt ended, as the worker reports it -----------------------
# These are the outcomes a worker puts in task_result's "status".
OUTCOME_COMPLETED = COMPLETED
OUTCOME_FAILED = FAILED
OUTCOME_TIMED_OUT = TIMED_OUT
OUTCOME_CANCELLED = CANCELLED
OUTCOME_NOT_ALLOWED = "not_allowed"
OUTCOME_HANDED_BACK = "handed_back"   # the device became unavailable and gave it back
OUTCOMES = (OUTCOME_COMPLETED, OUTCOME_FAILED, OUTCOME_TIMED_OUT,
            OUTCOME_CANCELLED, OUTCOME_NOT_ALLOWED, OUTCOME_HANDED_BACK)

# -- small files on the worker connection (docs/protocol.md, "Small files") ------
# A task's input or output this small or smaller may ride right behind its
# task_assign or task_result, as raw bytes the frame announces, instead of
# a round trip to rc-files; one message carries at most INLINE_TOTAL_BYTES
# of them.
INLINE_FILE_BYTES = 256 * 1024
INLINE_TOTAL_BYTES = 512 * 1024
INLINE_MAX_FILES = 1000       # files one task_result carries at most (the rest: rc-files)
# Outputs one attempt uploads (the worker), or stores (rc-files), at most:
# empty files cost the quota nothing, yet each is a row of task_files.
FILES_MAX_OUTPUTS = 1000
# Bytes of a stream one task_output carries at most: the latest, when a
# watched task wrote more between two of them (lib/rc/tails.py).
TAIL_BYTES = 64 * 1024
