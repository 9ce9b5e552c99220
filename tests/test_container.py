"""The Dockerfile and docker-compose.yml, built and run for real (issue 21):
the image is built with the machine's container engine (podman), the
compose file is brought up with podman-compose, published on 127.0.0.1
only, and a worker container joins the main node's and runs a task.

Skipped, with the reason, where no container engine can run containers or
no base image can be had (the registry's python:3.12-slim is tried first,
then a Debian base made here with debootstrap, which needs root).
"""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from cluster_harness import REPO, free_ports, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.container]

ENGINE = shutil.which("podman")
COMPOSE = os.path.join(os.path.dirname(sys.executable), "podman-compose")
LOCAL_BASE = "localhost/rc-base-bookworm"      # made here from Debian's packages
REGISTRY_BASE = "python:3.12-slim"
IMAGE = "localhost/retire-cluster:test"
HOSTNAME = "nas-test"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"   # a TLS-inspecting proxy's CA, if any


def engine(*args, timeout=600, check=True):
    done = subprocess.run([ENGINE, "--runtime", "runc"] + list(args), capture_output=True,
                          text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError("podman %s: %s%s" % (" ".join(args), done.stdout, done.stderr))
    return done


def engine_runs_containers():
    if ENGINE is None:
        return "no container engine (podman) on PATH"
    if not os.path.exists(COMPOSE):
        return "podman-compose is not installed in the test environment"
    done = subprocess.run([ENGINE, "info"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return "podman cannot run here: %s" % done.stderr.strip()[:200]
    return None


def base_image():
    """A base with python3 and venv: one already here, else one made from
    Debian's packages (the registry may be out of reach)."""
    for name in (REGISTRY_BASE, LOCAL_BASE):
        if engine("image", "exists", name, check=False).returncode == 0:
            return name
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.skip("no base image (%s or %s) and no debootstrap as root to make one"
                    % (REGISTRY_BASE, LOCAL_BASE))
    root = "/var/tmp/rc-base-%s" % uuid.uuid4().hex[:8]
    try:
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                        "bookworm", root], check=True, capture_output=True, timeout=900)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([ENGINE, "import", "-", LOCAL_BASE], stdin=tar.stdout, check=True,
                       capture_output=True, timeout=300)
        tar.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return LOCAL_BASE


def build_image():
    args = ["build", "--format", "docker", "--network", "host", "-q", "-t", IMAGE,
            "--build-arg", "BASE=" + base_image()]
    for variable in ("PIP_INDEX_URL",):
        if os.environ.get(variable):
            args += ["--build-arg", "%s=%s" % (variable, os.environ[variable])]
    if os.path.exists(CA_BUNDLE):
        args += ["--build-arg", "PIP_CERT=" + CA_BUNDLE,
                 "--volume", "%s:%s:ro" % (CA_BUNDLE, CA_BUNDLE)]
    engine(*(args + [REPO]), timeout=900)


class Project:
    """docker-compose.yml, copied beside its secret file, brought up under a
    project name of its own with podman-compose."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.name = "rctest%s" % uuid.uuid4().hex[:8]
        shutil.copy(os.path.join(REPO, "docker-compose.yml"), self.directory)
        self.ports = dict(zip(("RC_TCP_PORT", "RC_WEB_PORT", "RC_FILES_PORT"), free_ports(3)))
        self.env = dict(os.environ, RC_IMAGE=IMAGE, RC_PUBLISH="127.0.0.1",
                        RC_HOSTNAME=HOSTNAME, RC_WORKER_ID="box-worker",
                        RC_NOFILE="1024", RC_NPROC="1024",
                        **{k: str(v) for k, v in self.ports.items()})

    def compose(self, *args, timeout=300):
        done = subprocess.run([COMPOSE, "-p", self.name, "-f", "docker-compose.yml"]
                              + list(args), cwd=self.directory, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def container(self, service):
        return "%s_%s_1" % (self.name, service)

    def rc(self, *args, check=True):
        done = engine("exec", self.container("main"), "bin/rc", *args, check=False)
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def inspect(self, service):
        return json.loads(engine("inspect", self.container(service)).stdout)[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    reason = engine_runs_containers()
    if reason:
        pytest.skip(reason)
    build_image()
    project = Project(tmp_path_factory.mktemp("compose"))
    try:
        project.compose("up", "-d", "main")
        wait_for(lambda: programs_check(project)["status"] == "ok", 120,
                 "the main node's programs running")
        yield project
    finally:
        subprocess.run([COMPOSE, "-p", project.name, "-f", "docker-compose.yml", "--profile",
                        "worker", "down", "-v"], cwd=project.directory, env=project.env,
                       capture_output=True, timeout=300)


def programs_check(project):
    done = project.rc("health", "--json", check=False)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        return {"status": "not answering"}
    return [c for c in report["checks"] if c["check"] == "programs"][0]


def test_the_image_holds_no_secret_and_checks_health_without_a_fixed_port(project):
    image = json.loads(engine("image", "inspect", IMAGE).stdout)[0]
    config = image["Config"]
    names = [entry.split("=", 1)[0] for entry in config.get("Env") or []]
    assert not [n for n in names if any(w in n for w in ("TOKEN", "SECRET", "KEY", "PASS"))]
    assert config["User"] == "rc"
    check = " ".join((image.get("Healthcheck") or config.get("Healthcheck"))["Test"])
    assert "rc.cli health" in check and "5000" not in check
    # the code is not the running user's to change
    done = engine("exec", project.container("main"), "sh", "-c",
                  "touch lib/rc/x.py 2>&1 || echo refused", check=False)
    assert "refused" in done.stdout


def test_the_main_node_runs_read_only_with_limits_and_no_local_worker(project):
    host_config = project.inspect("main")["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["Memory"] > 0 and host_config["PidsLimit"] > 0
    assert host_config["NanoCpus"] > 0
    assert json.loads(project.rc("devices", "--json").stdout) == []
    programs = programs_check(project)
    assert programs["status"] == "ok", programs          # the stopped worker is on purpose
    leaked = engine("exec", project.container("main"), "find", "/var/lib/retire-cluster",
                    "-perm", "/077", "-not", "-type", "l").stdout.split()
    assert leaked == [], "state readable by others: %s" % leaked
    healthcheck = engine("healthcheck", "run", project.container("main"), check=False)
    assert healthcheck.returncode == 0, healthcheck.stdout + healthcheck.stderr


def get(project, host):
    request = urllib.request.Request("http://127.0.0.1:%d/health" % project.ports["RC_WEB_PORT"],
                                     headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_dashboard_answers_to_the_nas_name_and_refuses_others(project):
    port = project.ports["RC_WEB_PORT"]
    assert get(project, "%s:%d" % (HOSTNAME, port)) == 200
    assert get(project, "%s.local:%d" % (HOSTNAME, port)) == 200
    assert get(project, "evil.example:%d" % port) == 403


def test_a_worker_container_joins_and_runs_a_task(project):
    token = project.rc("token").stdout.strip()
    secret = os.path.join(project.directory, "rc-join-token")
    with open(secret, "w") as f:
        f.write(token + "\n")
    os.chmod(secret, 0o600)          # as docs/operations.md says: the worker refuses 0644
    project.env["RC_FINGERPRINT"] = project.rc("token", "--fingerprint").stdout.strip()
    project.compose("--profile", "worker", "up", "-d", "worker")

    def online():
        devices = json.loads(project.rc("devices", "--json").stdout)
        return [d for d in devices if d["status"] == "online"]
    wait_for(online, 60, "the worker container to join")
    assert [d["device_id"] for d in online()] == ["box-worker"]
    # The worker is root there only to run each task as a uid of its own,
    # which cannot read the join token nor the device's secret.
    done = project.rc("submit", "shell", "echo hello from uid $(id -u);"
                      " cat /run/secrets/rc_join_token 2>&1; ls /var/lib/rc-worker 2>&1; true",
                      "--wait", "--wait-timeout", "60")
    assert "hello from uid 59" in done.stdout, done.stdout
    assert token not in done.stdout
    assert done.stdout.count("Permission denied") == 2, done.stdout
    assert project.inspect("worker")["HostConfig"]["ReadonlyRootfs"] is True
