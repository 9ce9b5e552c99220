"""rc-web's routes for watching one device (lib/rc/web.py mounts them):
its worker's own log lines, as JSON and as text, and the watch that makes
it report its figures every few seconds (docs/http.md)."""
import time

import bottle
import orjson

from rc import db, device_logs, devices, records

DEFAULT_LOG_LIMIT = 100       # lines GET .../logs gives without ?limit=


class DeviceRoutes:
    """Handlers on rc-web's Web (connection, existing_device), with its
    query_int and separated (the /text formats) handed in, since web.py
    imports this module."""

    def __init__(self, web, query_int, separated):
        self.web, self.query_int, self.separated = web, query_int, separated

    def routes(self):
        return [("GET", "/api/v1/devices/<device_id>/logs", self.logs, "read"),
                ("GET", "/text/devices/<device_id>/logs", self.text_logs, "read"),
                # Read access, but only from pages of this origin: a watch is harmless
                # and bounded (one write per device every WATCH_REFRESH seconds).
                ("POST", "/api/v1/devices/<device_id>/watch", self.watch, "command")]

    def recent_lines(self, device_id):
        """?limit=N (default DEFAULT_LOG_LIMIT, at most what is kept) lines, newest last."""
        self.web.existing_device(device_id)
        limit = max(1, min(self.query_int("limit", DEFAULT_LOG_LIMIT),
                           self.web.config.device_log_lines))
        return device_logs.recent(self.web.connection(), device_id, limit)

    def logs(self, device_id):
        return json_response({"device_id": device_id, "logs": self.recent_lines(device_id)})

    def text_logs(self, device_id):
        return self.separated([records.device_log_row(line)
                               for line in self.recent_lines(device_id)],
                              records.DEVICE_LOG_COLUMNS)

    def watch(self, device_id):
        """Someone looks at the device: it reports every watch_report_interval
        for the next WATCH_SECONDS (rc-server reads the column once a second).
        Asked again within WATCH_REFRESH, nothing is written."""
        self.web.existing_device(device_id)
        now = time.time()
        with db.write(self.web.connection()):
            until = devices.watch(self.web.connection(), device_id, now)
        return json_response({"device_id": device_id, "watched_until": until,
                              "seconds": round(until - now, 3),
                              "report_interval": self.web.config.watch_report_interval})


def json_response(value, status=200):
    return bottle.HTTPResponse(orjson.dumps(value), status,
                               {"Content-Type": "application/json"})
