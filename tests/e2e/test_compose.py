"""compose.yaml for real: podman + runc + the pinned podman-compose bring its services up from the image
deploy/compose/build-image.sh makes (Debian packages, no registry), `--scale` scales each service on its own, and
a VM job runs end to end against them; traces go to an OTLP receiver of the test's own (no Jaeger image here).

The compose project is the test's own: its name, its broker (RabbitMQ from the same image, published on free
loopback ports), its state directory, image store and node name; it never meets the host's stack. The job goes
through the Torque prologue/epilogue entry points on the host (a recorded invocation, as the contract tests do)
against the compose broker; the bridge and the stager answer from their containers, the node worker from its
container boots the guest through the host's libvirt; the wrapper vsub writes runs the script in the guest.

The first image build debootstraps Debian (1 min 34 s here); later runs reuse the cached rootfs and the venv of
locked dependencies and only reinstall vtorque from the checkout when it changed (13-30 s), or nothing (0.1 s).
Run it under the shared lock: `flock /tmp/vtorque-e2e.lock python -m pytest tests/e2e/test_compose.py`.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pika
import pytest
from integration import torque_replay as tr  # tests/ is on sys.path (rootdir of the e2e and integration packages)
from integration.otlp_receiver import OtlpReceiver

from vtorque.shared.job_script import render_wrapper

pytestmark = [pytest.mark.slow, pytest.mark.guest]

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.yaml"
CONTAINERS_CONF = REPO / "deploy" / "compose" / "containers.conf"
TOOL_DIR = Path(os.environ.get("VTORQUE_COMPOSE_TOOL_DIR", "/opt/vtorque/podman-compose"))
PODMAN_COMPOSE = TOOL_DIR / "bin" / "podman-compose"
IMAGE = "localhost/vtorque:dev"
SITE_CONFIG = Path("/etc/vtorque/vtorque.toml")
LAUNCHER = str(Path(sys.executable).parent / "vtorque-launch")
STAGERS, BRIDGES = 3, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv: list[str], env: dict | None = None, timeout: float = 600, check: bool = True):
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _toml(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return tr.toml_value(value)


def _write_toml(path: Path, sections: dict) -> Path:
    lines = [f"{k} = {_toml(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in table.items() if not isinstance(v, dict)]
    path.write_text("\n".join(lines) + "\n")
    return path


class Project:
    """One compose project of the test's own, driven with the pinned podman-compose."""

    def __init__(self, name: str, env: dict[str, str]):
        self.name, self.env = name, env

    def compose(self, *args: str, check: bool = True, timeout: float = 300):
        return _run([str(PODMAN_COMPOSE), "-f", str(COMPOSE_FILE), "-p", self.name, *args], self.env, timeout, check)

    def podman(self, *args: str, check: bool = True):
        return _run(["podman", *args], self.env, 120, check)

    def containers(self) -> dict[str, list[str]]:
        """service → names of its running containers."""
        out = self.podman("ps", "--filter", f"label=io.podman.compose.project={self.name}", "--format",
                          '{{.Names}} {{index .Labels "com.docker.compose.service"}}').stdout
        found: dict[str, list[str]] = collections.defaultdict(list)
        for line in out.splitlines():
            cname, service = line.split()
            found[service].append(cname)
        return dict(found)

    def logs(self) -> str:
        out = []
        for _service, names in sorted(self.containers().items()):
            for cname in names:
                got = self.podman("logs", "--tail", "30", cname, check=False)  # the services log on stderr
                out.append(f"--- {cname}\n" + (got.stdout + got.stderr)[-4000:])
        return "\n".join(out)


@pytest.fixture(scope="module")
def site() -> dict:
    if not SITE_CONFIG.exists():
        pytest.fail(f"{SITE_CONFIG} is missing: `make configure` writes it (the test guest's catalog entry)")
    site = tomllib.loads(SITE_CONFIG.read_text())
    if "tiny" not in site.get("images", {}).get("catalog", {}):
        pytest.fail(f"{SITE_CONFIG} has no [images.catalog.tiny] (the test guest; `make guest configure`)")
    return site


@pytest.fixture(scope="module")
def image() -> str:
    """The image under test is this checkout's: build (or confirm, from the cache) it, and the compose tool."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: deploy/install-deps.sh installs it")
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    _run([str(REPO / "deploy/compose/install-compose-tool.sh")], env, timeout=300)
    t0 = time.monotonic()
    built = _run([str(REPO / "deploy/compose/build-image.sh")], env, timeout=1200)
    print(f"build-image.sh: {time.monotonic() - t0:.1f}s\n{built.stdout}")
    return IMAGE


@pytest.fixture(scope="module")
def stack(image, site):
    """The compose project up: broker, 2 bridges, 3 stagers, a node worker. Yields (project, receiver, config,
    node, amqp url, management url, state dir)."""
    tag = uuid.uuid4().hex[:6]
    node = f"cmp{tag}"
    # Under /var/lib/vtorque: libvirt-qemu must traverse to the guests' disks; the same path inside and outside.
    state = Path(site.get("state_dir", "/var/lib/vtorque")) / "test-compose" / node
    state.mkdir(parents=True)
    tiny = site["images"]["catalog"]["tiny"]
    sources = Path(tiny["source"]).parent
    amqp_port, mgmt_port = _free_port(), _free_port()
    amqp = f"amqp://guest:guest@127.0.0.1:{amqp_port}/%2F"
    # The test's own files live there too, not under pytest's tmp: concurrent pytest sessions on this host prune
    # each other's old basetemps while a long test still uses its own.
    tmp = state / "test"
    tmp.mkdir()
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF), "VTORQUE_IMAGE": image,
           "VTORQUE_STATE_DIR": str(state), "VTORQUE_IMAGE_SOURCES": str(sources),
           "VTORQUE_AMQP_PORT": str(amqp_port), "VTORQUE_MANAGEMENT_PORT": str(mgmt_port),
           "VTORQUE_NODE_NAME": node, "VTORQUE_CONFIG_FILE": str(tmp / "containers.toml"),
           "VTORQUE_SCHEDULER_DIR": str(tmp / "scheduler")}
    project = Project(f"vtc{tag}", env)
    job_owner()
    receivers = contextlib.ExitStack()
    try:
        t0 = time.monotonic()
        project.compose("up", "-d", "rabbitmq")
        deadline = time.monotonic() + 90
        while True:
            try:
                pika.BlockingConnection(pika.URLParameters(amqp)).close()
                break
            except pika.exceptions.AMQPError:
                assert time.monotonic() < deadline, f"the compose broker never answered:\n{project.logs()}"
                time.sleep(0.5)
        broker_up = time.monotonic() - t0
        # The hooks' shell entry points take the site's broker login from /etc/vtorque/hooks.env (pbs_mom gives
        # them no environment of ours): the compose broker gets that user too, as a site's broker would.
        hook_login = hook_credentials()
        if hook_login:
            user, password = hook_login
            broker = f"{project.name}_rabbitmq_1"
            project.podman("exec", broker, "rabbitmqctl", "-q", "add_user", user, password)
            project.podman("exec", broker, "rabbitmqctl", "-q", "set_permissions", "-p", "/", user, ".*", ".*", ".*")
        # The receiver listens on the project network's gateway: the containers on that network and the node
        # worker on the host's network both reach it there (the containers cannot reach the host's loopback).
        # It outlives `down` (below): the services flush their spans when they stop.
        gateway = project.podman("network", "inspect", f"{project.name}_default", "--format",
                                 "{{range .Subnets}}{{.Gateway}}{{end}}").stdout.strip()
        assert gateway, "the project's network has no gateway"
        rx = receivers.enter_context(OtlpReceiver(host=gateway))
        env["VTORQUE_OTLP_ENDPOINT"] = rx.url
        sections = {
            # What the hooks and the launcher on the host read; the containers get the broker, the state dir
            # and the collector from compose.yaml's environment.
            "state_dir": str(state),
            "log_level": "INFO",
            "broker": {"url": amqp, "connect_timeout": 3.0},
            "tracing": {"dir": str(state / "traces"), "otlp_endpoint": rx.url, "metrics_interval": 1.0},
            "images": {"store": str(state / "images")},
            "spec": {k: v for k, v in site.get("spec", {}).items() if k != "user_dirs"},
            "node": {"name": node, "guest_dir": str(state / "guests"), "ssh_port_min": 23100,
                     "ssh_port_max": 23199, "heartbeat_interval": 1.0},
            "hooks": {"prologue_timeout": 180.0, "epilogue_timeout": 60.0, "broker_attempts": 2},
            # The job's scheduler is Torque, asked through a stand-in qstat (QstatStandIn): on the host by its
            # path, in the bridge's and the node worker's containers where compose mounts VTORQUE_SCHEDULER_DIR.
            "scheduler": {"kind": "torque", "qstat": str(tmp / "scheduler" / "qstat"), "timeout": 5.0},
            "images.catalog.tiny": tiny,
        }
        QstatStandIn(tmp / "scheduler")
        config = _write_toml(tmp / "vtorque.toml", sections)
        sections["scheduler"] = {**sections["scheduler"], "qstat": "/opt/vtorque/scheduler/qstat"}
        for path in (config, _write_toml(tmp / "containers.toml", sections)):
            path.chmod(0o644)
        # Each service scaled on its own, as an operator would: podman-compose takes one --scale per call.
        project.compose("up", "-d", "--scale", f"image_stager={STAGERS}",
                        "rabbitmq", "scheduler_bridge", "image_stager", "node_worker")
        project.compose("up", "-d", "--scale", f"scheduler_bridge={BRIDGES}", "scheduler_bridge")
        mgmt = f"http://127.0.0.1:{mgmt_port}"
        wait_for_consumers(mgmt, {"vtorque.stager": STAGERS, "vtorque.bridge": BRIDGES,
                                  f"vtorque.node.{node}": 1}, project)
        print(f"compose: broker up in {broker_up:.1f}s, all services consuming {time.monotonic() - t0:.1f}s "
              f"after the first `up`")
        yield project, rx, config, node, amqp, mgmt, state
    finally:
        # The services first, the broker last (a service whose broker is gone may take its stop timeout to
        # exit; podman-compose stops all at once, and scaled replicas after the broker is already gone).
        services = [c for svc, names in project.containers().items() if svc != "rabbitmq" for c in names]
        t0 = time.monotonic()
        if services:
            project.podman("stop", "-t", "10", *services, check=False)
        print(f"services stopped in {time.monotonic() - t0:.1f}s")
        t0 = time.monotonic()
        down = project.compose("down", "-v", "--remove-orphans", "-t", "30", check=False)
        took = time.monotonic() - t0
        print(f"compose down: {took:.1f}s")
        receivers.close()
        left = project.podman("ps", "-a", "--filter", f"label=io.podman.compose.project={project.name}",
                              "--format", "{{.Names}} {{.Status}}", check=False).stdout.strip()
        shutil.rmtree(state, ignore_errors=True)
        assert not left, f"containers left after down:\n{left}\n--- down said:\n{down.stdout}\n{down.stderr}"
        # Every service stops on SIGTERM (the broker takes longest, ~7 s); none waits for the 30 s kill.
        assert took < 25, f"compose down took {took:.1f}s"


class QstatStandIn:
    """`qstat -f [-x] JOBID` answering from files beside it (paths relative to the script, so the same
    directory answers on the host and mounted in a container); Torque's exit 153 for any other job."""

    def __init__(self, directory: Path):
        self.directory = directory
        (directory / "answers").mkdir(parents=True, exist_ok=True)
        script = directory / "qstat"
        script.write_text("""#!/bin/sh
here=$(dirname "$0")
[ "$1" = -f ] || { echo "usage: qstat -f [-x] JOBID" >&2; exit 2; }
shift
[ "$1" = -x ] && shift
[ -n "$1" ] && [ -f "$here/answers/$1" ] || { echo "qstat: Unknown Job Id $1" >&2; exit 153; }
cat "$here/answers/$1"
""")
        script.chmod(0o755)

    def answer(self, job_id: str, attrs: dict[str, str]) -> None:
        (self.directory / "answers" / job_id).write_text(tr.qstat_f_text(job_id, attrs))


def hook_credentials() -> tuple[str, str] | None:
    """The broker login the Torque entry points will use: [broker] credentials_file as /etc/vtorque/hooks.env
    sets it (VTORQUE_BROKER__CREDENTIALS_FILE), or None when it sets none."""
    hooks_env = Path("/etc/vtorque/hooks.env")
    if not hooks_env.exists():
        return None
    path = subprocess.run(["sh", "-c", '. "$1" >/dev/null 2>&1; printf %s "$VTORQUE_BROKER__CREDENTIALS_FILE"', "sh",
                           str(hooks_env)], capture_output=True, text=True, timeout=10,
                          env={"PATH": "/usr/bin:/bin"}).stdout.strip()
    if not path:
        return None
    user, sep, password = Path(path).read_text().strip().partition(":")
    assert sep, f"{path}: not 'user:password'"
    return user, password


def consumers_by_queue(mgmt: str) -> dict[str, set[str]]:
    """queue → the peer addresses of its consumers' connections (one per container on the compose network)."""
    request = urllib.request.Request(f"{mgmt}/api/consumers", headers={
        "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
    with urllib.request.urlopen(request, timeout=10) as answer:
        consumers = json.load(answer)
    found: dict[str, set[str]] = collections.defaultdict(set)
    for c in consumers:
        found[c["queue"]["name"]].add(c["channel_details"]["peer_host"])
    return found


def wait_for_consumers(mgmt: str, want: dict[str, int], project: Project, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    got: dict = {}
    while time.monotonic() < deadline:
        try:
            got = consumers_by_queue(mgmt)
        except OSError:  # the management API starts a moment after AMQP
            got = {}
        if all(len(got.get(q, ())) >= n for q, n in want.items()):
            return
        time.sleep(0.5)
    pytest.fail(f"consumers wanted {want}, got {dict(got)}\n{project.logs()}")


def test_each_service_scales_on_its_own(stack):
    project, _, _, node, _, mgmt, _ = stack
    containers = project.containers()
    assert {s: len(n) for s, n in containers.items()} == {
        "rabbitmq": 1, "scheduler_bridge": BRIDGES, "image_stager": STAGERS, "node_worker": 1}, containers
    consumers = consumers_by_queue(mgmt)
    # Every replica consumes its pool's queue from a container of its own (its own address on the network).
    assert len(consumers["vtorque.stager"]) == STAGERS, consumers
    assert len(consumers["vtorque.bridge"]) == BRIDGES, consumers
    assert consumers["vtorque.stager"].isdisjoint(consumers["vtorque.bridge"]), consumers
    # The node worker is on the host's network: it reaches the broker through the published port.
    assert len(consumers[f"vtorque.node.{node}"]) == 1, consumers
    assert not consumers[f"vtorque.node.{node}"] & (consumers["vtorque.stager"] | consumers["vtorque.bridge"])


def _submit_span(receiver_url: str, job_id: str) -> str:
    """What vsub does: a "vsub submit" root span whose traceparent goes into the job script's header."""
    from opentelemetry import propagate
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import set_span_in_context

    provider = TracerProvider(resource=Resource.create({"service.name": "vtorque-vsub"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver_url + "/v1/traces")))
    with provider.get_tracer("test").start_as_current_span("vsub submit", attributes={"pbs.job_id": job_id}) as sp:
        carrier: dict = {}
        propagate.inject(carrier, context=set_span_in_context(sp))
    provider.shutdown()
    return carrier["traceparent"]


def job_owner() -> tuple[str, str]:
    """The recorded job owner `trqtest`, an ordinary account (node workers refuse system accounts and nobody),
    made when missing as the Torque contract tests do. Before `up`: the node worker's container sees the host's
    /etc/passwd as it was when it started (a bind mount of the file)."""
    import grp
    import pwd

    try:
        pw = pwd.getpwnam("trqtest")
    except KeyError:
        made = subprocess.run(["useradd", "-m", "-U", "-s", "/bin/sh", "trqtest"], capture_output=True, text=True,
                              timeout=30)
        if made.returncode not in (0, 9):  # 9: made meanwhile by another test process
            pytest.fail(f"cannot make the job owner trqtest: {made.stderr.strip()}")
        pw = pwd.getpwnam("trqtest")
    return "trqtest", grp.getgrgid(pw.pw_gid).gr_name


def test_a_vm_job_runs_end_to_end_in_compose(stack):
    from vtorque.services.node_worker.hypervisor import Hypervisor

    project, rx, config, node, _, _, state = stack
    tmp_path = state / "test" / "vm-job"
    tmp_path.mkdir()
    qstat_dir = Path(tomllib.loads(config.read_text())["scheduler"]["qstat"]).parent
    job_id = f"{random.randrange(10**6, 10**7)}.cmp"
    traceparent = _submit_span(rx.url, job_id)
    trace_id = traceparent.split("-")[1]
    key = tmp_path / "keys" / "job"
    key.parent.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    wrapper = render_wrapper("#!/bin/sh\necho COMPOSE-JOB-RAN in $(uname -n)\nexit 7\n",
                             {"img": "tiny", "ram": "256M"}, (key.parent / "job.pub").read_text().strip(), str(key),
                             traceparent, LAUNCHER)
    user, group = job_owner()
    home = tr.TorqueHome(tmp_path / "torque")
    hook_env = {"VTORQUE_CONFIG": str(config)}
    if sys.executable != "/opt/vtorque/venv/bin/python":
        hook_env["VTORQUE_PYTHON"] = sys.executable

    pro = tr.recorded_invocations("prologue")[0]
    # The prologue asks `qstat -f` about the job: a stand-in answers from the recorded start record, with the
    # job on the compose node worker's node (the config's [scheduler] qstat names it).
    record = tr.first_start_record(pro.job_id)
    QstatStandIn(qstat_dir).answer(job_id, {**record.attrs, "exec_host": f"{node}/0", "user": user,
                                            "group": group, "owner": f"{user}@localhost"})
    pro = pro.with_job_id(job_id).with_args(a2=user, a3=group)
    prepared = home.prepare(pro, wrapper)
    prepared.nodefile.write_text(f"{node}\n")  # the job's one node is the compose node worker
    result = tr.run_hook("prologue", prepared, hook_env, timeout=240)
    assert result.returncode == 0, f"{result}\n{project.logs()}"

    hv = Hypervisor("qemu:///system")
    mine = [name for name, meta in hv.vtorque_domains().items() if meta.get("job") == job_id]
    assert len(mine) == 1 and hv.is_active(mine[0]), mine
    # The guest's disks are where the container wrote them, on the host's path (libvirtd opened them there).
    assert any((state / "guests").rglob("*.qcow2")), sorted((state / "guests").rglob("*"))
    assert any((state / "images").iterdir()), "the stager's store is empty"

    ran = subprocess.run(["sh", str(prepared.script)], env={**os.environ, "PBS_JOBID": job_id,
                                                             "VTORQUE_CONFIG": str(config)},
                         capture_output=True, text=True, timeout=120)
    # The script ran in the guest (not on this host), and its exit code is the job's.
    assert ran.returncode == 7, (ran.stdout, ran.stderr)
    assert "COMPOSE-JOB-RAN in " in ran.stdout, (ran.stdout, ran.stderr)
    assert f"COMPOSE-JOB-RAN in {socket.gethostname()}\n" not in ran.stdout, ran.stdout

    epi = tr.recorded_invocations("epilogue")[0].with_job_id(job_id).with_args(a2=user, a3=group,
                                                                                a10=str(ran.returncode))
    prepared_epi = home.prepare(epi, wrapper)
    prepared_epi.nodefile.write_text(f"{node}\n")
    result = tr.run_hook("epilogue", prepared_epi, hook_env, timeout=120)
    assert result.returncode == 0, f"{result}\n{project.logs()}"
    assert "removed 1 guest" in result.stdout, str(result)

    # Nothing of the guest outlives the job: no domain, no disks, no job directory (they go right after the
    # teardown's answer, which comes once the guest's QEMU has exited).
    gone_by = time.monotonic() + 30
    while [n for n, meta in hv.vtorque_domains().items() if meta.get("job") == job_id] \
            and time.monotonic() < gone_by:
        time.sleep(0.2)
    assert not [n for n, meta in hv.vtorque_domains().items() if meta.get("job") == job_id]
    while (list((state / "guests").rglob("*.qcow2")) or (state / "jobs" / job_id).exists()) \
            and time.monotonic() < gone_by:
        time.sleep(0.2)
    assert not list((state / "guests").rglob("*.qcow2")), sorted((state / "guests").rglob("*"))
    assert not (state / "jobs" / job_id).exists()

    # One trace over OTLP from the host's hook and launcher and from the services in their containers.
    def job_spans():
        return [s for s in rx.spans() if s.trace_id == trace_id]

    def complete():
        names = {(s.service, s.name) for s in job_spans()}
        return {("vtorque-hook", "epilogue"), ("vtorque-launcher", "run job in guest"),
                ("vtorque-stager", "process vtorque.stager"), ("vtorque-node-worker", "boot guest")} <= names \
            and sum(1 for s in job_spans() if s.name == f"process vtorque.node.{node}") >= 2

    assert rx.wait_for(complete, timeout=20), sorted((s.service, s.name) for s in job_spans())
    time.sleep(1.5)  # the services' batch processors export every 0.5 s: let stragglers arrive
    spans = job_spans()
    assert not rx.bad_requests, rx.bad_requests
    assert {s.service for s in spans} == {"vtorque-vsub", "vtorque-hook", "vtorque-bridge", "vtorque-stager",
                                          "vtorque-node-worker", "vtorque-launcher"}
    by_id = {s.span_id: s for s in spans}
    assert [s.name for s in spans if not s.parent_id] == ["vsub submit"]
    assert not [s for s in spans if s.parent_id and s.parent_id not in by_id], "orphan spans"
    assert all(s.attributes.get("pbs.job_id") == job_id for s in spans)
    (boot,) = [s for s in spans if s.name == "boot guest"]
    assert boot.attributes["vtorque.node"] == node
    assert [s.attributes.get("vtorque.exit_code") for s in spans if s.name == "run job in guest"] == [7]
