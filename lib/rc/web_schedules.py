"""rc-web's routes for recurring tasks and services (lib/rc/schedules.py,
services.py): /api/v1/schedules, /api/v1/services, /text/schedules and
/text/services. Reading follows read_access; every change needs the admin
token, as everywhere in rc-web."""
from rc import schedules, services, tasks

# Fields of POST /api/v1/schedules and /api/v1/services.
TASK_FIELDS = {"task_type", "payload", "requirements", "priority", "timeout", "retries",
               "retry_on_failure"}
SCHEDULE_FIELDS = TASK_FIELDS | {"name", "cron", "time_zone", "each", "allow_overlap"}
SERVICE_FIELDS = (TASK_FIELDS - {"timeout", "retry_on_failure"}) | {"name", "each"}
# The stable columns of /text/schedules and /text/services (new ones only at the end).
TEXT_SCHEDULE_COLUMNS = ["name", "cron", "time_zone", "task_type", "state", "each",
                         "next_fire", "last_run_at", "last_outcome"]
TEXT_SERVICE_COLUMNS = ["name", "task_type", "place", "state", "device", "task_id", "runs",
                        "quick_exits", "last_error"]


class ScheduleRoutes:
    def __init__(self, web, helpers):
        """`helpers`: rc-web's module (json_response, separated, ApiError and
        the body checks), handed over so that this module need not import it."""
        self.web, self.h = web, helpers

    # -- schedules ---------------------------------------------------------------

    def schedules(self):
        return self.h.json_response({"schedules": [self.web.as_read(record) for record in
                                                   schedules.list_schedules(
                                                       self.web.connection())]})

    def add_schedule(self):
        body = self.body(SCHEDULE_FIELDS)
        spec = self.task_spec(body)
        first = schedules.add(self.web.connection(), self.web.config, body.get("name"),
                              body.get("cron"), spec, body.get("time_zone"),
                              self.flag(body, "each"), self.flag(body, "allow_overlap"))
        self.web.audit("schedule_added", schedule=body["name"], cron=body.get("cron"),
                       time_zone=body.get("time_zone"), task_type=spec["task_type"])
        return self.h.json_response({"name": body["name"], "next_fire": first,
                                     "url": "/api/v1/schedules/%s" % body["name"]}, 201)

    def schedule(self, name):
        return self.h.json_response(self.web.as_read(self.found(schedules.get,
                                                            self.web.connection(), name)))

    def remove_schedule(self, name):
        self.found(schedules.remove, self.web.connection(), name)
        self.web.audit("schedule_removed", schedule=name)
        return self.h.json_response({"name": name, "removed": True})

    def text_schedules(self):
        return self.h.separated([text_schedule_row(record) for record in
                                 schedules.list_schedules(self.web.connection())],
                                TEXT_SCHEDULE_COLUMNS)

    # -- services ------------------------------------------------------------------

    def services(self):
        return self.h.json_response({"services": [self.web.as_read(record) for record in
                                                  services.list_services(
                                                      self.web.connection(), self.web.config)]})

    def add_service(self):
        body = self.body(SERVICE_FIELDS)
        spec = self.task_spec(body)
        services.add(self.web.connection(), self.web.config, body.get("name"), spec,
                     self.flag(body, "each"))
        self.web.audit("service_added", service=body["name"], task_type=spec["task_type"])
        return self.h.json_response({"name": body["name"],
                                     "url": "/api/v1/services/%s" % body["name"]}, 201)

    def service(self, name):
        return self.h.json_response(self.web.as_read(self.found(
            services.get, self.web.connection(), self.web.config, name)))

    def stop_service(self, name):
        cancelled = self.found(services.stop, self.web.connection(), self.web.config, name)
        self.web.audit("service_stopped", service=name, cancelled=cancelled)
        return self.h.json_response({"name": name, "stopped": True, "cancelled": cancelled})

    def start_service(self, name):
        self.found(services.start, self.web.connection(), self.web.config, name)
        self.web.audit("service_started", service=name)
        return self.h.json_response({"name": name, "stopped": False})

    def remove_service(self, name):
        cancelled = self.found(services.remove, self.web.connection(), self.web.config, name)
        self.web.audit("service_removed", service=name, cancelled=cancelled)
        return self.h.json_response({"name": name, "removed": True, "cancelled": cancelled})

    def text_services(self):
        rows = [row for record in services.list_services(self.web.connection(),
                                                          self.web.config)
                for row in text_service_rows(record)]
        return self.h.separated(rows, TEXT_SERVICE_COLUMNS)

    # -- helpers -------------------------------------------------------------------

    def body(self, fields):
        body = self.web.json_body()
        unknown = sorted(set(body) - fields)
        if unknown:
            raise self.h.ApiError(400, "unknown field %s (known: %s)"
                                  % (", ".join(unknown), ", ".join(sorted(fields))))
        schedules.check_name(body.get("name"), "schedule" if "cron" in fields else "service")
        return body

    def task_spec(self, body):
        self.h.check_shapes(body)
        options = {key: body[key] for key in ("priority", "timeout", "retries",
                                               "retry_on_failure") if key in body}
        return schedules.task_spec(self.web.config, body.get("task_type"),
                                   self.h.submitted_payload(body),
                                   self.h.submitted_requirements(body), **options)

    def flag(self, body, name):
        value = body.get(name, False)
        if not isinstance(value, bool):
            raise tasks.TaskError("%s must be true or false" % name)
        return value

    def found(self, function, *arguments):
        """function(*arguments); "no schedule/service" is a 404."""
        try:
            return function(*arguments)
        except schedules.ScheduleError as e:
            if str(e).startswith("no "):
                raise self.h.ApiError(404, str(e))
            raise


def text_schedule_row(record):
    return {"name": record["name"], "cron": record["cron"], "time_zone": record["time_zone"],
            "task_type": record["task"]["task_type"], "state": record["state"],
            "each": int(record["each"]), "next_fire": "%.0f" % record["next_fire"],
            "last_run_at": None if record["last_run_at"] is None
            else "%.3f" % record["last_run_at"], "last_outcome": record["last_outcome"]}


def text_service_rows(record):
    base = {"name": record["name"], "task_type": record["task"]["task_type"]}
    if not record["runs"]:
        return [dict(base, state=record["state"])]
    return [dict(base, place=run["place"], state=run["state"], device=run["device_id"],
                 task_id=run["task_id"], runs=run["runs"], quick_exits=run["quick_exits"],
                 last_error=run["last_error"]) for run in record["runs"]]


def routes(web, helpers):
    r = ScheduleRoutes(web, helpers)
    name = "<name:re:[A-Za-z0-9][A-Za-z0-9._-]{0,63}>"
    return [("GET", "/api/v1/schedules", r.schedules, "read"),
            ("POST", "/api/v1/schedules", r.add_schedule, "admin"),
            ("GET", "/api/v1/schedules/" + name, r.schedule, "read"),
            ("DELETE", "/api/v1/schedules/" + name, r.remove_schedule, "admin"),
            ("GET", "/text/schedules", r.text_schedules, "read"),
            ("GET", "/api/v1/services", r.services, "read"),
            ("POST", "/api/v1/services", r.add_service, "admin"),
            ("GET", "/api/v1/services/" + name, r.service, "read"),
            ("POST", "/api/v1/services/%s/stop" % name, r.stop_service, "admin"),
            ("POST", "/api/v1/services/%s/start" % name, r.start_service, "admin"),
            ("DELETE", "/api/v1/services/" + name, r.remove_service, "admin"),
            ("GET", "/text/services", r.text_services, "read")]
