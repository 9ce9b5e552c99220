"""Every tunable of the main node, with its unit. `etc/rc.json` may override
any of them by its lower-case name; docs/configuration.md explains each."""

# -- network -----------------------------------------------------------------
TCP_HOST = "0.0.0.0"            # address rc-server listens on for workers
TCP_PORT = 8080                 # port for workers (env RC_TCP_PORT wins)
WEB_HOST = "0.0.0.0"            # address rc-web listens on
WEB_PORT = 5000                 # dashboard and HTTP API port (env RC_WEB_PORT wins)
READ_ACCESS = "local"           # who may read /text, GET /api/v1 and /stream without the
                                # admin token: "open" (anyone), "local" (rc-web's own user
                                # over loopback: another local user or a task needs the
                                # token), "token" (nobody)
ALLOWED_HOSTS = []              # Host names rc-web answers to besides IP addresses,
                                # localhost and this machine's own name
MAX_STREAMS = 24                # /stream/* connections open at once; each holds a thread
WEB_CONNECTION_LIMIT = 200      # connections rc-web holds at once; at it, the oldest idle
                                # one makes way for a new one
WEB_CONNECTIONS_PER_ADDRESS = 32    # connections one address (an IPv6 /64) may hold; more
                                # are refused; 0: no limit (behind a reverse proxy)
WEB_CHANNEL_TIMEOUT = 30.0      # seconds an idle connection (no request) stays open
WEB_READ_TIMEOUT = 20.0         # seconds a request (and a TLS handshake) has to arrive whole
WEB_TLS = False                 # true: the dashboard and HTTP API speak HTTPS only
WEB_TLS_CERT = ""               # PEM certificate (chain) for HTTPS; "": the worker port's,
                                # var/tls/cert.pem
WEB_TLS_KEY = ""                # its PEM private key; "": in WEB_TLS_CERT's file, or
                                # var/tls/key.pem with the worker port's certificate

# -- devices -----------------------------------------------------------------
HEARTBEAT_INTERVAL = 60.0       # seconds between a worker's heartbeats
OFFLINE_TIMEOUT = 300.0         # seconds without a heartbeat before a device is offline
HEARTBEAT_HISTORY = 1440        # heartbeats kept per device (a day at 60 s)
AUTH_TIMEOUT = 10.0             # seconds a new connection has to authenticate
TLS = True                      # TLS on the worker port (certificate in var/tls, pinned
                                # by workers); false: plain TCP
DEVICE_SECRETS = True           # true: a joined device must prove its own secret, and its
                                # id can no longer be claimed with the join token
MAX_UNAUTHENTICATED = 1000      # connections still authenticating at once; past it the
                                # oldest (over 2 s; else the busiest address's oldest)
                                # makes way for a new one
MAX_UNAUTHENTICATED_PER_ADDRESS = 8     # ... of those, from one address
NEW_CONNECTIONS_PER_ADDRESS = 500       # connections one address (an IPv6 /64) may open
                                # at once to rc-server, and to rc-files (a fleet behind one
                                # NAT after a restart); it gets a twentieth of them back a
                                # second; past them a connection is closed before any TLS
                                # work; 0: no limit
AUTH_FAILURES_PER_MINUTE = 10   # wrong join-token proofs from one address before it is
                                # shut out for a minute (a device proving its own secret
                                # is not)
MAX_DEVICES_PER_TOKEN = 100     # devices that may first join with the current join token;
                                # `rc token --rotate` starts a new count
MAX_PROFILE_BYTES = 65536       # bytes of a register message's data (the device profile)
MIN_HEARTBEAT_INTERVAL = 1.0    # seconds; heartbeats from one device closer than this
                                # are folded into one write
WATCH_REPORT_INTERVAL = 3.0     # seconds between heartbeats of a device someone watches
                                # (POST /api/v1/devices/ID/watch), while the watch lasts
DEVICE_LOG_LINES = 1000         # lines of each worker's own log (warnings, errors, task
                                # events) kept on the main node for `rc logs --device`
DEVICE_LOG_RATE = 1.0           # lines a second one device may add to them (bursts of a
                                # minute's worth); more are counted, not kept
MAX_DEVICE_SLOTS = 16           # slots a device may claim; it gets no more tasks at once
AUDIT_REFUSALS_PER_MINUTE = 10  # audit lines for refused connections, per address and
                                # reason (the rest are counted, not written)
AUDIT_LOG_MAX_BYTES = 10485760  # bytes; audit.log is rotated past this (5 backups kept)
MAX_MESSAGE_RATE = 10000        # messages a second one connection may send (burst: twice)
MAX_RECEIVE_MB = 64             # MiB a second rc-server reads from one connection (burst:
                                # twice); what comes faster waits in the socket; 0: no limit
FRAME_DEADLINE = 30.0           # seconds a frame may take to arrive once started
PING_INTERVAL = 15.0            # seconds a connection may stay quiet (nothing received)
                                # before rc-server pings it
SUSPECT_AFTER = 10.0            # seconds a device has to answer a ping, or say anything
                                # after an assignment, before it is suspect: no new work,
                                # and what it has not accepted goes elsewhere uncharged
DISCONNECT_GRACE = 10.0         # seconds a dropped device has to reconnect before
                                # its tasks go elsewhere
RESTART_HOLD = 300.0            # seconds a graceful stop of rc-server holds the tasks of
                                # the workers it tells so (they keep them running and
                                # reconnect each second); 0: no hold, disconnect_grace

# -- files (lib/rc/files.py, rc-files) ----------------------------------------
FILES_PORT = 8081               # port of rc-files, which moves task files to and from
                                # workers (env RC_FILES_PORT wins)
FILES_QUOTA_MB = 10240          # MiB the file store may hold in all; an upload past it
                                # is refused before any byte is stored
FILES_RETENTION_DAYS = 30.0     # days a file is kept after the last task using it ended

# -- tasks -------------------------------------------------------------------
TASK_TIMEOUT = 300.0            # seconds a task may run when it names no timeout
TASK_RETRIES = 3                # re-runs after a system failure when the task names none
ACCEPT_TIMEOUT = 15.0           # seconds a device has to accept an assignment
LEASE_DURATION = 180.0          # seconds a running attempt is leased to its device;
                                # renewed by every heartbeat that lists it
INSTANT_PER_SLOT = 16           # instant tasks (echo, system_info) in flight per slot: more
                                # answered per round trip (8: ~4,000 echo/s here, 16: ~6,000);
                                # each may hold a 256 KiB payload on the device meanwhile
PREFETCH_PER_SLOT = 2           # tasks per slot a device that finishes tasks quickly may
                                # hold beyond its slots, queued on the device; 0: none.
                                # 1 ran dry before the scheduler's refill came back: a
                                # 4-slot device's 4 covered ~5 ms at 800 `true` tasks/s
POISON_LIMIT = 3                # devices a task may lose before it is failed as poison
BOUNCE_LIMIT = 10               # times in a row devices may give a task back before
                                # starting it (not_allowed, handed_back) before it is
                                # failed; 0: no limit. A started attempt resets the count
TIMEOUT_GRACE = 30.0            # seconds past its timeout before the main node fails a task
RETRY_BACKOFF = 1.0             # seconds before the first retry; doubles per attempt
RETRY_BACKOFF_MAX = 60.0        # seconds, the longest wait between retries
MAP_RECHECK_INTERVAL = 5.0      # seconds between rc map's reads of every ended task of its
                                # map, and before it says why no input has ended yet

# -- services (lib/rc/services.py) ---------------------------------------------
SERVICE_RESTART_BACKOFF = 1.0   # seconds before a service whose run ended starts again;
                                # doubles with each quick exit in a row
SERVICE_RESTART_BACKOFF_MAX = 300.0     # seconds, the longest wait between a service's runs
SERVICE_QUICK_EXIT = 30.0       # seconds; a run that ends sooner is a quick exit
SERVICE_FAILING_AFTER = 5       # quick exits in a row before a service shows as failing

# -- processes ---------------------------------------------------------------
POLL_INTERVAL = 0.05            # seconds between looks for changes in the database when
                                # no doorbell rings (see lib/rc/bell.py)
REAPER_INTERVAL = 1.0           # seconds between the reaper's sweeps
LOG_LEVEL = "info"              # debug, info, warning or error
LOCAL_WORKER_OPTIONS = []       # more options for the main node's own worker (rc-worker,
                                # `rc local-worker`), e.g. ["--slots", "1", "--tag", "nas"]

# -- operations: health, history, alerts, housekeeping ------------------------
HEALTH_SUPERVISOR = True        # `rc health` checks that every supervisord program runs;
                                # false when something else supervises them
HEALTH_QUEUE_STUCK = 600.0      # seconds a ready task may wait while a device that fits
                                # it has a free slot before the queue counts as stuck
HEALTH_UNFIT_TASK = 900.0       # seconds a queued task may wait while no known device
                                # (online or not) could run it before a WARNING
HEALTH_MIN_DEVICES_ONLINE = 1   # fewer devices online than this is a WARNING
HEALTH_DISK_FREE_WARNING = 10.0     # percent free on the state directory's disk: WARNING
HEALTH_DISK_FREE_CRITICAL = 5.0     # below: CRITICAL
HEALTH_WAL_WARNING = 268435456  # bytes of write-ahead log (var/db/rc.db-wal): WARNING
STATS_HISTORY = 10080           # minutes of cluster history kept (a week)
ALERTS = [{"rule": "device_offline", "after": 900.0},
          {"rule": "queue_stuck"},
          {"rule": "failure_rate", "above": 0.5, "window": 900.0, "min_tasks": 10}]
                                # rules the reaper checks each minute (docs/operations.md)
ALERT_COMMAND = ""              # run by `sh -c` when an alert fires, details in RC_ALERT_*
                                # variables; empty: alerts only go to the log
ALERT_COOLDOWN = 3600.0         # seconds before the same alert fires again
TASK_RETENTION = 2592000.0      # seconds finished tasks and their events are kept (30
                                # days); 0 keeps them for ever
WAL_CHECKPOINT_BYTES = 16777216     # the reaper truncates the write-ahead log past this
TEMP_FILE_AGE = 86400.0         # seconds before leftover temporary files are removed

# The settings as rc.json names them, built from the constants above.
DEFAULTS = {name.lower(): value for name, value in dict(globals()).items()
            if name.isupper() and name != "DEFAULTS"}
