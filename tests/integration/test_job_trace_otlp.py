"""One VM job's whole life as one trace, received by a real OTLP/HTTP receiver; its metrics and logs too.

The test runs its own bridge, stager and node worker (`vtorque run ...`, the commands compose.yaml and the
systemd units run) on a RabbitMQ vhost of their own, so the stack's services cannot take its messages; they
export to the receiver through VTORQUE_TRACING__OTLP_ENDPOINT. The job goes through the Torque prologue and
epilogue entry points (hooks/torque/*) with a recorded invocation, and its script runs in one real guest
(TCG boot) through the wrapper vsub writes. Then the span tree is checked: one trace rooted at submission,
parents, links, kinds, messaging attributes, pbs.job_id everywhere, no orphan spans.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from vtorque.shared.job_script import render_wrapper

from . import torque_replay as tr
from .otlp_receiver import OtlpReceiver

SITE_CONFIG = Path("/etc/vtorque/vtorque.toml")
VENV_BIN = Path(sys.executable).parent
VHOST = "vtorque-otel-test"
BROKER = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
LAUNCHER = "/opt/vtorque/venv/bin/vtorque-launch"

pytestmark = [pytest.mark.slow, pytest.mark.guest]


def _rabbitmqctl(*args: str) -> None:
    tool = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([tool, *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def vhost():
    """A vhost of this test's own: the stack's services consume the same queue names on "/"."""
    try:
        _rabbitmqctl("add_vhost", VHOST)
    except subprocess.CalledProcessError as exc:
        if b"already exists" not in exc.stderr + exc.stdout:
            pytest.fail(f"rabbitmqctl add_vhost failed: {exc.stderr.decode()}")
    _rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    yield BROKER
    _rabbitmqctl("delete_vhost", VHOST)


@pytest.fixture(scope="module")
def site():
    if not SITE_CONFIG.exists():
        pytest.fail(f"{SITE_CONFIG} is missing: `make configure` writes it (catalog and image store)")
    return tomllib.loads(SITE_CONFIG.read_text())


def _config(path: Path, site: dict, node: str, work: Path, receiver_url: str) -> Path:
    sections = {
        "state_dir": str(work / "state"),
        "log_level": "INFO",
        "broker": {"url": BROKER, "connect_timeout": 3.0},
        # The hook gets the endpoint from the file (pbs_mom passes it no other variables); the services from
        # VTORQUE_TRACING__OTLP_ENDPOINT as well, as a deployment would override it.
        "tracing": {"dir": str(work / "traces"), "otlp_endpoint": receiver_url, "metrics_interval": 1.0},
        "images": {"store": site["images"]["store"]},
        "spec": site.get("spec", {}),
        "node": {"name": node, "guest_dir": site.get("node", {}).get("guest_dir", "/var/lib/vtorque/guests"),
                 "ssh_port_min": 23000, "ssh_port_max": 23099, "heartbeat_interval": 1.0},
        "hooks": {"prologue_timeout": 180.0, "epilogue_timeout": 60.0, "broker_attempts": 2},
        # No Torque server here to confirm the replayed job: this test is about its trace, not the bridge's check
        # (tests/unit/test_bridge_verification.py, tests/integration/test_torque_failures.py have that).
        "scheduler": {"kind": "torque", "verify_jobs": False},
    }
    for name, entry in site["images"]["catalog"].items():
        sections[f"images.catalog.{name}"] = entry
    return _write_toml(path, sections)


def _toml(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return tr.toml_value(value)


def _write_toml(path: Path, sections: dict) -> Path:
    """Like torque_replay.write_config, with arrays (the site's [spec] has some)."""
    lines = [f"{k} = {_toml(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in table.items() if not isinstance(v, dict)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def stack(tmp_path, vhost, site):
    """Receiver + our own three services. Yields (receiver, config path, node name, log dir)."""
    node = f"otel{uuid.uuid4().hex[:6]}"
    # Under /var/lib/vtorque: libvirt-qemu must traverse to the guest's files, and the job dir is read there.
    work = Path(site.get("state_dir", "/var/lib/vtorque")) / "test-otel" / node
    work.mkdir(parents=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    with OtlpReceiver() as rx:
        config = _config(tmp_path / "vtorque.toml", site, node, work, rx.url)
        env = {**os.environ, "VTORQUE_CONFIG": str(config), "VTORQUE_TRACING__OTLP_ENDPOINT": rx.url}
        env.pop("VTORQUE_PYTHON", None)
        try:
            for service in ("bridge", "stager", "node-worker"):
                log = open(logs / f"{service}.log", "w")
                procs.append((service, subprocess.Popen([str(VENV_BIN / "vtorque"), "run", service], env=env,
                                                        stdout=log, stderr=subprocess.STDOUT)))
            deadline = time.monotonic() + 60
            for service, proc in procs:
                while "consuming" not in (logs / f"{service}.log").read_text():
                    assert proc.poll() is None, f"{service} exited:\n{(logs / f'{service}.log').read_text()}"
                    assert time.monotonic() < deadline, f"{service} did not start"
                    time.sleep(0.1)
            yield rx, config, node, logs
        finally:
            for _, proc in procs:
                proc.terminate()
            for _, proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            shutil.rmtree(work, ignore_errors=True)


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


def _tree(spans) -> str:
    """The span tree, indented, for assertion messages."""
    children: dict[str, list] = {}
    ids = {s.span_id for s in spans}
    for s in sorted(spans, key=lambda s: s.span.start_time_unix_nano):
        children.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    out: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            out.append(f"{'  ' * depth}{s.service} {s.kind} {s.name} {s.attributes.get('vtorque.message.type', '')}")
            walk(s.span_id, depth + 1)

    walk("", 0)
    return "\n" + "\n".join(out)


@pytest.fixture(scope="module")
def owner():
    """An ordinary account of the test's own to own the job (node workers run no guests for root, nobody or
    system accounts); removed with its home afterwards. Yields (user, group)."""
    name = f"vtotel{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "-m", "-U", "-s", "/bin/sh", name], check=True, capture_output=True, timeout=30)
    try:
        yield name, name
    finally:
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True, timeout=30)


def test_one_job_one_trace_over_otlp(stack, owner, tmp_path):
    rx, config, node, logs = stack
    job_id = f"{random.randrange(10**6, 10**7)}.otel"
    traceparent = _submit_span(rx.url, job_id)
    trace_id = traceparent.split("-")[1]

    key = tmp_path / "keys" / "job"
    key.parent.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    wrapper = render_wrapper("#!/bin/sh\necho OTEL-JOB-RAN on $(hostname)\nexit 7\n", {"img": "tiny", "ram": "256M"},
                             (key.parent / "job.pub").read_text().strip(), str(key), traceparent, LAUNCHER)

    user, group = owner
    home = tr.TorqueHome(tmp_path / "torque")
    pro = tr.recorded_invocations("prologue")[0].with_job_id(job_id).with_args(a2=user, a3=group)
    # pbs_mom passes the job shell's exit status as the epilogue's $10: the wrapper's, i.e. the guest's.
    epi_template = tr.recorded_invocations("epilogue")[0]
    hook_env = {"VTORQUE_CONFIG": str(config)}
    if sys.executable != "/opt/vtorque/venv/bin/python":
        hook_env["VTORQUE_PYTHON"] = sys.executable

    prepared = home.prepare(pro, wrapper)
    prepared.nodefile.write_text(f"{node}\n")  # the job's one node is our node worker
    result = tr.run_hook("prologue", prepared, hook_env, timeout=240)
    assert result.returncode == 0, str(result)

    # The job itself: the wrapper runs the launcher, which runs the script in the guest over ssh.
    ran = subprocess.run(["sh", str(prepared.script)], env={**os.environ, "PBS_JOBID": job_id,
                                                             "VTORQUE_CONFIG": str(config)},
                         capture_output=True, text=True, timeout=120)
    # The guest's exit code is the job shell's: Torque records it as Exit_status and hands it to the epilogue.
    assert ran.returncode == 7 and "OTEL-JOB-RAN" in ran.stdout, (ran.stdout, ran.stderr)

    epi = epi_template.with_job_id(job_id).with_args(a2=user, a3=group, a10=str(ran.returncode))
    prepared_epi = home.prepare(epi, wrapper)
    prepared_epi.nodefile.write_text(f"{node}\n")
    result = tr.run_hook("epilogue", prepared_epi, hook_env, timeout=120)
    assert result.returncode == 0, str(result)
    assert "removed 1 guest" in result.stdout, str(result)

    def job_spans():
        return [s for s in rx.spans() if s.trace_id == trace_id]

    def complete():
        names = [(s.service, s.name) for s in job_spans()]
        return (("vtorque-node-worker", "publish vtorque.events") in names and ("vtorque-hook", "epilogue") in names
                and sum(1 for s in job_spans() if s.name == "process vtorque.node." + node) >= 2)

    assert rx.wait_for(complete, timeout=20), sorted((s.service, s.name) for s in job_spans())
    time.sleep(1.5)  # the services' batch processors export every 0.5 s: let stragglers arrive
    spans = job_spans()
    assert not rx.bad_requests, rx.bad_requests
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans), "a span was exported twice"

    # One trace, rooted at submission; no orphans; every span carries the job id.
    roots = [s for s in spans if not s.parent_id]
    assert [r.name for r in roots] == ["vsub submit"], roots
    orphans = [s for s in spans if s.parent_id and s.parent_id not in by_id]
    assert not orphans, orphans
    assert all(s.attributes.get("pbs.job_id") == job_id for s in spans), \
        [s for s in spans if s.attributes.get("pbs.job_id") != job_id]
    other = [s for s in rx.spans() if s.attributes.get("pbs.job_id") == job_id and s.trace_id != trace_id]
    assert not other, f"spans of the job in another trace: {other}"
    services = {s.service for s in spans}
    assert services == {"vtorque-vsub", "vtorque-hook", "vtorque-bridge", "vtorque-stager", "vtorque-node-worker",
                        "vtorque-launcher"}, services

    # Every span vtorque made ends with a real status: OK, or ERROR with its reason (the "vsub submit" here is
    # the test's own). This job went well, so nothing is ERROR.
    from opentelemetry.proto.trace.v1.trace_pb2 import Status

    made = [s for s in spans if s.service != "vtorque-vsub"]
    assert not [s for s in made if s.span.status.code == Status.STATUS_CODE_UNSET], \
        [(s.service, s.name) for s in made if s.span.status.code == Status.STATUS_CODE_UNSET]
    assert all(s.span.status.code == Status.STATUS_CODE_OK for s in made), \
        [(s.service, s.name, s.span.status.message) for s in made if s.span.status.code != Status.STATUS_CODE_OK]

    def named(name, service=None):
        return [s for s in spans if s.name == name and (service is None or s.service == service)]

    # The guest's exit code, as the job's: in the launcher's run span and in the epilogue Torque gave it.
    assert [s.attributes.get("vtorque.exit_code") for s in named("run job in guest")] == [7]
    assert [s.attributes.get("vtorque.exit_status") for s in named("epilogue", "vtorque-hook")] == [7]

    def parent(s):
        return by_id[s.parent_id]

    # Messaging conventions: producer/consumer kinds, rabbitmq, destination, routing key; process spans are
    # children of their message's publish span and link to it.
    producers = [s for s in spans if s.name.startswith("publish ")]
    consumers = [s for s in spans if s.name.startswith("process ")]
    assert producers and consumers
    for s in producers + consumers:
        a = s.attributes
        assert a["messaging.system"] == "rabbitmq", s
        assert a["messaging.destination.name"] in ("vtorque.events", "vtorque.commands"), s
        assert a["messaging.rabbitmq.destination.routing_key"], s
        assert a["messaging.message.id"] and a["vtorque.message.type"], s
    for s in producers:
        assert s.kind == "producer" and s.attributes["messaging.operation.name"] == "publish", s
    for s in consumers:
        assert s.kind == "consumer" and s.attributes["messaging.operation.type"] == "process", s
        assert parent(s).kind == "producer", s
        assert s.links == [(trace_id, s.parent_id)], s
        assert parent(s).attributes["messaging.message.id"] == s.attributes["messaging.message.id"], s
    published = {s.attributes["vtorque.message.type"]: s for s in producers}
    assert {"JobStarted", "JobPlanned", "StageImage", "BootGuests", "ImageStaged", "GuestReady", "JobEnded",
            "TeardownGuests", "GuestsTornDown"} <= set(published), sorted(published)

    # The life of the job: prologue → bridge (planning) → stager, node worker → boot phases → fan-in.
    tree = _tree(spans)
    (prologue,) = named("prologue", "vtorque-hook")
    assert parent(prologue).name == "vsub submit", tree
    # (A consumer of several queues names its process span after all of them: "process q1,q2".)
    bridge_start = [s for s in spans if s.name.startswith("process vtorque.bridge")
                    and parent(s).attributes["vtorque.message.type"] == "JobStarted"]
    assert len(bridge_start) == 1, tree
    bridge_start = bridge_start[0]
    assert parent(parent(bridge_start)) is prologue
    (stage,) = named("process vtorque.stager", "vtorque-stager")
    assert parent(parent(stage)) is bridge_start
    digest = stage.attributes["vtorque.image.digest"]
    assert len(digest) == 64
    (boot,) = named("boot guest", "vtorque-node-worker")
    assert parent(parent(parent(boot))) is bridge_start
    phases = [s for s in spans if s.parent_id == boot.span_id and s.kind == "internal"]
    assert [p.name for p in sorted(phases, key=lambda p: p.span.start_time_unix_nano)] == [
        "wait for image", "prepare disks", "define domain", "start domain", "wait until ready"]
    guest = boot.attributes["vtorque.guest"]
    for s in [boot, *phases, published["GuestReady"]]:
        assert (s.attributes["vtorque.guest"], s.attributes["vtorque.node"], s.attributes["vtorque.image.digest"]) \
            == (guest, node, digest), s
    assert parent(published["GuestReady"]) in (boot, parent(boot)), tree
    (fan_in,) = named("all guests ready", "vtorque-hook")
    assert parent(fan_in) is prologue
    assert fan_in.links == [(trace_id, published["GuestReady"].span_id)]
    assert fan_in.attributes["messaging.batch.message_count"] == 1

    # The run in the guest, then the epilogue and teardown in the same trace.
    (run,) = named("run job in guest", "vtorque-launcher")
    assert parent(run).name == "vsub submit" and run.attributes["vtorque.guest"] == guest
    (epilogue,) = named("epilogue", "vtorque-hook")
    assert parent(epilogue).name == "vsub submit"
    assert prologue.span.end_time_unix_nano <= run.span.start_time_unix_nano <= epilogue.span.start_time_unix_nano
    teardown = [s for s in named(f"process vtorque.node.{node}") if parent(s).attributes["vtorque.message.type"]
                == "TeardownGuests"]
    assert len(teardown) == 1 and parent(parent(teardown[0])).name.startswith("process vtorque.bridge"), tree
    assert parent(parent(parent(teardown[0]))) is published["JobEnded"]
    assert published["JobEnded"].parent_id == epilogue.span_id

    # Metrics over OTLP: boot phases, staging, queue lag, guests running per node.
    def got_metrics():
        points = rx.metric_points()
        return {
            "vtorque.guest.boot.phase.duration",
            "vtorque.messaging.queue.lag",
            "vtorque.image.staging.duration",
            "vtorque.image.staged.size",
            "vtorque.node.guests.running",
            "vtorque.guest.boot.duration",
        } <= set(points)

    assert rx.wait_for(got_metrics, timeout=15), sorted(rx.metric_points())
    points = rx.metric_points()
    phases_seen = {p[1]["vtorque.boot.phase"] for p in points["vtorque.guest.boot.phase.duration"]
                   if p[1].get("vtorque.node") == node}
    assert {"image", "disks", "define", "start", "ready"} <= phases_seen, phases_seen
    lag_queues = {p[1]["messaging.destination.subscription.name"] for p in points["vtorque.messaging.queue.lag"]}
    assert {"vtorque.stager", f"vtorque.node.{node}"} <= lag_queues, lag_queues
    assert any(q.split(",")[0] == "vtorque.bridge" for q in lag_queues), lag_queues
    assert any(p[1] == {"vtorque.node": node} for p in points["vtorque.node.guests.running"])
    units = rx.metric_units()
    assert units["vtorque.guest.boot.phase.duration"] == "s" and units["vtorque.image.staged.size"] == "By"

    # Logs: JSON lines; every line about this job carries its trace id; the handlers' lines carry the job id.
    # "guests removed" is the teardown's last line, written by its clean-up thread after the answer the
    # epilogue waited for: waited for, bounded.
    gone_by = time.monotonic() + 30
    while time.monotonic() < gone_by and not any(
            json.loads(line).get("msg") == "guests removed" and json.loads(line).get("job_id") == job_id
            for line in (logs / "node-worker.log").read_text().splitlines()):
        time.sleep(0.2)
    job_lines = []
    for service in ("bridge", "stager", "node-worker"):
        for line in (logs / f"{service}.log").read_text().splitlines():
            doc = json.loads(line)  # every line is one JSON object
            assert {"ts", "level", "service", "msg"} <= set(doc), line
            if doc.get("job_id") == job_id:
                job_lines.append(doc)
                assert doc.get("trace_id") == trace_id, line
    assert {"job planned", "image staged", "guest ready", "guests removed"} <= {d["msg"] for d in job_lines}, \
        [d["msg"] for d in job_lines]

    # `vtorque nodes` sees our node worker's heartbeat.
    env = {**os.environ, "VTORQUE_CONFIG": str(config)}
    nodes = subprocess.run([str(VENV_BIN / "vtorque"), "nodes", "--json"], env=env, capture_output=True,
                           text=True, timeout=30)
    beats = [json.loads(line) for line in nodes.stdout.splitlines()]
    assert any(b["node"] == node and b["domain_type"] in ("kvm", "qemu") and b["cores"] >= 1 for b in beats), nodes
