"""Least privilege on the real broker: `vtorque broker setup` makes one user per part with what the topology table
allows, and the broker itself refuses the rest. On a vhost and with user names of this test's own (broker users
are broker-wide: the stack's own users are never touched)."""

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import amqp.exceptions
import kombu
import pytest

from vtorque.shared import messages as m
from vtorque.shared import topology as t
from vtorque.shared.bus import COMMANDS, EVENTS, ServiceRunner, table_queue
from vtorque.shared.hook_channel import HookChannel

VTORQUE = str(Path(sys.executable).parent / "vtorque")


def _ctl(*args, check=True):
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=check)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tag = uuid.uuid4().hex[:6]
    vhost, prefix, creds = f"vtorque-test-{tag}", f"vt{tag}-", tmp_path_factory.mktemp("broker-creds")
    argv = [VTORQUE, "broker", "setup", "--vhost", vhost, "--node", "n1", "--node", "n2",
            "--credentials-dir", str(creds), "--user-prefix", prefix]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    yield {"vhost": vhost, "prefix": prefix, "creds": creds, "argv": argv}
    for line in _ctl("list_users").stdout.splitlines():
        if line.startswith(prefix):
            _ctl("delete_user", line.split("\t")[0], check=False)
    _ctl("delete_vhost", vhost, check=False)


def _url(site, role, node=None) -> str:
    user = t.broker_user(role, node, site["prefix"])
    secret = (site["creds"] / f"{user}.credentials").read_text().strip()
    return f"amqp://{secret}@127.0.0.1:5672/{site['vhost']}"


def _publish(url, exchange, routing_key, body=b"{}", **props):
    with kombu.Connection(url, transport_options={"confirm_publish": True}) as conn:
        kombu.Producer(conn.channel()).publish(body, exchange=exchange, routing_key=routing_key,
                                               content_type="application/json", retry=False, **props)


def test_every_part_gets_a_user_and_a_secret_only_root_reads(site):
    files = sorted(p.name for p in site["creds"].iterdir())
    expected = sorted(f"{t.broker_user(r, n, site['prefix'])}.credentials"
                      for r, n in [("hook", None), ("prefetch", None), ("bridge", None), ("stager", None),
                                   ("operator", None), ("node", "n1"), ("node", "n2")])
    assert files == expected
    for path in site["creds"].iterdir():
        assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == 0
    before = {p.name: p.read_text() for p in site["creds"].iterdir()}
    again = subprocess.run(site["argv"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_text() for p in site["creds"].iterdir()} == before  # idempotent: secrets kept
    users = _ctl("list_users").stdout
    assert not any(line.startswith("vtorque-setup") for line in users.splitlines()), "the set-up user is gone"


def test_a_node_cannot_command_another_node_nor_speak_for_it(site):
    node1 = _url(site, "node", "n1")
    boot = m.TeardownGuests.new(job_id="1", deadline=30.0, node="n2")
    with pytest.raises(amqp.exceptions.AccessRefused):
        _publish(node1, COMMANDS.name, "node.n2", m.encode(boot))
    with pytest.raises(amqp.exceptions.AccessRefused):
        _publish(node1, EVENTS.name, "node.n2.heartbeat")
    with pytest.raises(amqp.exceptions.AccessRefused):
        _publish(node1, EVENTS.name, "job.1.job_ended")  # a node cannot end anyone's job
    with kombu.Connection(node1) as conn:
        with pytest.raises(amqp.exceptions.AccessRefused):
            table_queue(t.NODE_Q, node="n2")(conn.channel()).get()  # nor read another node's commands
    _publish(node1, EVENTS.name, "node.n1.heartbeat", user_id=t.broker_user("node", "n1", site["prefix"]))


def test_the_hooks_cannot_announce_guests_or_command_nodes(site):
    hook = _url(site, "hook")
    with pytest.raises(amqp.exceptions.AccessRefused):
        _publish(hook, EVENTS.name, "job.1.guest_ready")
    with pytest.raises(amqp.exceptions.AccessRefused):
        _publish(hook, COMMANDS.name, "node.n1")
    _publish(hook, EVENTS.name, "job.1.job_started")


def test_a_forged_sender_is_refused_by_the_broker(site):
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        _publish(_url(site, "hook"), EVENTS.name, "job.1.job_started",
                 user_id=t.broker_user("bridge", prefix=site["prefix"]))


def test_a_consumer_dead_letters_what_its_sender_may_not_send(site):
    """A node's user may publish on its own routing key, but a heartbeat claiming another node is refused by
    the bridge's runner (the body is checked against the broker-validated user_id)."""
    bridge, node1, operator = _url(site, "bridge"), _url(site, "node", "n1"), _url(site, "operator")
    seen = []
    queue = table_queue(t.BRIDGE_NODES_Q, tag=uuid.uuid4().hex[:8])
    runner = ServiceRunner(bridge, [queue], {m.NodeHeartbeat: seen.append}, user_prefix=site["prefix"])
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        assert runner.ready.wait(20) and runner.check_senders
        beat = lambda node: m.NodeHeartbeat.new(job_id="", deadline=30.0, node=node, cores=2, mem_free_mib=1024,  # noqa: E731
                                                guests_running=0, domain_type="qemu")
        user = t.broker_user("node", "n1", site["prefix"])
        _publish(node1, EVENTS.name, "node.n1.heartbeat", m.encode(beat("n2")), user_id=user)
        _publish(node1, EVENTS.name, "node.n1.heartbeat", m.encode(beat("n1")), user_id=user)
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [b.node for b in seen] == ["n1"]
        with kombu.Connection(operator) as conn:
            dead = None
            for _ in range(100):
                dead = table_queue(t.DEAD_QUEUE)(conn.channel()).get(no_ack=True)
                if dead is not None:
                    break
                time.sleep(0.1)
        assert dead is not None
        assert "for node n2 sent by" in dead.headers["x-vtorque-reason"]
        assert dead.headers["x-vtorque-sender"] == user
    finally:
        runner.stop()
        thread.join(10)


def test_each_part_can_wait_for_what_it_waits_for(site):
    """A node worker waits for an image's staging, `vtorque images pull` too: as their own users (the waiter's
    binding must not declare the exchange, which no part may configure)."""
    from vtorque.shared.bus import EventWaiter

    digest = "ab" * 32
    for role, node, prefix in (("node", "n1", t.prefix(t.WAIT_Q)), ("operator", None, t.prefix(t.PULL_Q))):
        waiter = EventWaiter(_url(site, role, node), [f"image.{digest}.#"], prefix=prefix)
        waiter.close()
    hook = HookChannel(_url(site, "hook"), [f"job.{m.routing_word('9.srv')}.#", f"image.{digest}.#"], attempts=1)
    hook.close()


def test_a_jobs_one_boot_command_reaches_each_of_its_nodes_once_as_the_bridges(site):
    """The bridge publishes a job's BootGuests once, the other nodes' routing keys in its BCC header (shared/bus.py
    sender_selected): as the bridge's own user, through kombu and py-amqp, each node's user finds exactly one copy
    in its own queue, sent by the bridge, with the BCC header gone (the broker removes it)."""
    from vtorque.shared.bus import Publisher
    from vtorque.shared.job_boot import expand

    guest = m.GuestTemplate(image="tiny", image_digest="a" * 64, vcpus=1, ram_mib=128,
                            owner=m.Owner(user="u", uid=1000, gid=1000), ssh_authorized_keys=["k"])
    boot = m.BootGuests.new(job_id="5", deadline=30.0, guest=guest, nodes=["n1", "n2"],
                            cores=m.NodeCores(guests=[None]))
    for node in ("n1", "n2"):  # as each node worker declares its own queue when it starts
        with kombu.Connection(_url(site, "node", node)) as conn:
            table_queue(t.NODE_Q, node=node)(conn.channel()).declare()
    publisher = Publisher(_url(site, "bridge"))
    try:
        publisher.publish(boot)
    finally:
        publisher.close()
    for node in ("n1", "n2"):
        with kombu.Connection(_url(site, "node", node)) as conn:
            queue = table_queue(t.NODE_Q, node=node)(conn.channel())
            got = queue.get(no_ack=True)
            assert got is not None and queue.get(no_ack=True) is None, node  # one copy each
            assert m.decode(got.body) == boot and expand(boot, node).guests[0].node == node
            assert got.properties["user_id"] == t.broker_user("bridge", prefix=site["prefix"])
            assert "BCC" not in (got.headers or {})


def test_a_node_that_bccs_another_nodes_queue_is_refused_by_that_nodes_consumer(site):
    """RabbitMQ before 4.0 checks topic permissions on a publish's routing key but not on its CC/BCC keys
    (rabbitmq-server#12553): node n1's user may send `stager` commands, and with `node.n2` in the BCC header the
    broker puts the body in n2's queue as well. What keeps n2 safe is its consumer's check of every body against
    the broker-validated sender: a TeardownGuests from n1's user is dead-lettered, never handled."""
    node1, node2, operator = _url(site, "node", "n1"), _url(site, "node", "n2"), _url(site, "operator")
    seen = []
    runner = ServiceRunner(node2, [table_queue(t.NODE_Q, node="n2")], {m.TeardownGuests: seen.append},
                           user_prefix=site["prefix"])
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        assert runner.ready.wait(20) and runner.check_senders
        forged = m.TeardownGuests.new(job_id="6", deadline=30.0, node="n2")
        user = t.broker_user("node", "n1", site["prefix"])
        try:
            _publish(node1, COMMANDS.name, "stager", m.encode(forged), user_id=user, headers={"BCC": ["node.n2"]})
        except amqp.exceptions.AccessRefused:
            return  # a broker that checks BCC keys (4.0 and later): refused before any consumer sees it
        dead = None
        with kombu.Connection(operator) as conn:
            for _ in range(100):
                dead = table_queue(t.DEAD_QUEUE)(conn.channel()).get(no_ack=True)
                if dead is not None and m.decode(dead.body).message_id == forged.message_id:
                    break
                time.sleep(0.1)
        assert dead is not None and "may be sent by bridge, not by" in dead.headers["x-vtorque-reason"]
        assert seen == []
    finally:
        runner.stop()
        thread.join(10)
        with kombu.Connection(_url(site, "stager")) as conn:  # the copy routed by its own key: not left behind
            table_queue(t.STAGER_Q)(conn.channel()).purge()
