"""The bus against the real RabbitMQ on 127.0.0.1:5672, in the test session's own vhost (tests/conftest.py); and
the proof that nothing published there reaches the default vhost, where the single-host stack's services
consume."""

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import quote

import kombu
import pytest
from conftest import stack_observer, stack_vhosts
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from vtorque.shared import messages as m
from vtorque.shared.bus import COMMANDS, DEAD_QUEUE, EVENTS, EventWaiter, Publisher, ServiceRunner, node_queue

HERE = os.path.dirname(__file__)


def queue_depth(url, name):
    with kombu.Connection(url) as conn:
        _, messages, _ = conn.channel().queue_declare(name, passive=True)
        return messages


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_consumer(url, node, effects, mode=""):
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "bus_consumer.py"), url, node, str(effects), mode],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_command_survives_a_consumer_killed_before_its_ack(broker_url, node_name, tmp_path):
    job = f"job-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(broker_url)
    publisher.publish(m.TeardownGuests.new(job_id=job, deadline=60.0, node=node_name))
    first = start_consumer(broker_url, node_name, tmp_path, "hang")
    log = tmp_path / "log"
    wait_for(lambda: log.exists() and "applied" in log.read_text(), what="the first consumer's effect")
    first.kill()
    first.wait()
    assert queue_depth(broker_url, f"vtorque.node.{node_name}") == 1  # back in the queue, not lost
    second = start_consumer(broker_url, node_name, tmp_path)
    try:
        wait_for(lambda: "already-done" in log.read_text(), what="the redelivery")
        wait_for(lambda: queue_depth(broker_url, f"vtorque.node.{node_name}") == 0, what="the ack")
    finally:
        second.terminate()
        second.wait(10)
    lines = log.read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["applied", "already-done"]  # redelivered, effect once
    publisher.close()


def test_a_malformed_body_is_dead_lettered_with_its_reason(broker_url, node_name):
    marker = f"garbage-{uuid.uuid4().hex}".encode()
    runner = ServiceRunner(broker_url, [node_queue(node_name)], {m.TeardownGuests: lambda c: None})
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    assert runner.ready.wait(10)
    with kombu.Connection(broker_url) as conn:
        kombu.Producer(conn.channel()).publish(b"{" + marker, exchange="vtorque.commands",
                                               routing_key=f"node.{node_name}", delivery_mode=2)
        found = []
        dead = DEAD_QUEUE(conn.channel())

        def look():
            msg = dead.get(no_ack=False)
            while msg is not None:
                if marker in msg.body:
                    found.append(msg)
                    msg.ack()
                    return True
                msg.reject(requeue=True) if False else msg.ack()
                msg = dead.get(no_ack=False)
            return False

        wait_for(look, what="the dead letter")
    runner.stop()
    thread.join(10)
    reason = found[0].headers["x-vtorque-reason"]
    assert reason.startswith("undecodable") and found[0].headers["x-vtorque-routing-key"] == f"node.{node_name}"
    assert queue_depth(broker_url, f"vtorque.node.{node_name}") == 0


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace._TRACER_PROVIDER = None  # the tests own the global provider
    trace._TRACER_PROVIDER_SET_ONCE._done = False
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


def test_the_trace_context_crosses_the_broker(broker_url, node_name, spans):
    done = threading.Event()
    runner = ServiceRunner(broker_url, [node_queue(node_name)], {m.TeardownGuests: lambda c: done.set()})
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    assert runner.ready.wait(10)
    publisher = Publisher(broker_url)
    with trace.get_tracer("test").start_as_current_span("submit"):
        publisher.publish(m.TeardownGuests.new(job_id="77.srv", deadline=60.0, node=node_name))
    assert done.wait(15)
    runner.stop()
    thread.join(10)
    publisher.close()
    finished = spans.get_finished_spans()
    producer = next(s for s in finished if s.kind is SpanKind.PRODUCER)
    consumer = next(s for s in finished if s.kind is SpanKind.CONSUMER)
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.context.trace_id == producer.context.trace_id
    assert [link.context.span_id for link in consumer.links] == [producer.context.span_id]
    for span in (producer, consumer):
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["pbs.job_id"] == "77.srv"
    assert producer.attributes["messaging.rabbitmq.destination.routing_key"] == f"node.{node_name}"


def test_an_expired_command_is_dropped_with_an_event(broker_url, node_name):
    job = f"exp-{uuid.uuid4().hex[:8]}"
    called = []
    waiter = EventWaiter(broker_url, [f"job.{job}.command_expired"])
    Publisher(broker_url).publish(m.TeardownGuests.new(job_id=job, deadline=-1.0, node=node_name))
    runner = ServiceRunner(broker_url, [node_queue(node_name)], {m.TeardownGuests: called.append})
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    event = waiter.next(time.monotonic() + 15)
    runner.stop()
    thread.join(10)
    waiter.close()
    assert isinstance(event, m.CommandExpired) and event.command == "TeardownGuests"
    assert called == []
    assert queue_depth(broker_url, f"vtorque.node.{node_name}") == 0


def test_a_slow_handler_keeps_its_connection(broker_url, node_name):
    """Heartbeats keep flowing while the handler works longer than two heartbeat intervals."""
    done = threading.Event()

    def slow(cmd):
        time.sleep(7)
        done.set()

    runner = ServiceRunner(broker_url, [node_queue(node_name)], {m.TeardownGuests: slow}, heartbeat=2)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    assert runner.ready.wait(10)
    Publisher(broker_url).publish(m.TeardownGuests.new(job_id="slow", deadline=60.0, node=node_name))
    assert done.wait(20)
    wait_for(lambda: queue_depth(broker_url, f"vtorque.node.{node_name}") == 0, what="the ack after a slow handler")
    runner.stop()
    thread.join(10)


def test_two_queues_are_handled_one_at_a_time_and_all_acked(broker_url, node_name):
    """Prefetch is per consumer: a delivery on the second queue while the first is handled waits its turn."""
    other = f"{node_name}-b"
    running, seen, overlap = [], [], []

    def handle(cmd):
        if running:
            overlap.append(cmd.job_id)
        running.append(cmd.job_id)
        time.sleep(0.5)
        seen.append(cmd.job_id)
        running.pop()

    runner = ServiceRunner(broker_url, [node_queue(node_name), node_queue(other)], {m.TeardownGuests: handle})
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    assert runner.ready.wait(10)
    publisher = Publisher(broker_url)
    for i in range(3):
        publisher.publish(m.TeardownGuests.new(job_id=f"a{i}", deadline=60.0, node=node_name))
        publisher.publish(m.TeardownGuests.new(job_id=f"b{i}", deadline=60.0, node=other))
    try:
        wait_for(lambda: len(seen) == 6, what="all six handled")
        wait_for(lambda: queue_depth(broker_url, f"vtorque.node.{node_name}") == 0
                 and queue_depth(broker_url, f"vtorque.node.{other}") == 0, what="all acked")
        assert overlap == [] and sorted(seen) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    finally:
        runner.stop()
        thread.join(10)
        publisher.close()
        with kombu.Connection(broker_url) as conn:
            conn.channel().queue_delete(f"vtorque.node.{other}")


def test_one_publisher_shared_by_threads_delivers_every_message(broker_url):
    """A service's handlers may run in several threads (the stager's concurrent stagings) and share its
    Publisher: each thread gets a connection of its own, so nothing is garbled or lost."""
    job = f"thr-{uuid.uuid4().hex[:8]}"
    waiter = EventWaiter(broker_url, [f"job.{job}.#"])
    publisher = Publisher(broker_url)
    errors = []

    def burst(t):
        try:
            for i in range(25):
                publisher.publish(m.JobRejected.new(job_id=job, deadline=60.0, reason=f"{t}-{i}"))
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)
        finally:
            publisher.close()

    threads = [threading.Thread(target=burst, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got = set()
    deadline = time.monotonic() + 20
    while len(got) < 200 and (event := waiter.next(deadline)) is not None:
        got.add(event.reason)
    waiter.close()
    assert errors == [] and len(got) == 200


def test_the_test_broker_user_has_no_rights_on_the_stacks_vhosts(test_broker):
    for vhost in stack_vhosts():
        outside = f"amqp://{test_broker.user}:{test_broker.password}@127.0.0.1:5672/{quote(vhost, safe='')}"
        with pytest.raises(Exception) as refused:
            with kombu.Connection(outside, connect_timeout=3) as conn:
                conn.ensure_connection(max_retries=1)
                conn.channel()
        text = str(refused.value).lower()
        assert "refused" in text or "not allowed" in text or "access" in text, (vhost, repr(refused.value))


def test_what_tests_publish_never_reaches_the_stacks_vhost(broker_url):
    """An observer on each vhost a stack listens on (the site config's, and "/"), bound as the stack's bridge,
    stager and this host's node worker are (every event, the stager's and this host's command keys), sees
    nothing of what the test broker carries, while a listener on the test vhost sees all of it. The messages
    are harmless even if they leaked: a job that does not exist ended, and a teardown of it."""
    host = os.uname().nodename.split(".")[0]  # the stack's node worker consumes node.<this host>
    job = f"isolation-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        observers = []
        for vhost in stack_vhosts():
            conn = stack.enter_context(kombu.Connection(stack.enter_context(stack_observer(vhost)),
                                                        connect_timeout=3))
            channel = conn.channel()
            # Bound to the stack's exchanges as they are (never declared here: the stack made them).
            queue = f"vtorque-test-observer-{uuid.uuid4().hex[:8]}"
            channel.queue_declare(queue, exclusive=True, auto_delete=True, durable=False)
            try:
                for exchange, key in ((EVENTS.name, "#"), (COMMANDS.name, "stager"), (COMMANDS.name, f"node.{host}")):
                    channel.queue_bind(queue, exchange=exchange, routing_key=key)
            except Exception as exc:  # noqa: BLE001 - no stack on this vhost: nothing could reach it
                if vhost != "/":
                    pytest.fail(f"the stack's vhost {vhost!r} has no vtorque exchanges ({exc}): is the stack set up?")
                continue
            observers.append((vhost, channel, queue))
        assert observers, "no stack vhost to observe"
        waiter = EventWaiter(broker_url, [f"job.{job}.#"])
        publisher = Publisher(broker_url)
        try:
            publisher.publish(m.JobEnded.new(job_id=job, deadline=30.0, scheduler="slurm", nodes=[host],
                                             exit_status=0))
            publisher.publish(m.TeardownGuests.new(job_id=job, deadline=30.0, node=host))
            got = waiter.next(time.monotonic() + 10)
            assert isinstance(got, m.JobEnded) and got.job_id == job  # the test vhost carried it
            time.sleep(1.0)
            seen = []
            for vhost, channel, queue in observers:
                while (msg := channel.basic_get(queue, no_ack=True)) is not None:
                    # The stack's own traffic (its nodes' heartbeats) lands here too; kombu hands a JSON body
                    # over as str, anything else as bytes.
                    body = msg.body.encode() if isinstance(msg.body, str) else msg.body
                    if job.encode() in body:
                        seen.append((vhost, msg.delivery_info.get("routing_key")))
            assert seen == [], f"the stack's vhosts received the test's messages: {seen}"
        finally:
            waiter.close()
            publisher.close()
        with kombu.Connection(broker_url) as conn:
            conn.channel().queue_delete(f"vtorque.node.{host}")


def test_one_publisher_serves_every_thread_each_on_its_own_connection(broker_url):
    """The one way to publish from any thread (the stager's concurrent consumers, the node worker's boot threads
    and heartbeat): one Publisher, no lock; every message arrives, each thread had a connection of its own,
    and close_all() closes them all, threads gone included."""
    job = f"threads-{uuid.uuid4().hex[:8]}"
    waiter = EventWaiter(broker_url, [f"job.{job}.#"])
    publisher = Publisher(broker_url)
    conns, errors = [], []
    start = threading.Barrier(4)

    def publish(i):
        try:
            start.wait()
            for k in range(5):
                publisher.publish(m.GuestsTornDown.new(job_id=job, deadline=60.0, node=f"n{i}",
                                                       guests=[f"g{k}"], disks_removed=0))
            conns.append(publisher._local.conn)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert len({id(c) for c in conns}) == 4
        seen = set()
        deadline = time.monotonic() + 20
        while len(seen) < 20 and (event := waiter.next(deadline)) is not None:
            seen.add((event.node, event.guests[0]))
        assert len(seen) == 20
    finally:
        waiter.close()
        publisher.close_all()
    assert all(not c.connected for c in conns)
