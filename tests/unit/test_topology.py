"""The topology table is the one place queues, routes and senders are named; everything derives from it."""

import ast
import re
from pathlib import Path

import pytest

from vtorque.shared import messages as m
from vtorque.shared import topology as t

ROOT = Path(__file__).parents[2]


def _concrete_messages() -> list[type]:
    out, todo = [], [m.Message]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls not in (m.Message, m.Command, m.Event):
            out.append(cls)
    return out


def test_every_message_type_has_a_flow():
    assert set(_concrete_messages()) == set(t.FLOWS)


@pytest.mark.parametrize("message_type", list(t.FLOWS), ids=lambda c: c.__name__)
def test_every_published_type_reaches_exactly_the_consumers_the_table_says(message_type):
    assert t.consumers_of(message_type) == set(t.FLOWS[message_type].consumers)


@pytest.mark.parametrize("pattern,key,hit", [
    ("job.*.job_started", "job.12%2Esrv.job_started", True),
    ("job.*.job_started", "job.12.srv.job_started", False),
    ("job.7.#", "job.7", True), ("job.7.#", "job.7.a.b", True), ("job.7.#", "job.8.a", False),
    ("#", "anything.at.all", True), ("node.*.heartbeat", "node.n1.heartbeat", True),
])
def test_topic_matching_is_amqps(pattern, key, hit):
    assert t.topic_matches(pattern, key) is hit


def test_an_events_routing_key_is_its_route_in_the_table():
    ended = m.JobEnded.new(job_id="12.srv", deadline=5.0, scheduler="slurm", nodes=["n1"])
    assert ended.routing_key() == "job.12%2Esrv.job_ended"
    staged = m.ImageStageFailed.new(job_id="12.srv", deadline=5.0, image="tiny", digest="ab" * 32, reason="x")
    assert staged.routing_key() == f"image.{'ab' * 32}.stage_failed"
    for cls, flow in t.FLOWS.items():
        if issubclass(cls, m.Event) and flow.route.startswith("job."):
            assert flow.route == "job.{job}." + m._snake(cls.__name__), cls


# -- senders ---------------------------------------------------------------------------------------------------

def test_a_sender_is_checked_by_role_and_a_node_speaks_only_for_itself():
    ready = m.GuestReady.new(job_id="1", deadline=5.0, guest="g", node="n1", index=0, address="127.0.0.1",
                             ssh_port=22, timings=m.PhaseTimings(image=0, disks=0, define=0, start=0,
                                                                 kernel_up=None, ready=0))
    assert t.may_publish("vtorque-node-n1", ready) is None
    assert "for node n1 sent by vtorque-node-n2" in t.may_publish("vtorque-node-n2", ready)
    assert "not by vtorque-bridge" in t.may_publish("vtorque-bridge", ready)
    assert "not one of vtorque's" in t.may_publish("guest", ready)
    assert "not one of vtorque's" in t.may_publish(None, ready)
    ended = m.JobEnded.new(job_id="1", deadline=5.0, scheduler="slurm", nodes=["n1"])
    assert t.may_publish("vtorque-hook", ended) is None
    assert t.may_publish("vtorque-node-n1", ended) is not None  # a node cannot end another user's job


def test_roles_of_broker_user_names():
    assert t.role_of("vtorque-node-n17") == ("node", "n17")
    assert t.role_of("vtorque-bridge") == ("bridge", None)
    assert t.role_of("vtorque-node-") == (None, None)
    assert t.role_of("vtorque-admin") == (None, None)
    assert t.broker_user("node", "n3") == "vtorque-node-n3"


# -- permissions derived from the table -------------------------------------------------------------------------

def _can(regex: str, name: str) -> bool:
    return re.fullmatch(regex, name) is not None


def test_a_node_may_publish_only_its_own_events_and_read_only_its_own_queue():
    p = t.broker_permissions("node", "n1")
    assert _can(p.topics[t.EVENTS][0], "node.n1.heartbeat") and not _can(p.topics[t.EVENTS][0], "node.n2.heartbeat")
    assert _can(p.topics[t.EVENTS][0], "job.7.guest_ready")
    assert not _can(p.topics[t.EVENTS][0], "job.7.job_ended") and not _can(p.topics[t.EVENTS][0], "job.7.job_started")
    assert _can(p.read, "vtorque.node.n1") and not _can(p.read, "vtorque.node.n2")
    assert not _can(p.read, "vtorque.bridge") and not _can(p.configure, "vtorque.stager")
    assert not _can(p.configure, "vtorque.node.n2")
    # commands: a node may ask for a staging, never command a node (its own or another)
    assert _can(p.topics[t.COMMANDS][0], "stager") and not _can(p.topics[t.COMMANDS][0], "node.n2")
    assert _can(p.topics[t.COMMANDS][1], "node.n1") and not _can(p.topics[t.COMMANDS][1], "node.n2")


def test_hooks_may_start_and_end_jobs_and_wait_on_their_own_queues_only():
    p = t.broker_permissions("hook")
    assert _can(p.topics[t.EVENTS][0], "job.1%2Evm.job_started") and _can(p.topics[t.EVENTS][0], "job.1%2Evm.job_ended")
    assert not _can(p.topics[t.EVENTS][0], "job.1.guest_ready") and not _can(p.write, "vtorque.commands")
    assert _can(p.configure, "vtorque.hook.1%2Evm.0123456789ab")
    assert not _can(p.configure, "vtorque.bridge") and not _can(p.read, "vtorque.node.n1")
    assert _can(p.topics[t.EVENTS][1], "job.1%2Evm.#")


def test_the_bridge_commands_nodes_but_cannot_take_their_queues():
    p = t.broker_permissions("bridge")
    assert _can(p.write, "vtorque.commands") and _can(p.read, "vtorque.nodes")
    assert not _can(p.configure, "vtorque.node.n1") and not _can(p.read, "vtorque.node.n1")
    assert not _can(p.topics[t.EVENTS][0], "job.1.guest_ready") and _can(p.topics[t.EVENTS][0], "job.1.job_planned")
    assert _can(p.topics[t.COMMANDS][0], "node.n7") and _can(p.topics[t.COMMANDS][0], "stager")


# -- nothing else names a queue or a route ----------------------------------------------------------------------

# A table name, a templated name's fixed start ("vtorque.hook."), or a routing pattern with a wildcard.
NAMES = {q.name for q in t.QUEUES.values() if "{" not in q.name} | {t.prefix(q.name) for q in t.QUEUES.values()
                                                                   if "{" in q.name}
ROUTE_LITERAL = re.compile(r"^(job|image|node)\.(\*|#)(\.|$)")


def test_every_name_of_the_table_is_in_its_namespace():
    names = [*t.EXCHANGES, *(q.name for q in t.QUEUES.values())]
    assert all(n.startswith(t.NAMESPACE) for n in names), names
    assert all(re.match(t.namespace_regex(), n) for n in names)
    assert t.namespace_regex() == r"^vtorque\." and not re.match(t.namespace_regex(), "vtorqueXevents")


def test_no_queue_or_routing_pattern_is_typed_outside_the_table():
    offenders = []
    for folder in ("shared", "services", "cli", "hooks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "topology.py":
                continue
            tree = ast.parse(path.read_text())
            # logger names and span/metric attribute keys share the "vtorque." namespace: not queue names
            exempt = {id(k) for d in ast.walk(tree) if isinstance(d, ast.Dict) for k in d.keys}
            exempt |= {id(a) for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "attr", "")
                       == "getLogger" for a in c.args}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in exempt:
                    # the namespace too, as the broker permission regex it becomes (topology.namespace_regex)
                    if node.value in NAMES or ROUTE_LITERAL.match(node.value) or "vtorque\\." in node.value:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "\n".join(offenders)


# Which role each module publishes as (a module that builds a message is the one that sends it).
ROLE_OF_MODULE = [
    ("hooks/", "hook"), ("services/scheduler_bridge/accounting.py", "prefetch"),
    ("services/scheduler_bridge/", "bridge"), ("services/image_stager/", "stager"),
    ("services/node_worker/", "node"), ("cli/images.py", "operator"), ("cli/migrate.py", "operator"),
]


# Built but never published: the Torque prologue's in-process stand-in for "cancelled while booting".
NOT_PUBLISHED = {("hooks/torque/channel.py", "JobRejected")}


def test_code_builds_only_the_messages_its_role_may_send():
    offenders = []
    names = {cls.__name__: cls for cls in t.FLOWS}
    for folder in ("services", "cli", "hooks"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            role = next((r for prefix, r in ROLE_OF_MODULE if rel.startswith(prefix)), None)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    target = node.func.value if node.func.attr == "new" else node.func
                    name = target.attr if isinstance(target, ast.Attribute) else None
                    if (rel, name) in NOT_PUBLISHED:
                        continue
                    if name in names and (role is None or role not in t.FLOWS[names[name]].publishers):
                        offenders.append(f"{rel}:{node.lineno}: {name} built by {role or 'no role'}")
    assert not offenders, "\n".join(offenders)


def test_a_waiter_may_bind_its_pattern_or_any_key_under_it_and_nothing_else():
    binds = t.broker_permissions("hook").topics[t.EVENTS][1]
    assert _can(binds, "job.7.#") and _can(binds, "job.7.guests_torn_down") and _can(binds, "image.ab.#")
    assert not _can(binds, "#") and not _can(binds, "node.n1.heartbeat") and not _can(binds, "job.#")


def test_waiters_take_their_patterns_and_routes_from_the_table():
    """The hooks and `vtorque images pull` type no pattern: what they bind is the table's, filled in."""
    assert t.bindings(t.HOOK_Q, job="7%2Evm", digest="ab") == ["job.7%2Evm.#", "image.ab.#"]
    assert t.bindings(t.PULL_Q, digest="ab") == ["image.ab.#"]
    torn = m.GuestsTornDown.new(job_id="7.vm", deadline=5.0, node="n1", guests=[], disks_removed=0)
    assert t.route(m.GuestsTornDown, job=m.routing_word("7.vm")) == torn.routing_key()
