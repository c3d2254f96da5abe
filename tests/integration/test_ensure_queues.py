"""shared/bus.ensure_queues on a real broker (the tests' own vhost): a bridge's first command to many nodes probes
their queues with passive declares sent a batch at a time. Every queue missing among them, in the first batch, on
a batch's edge or after it, is declared where it was missing; the queues that existed are used as they are (their
messages stay); nothing else appears."""

from __future__ import annotations

import uuid

import kombu

from vtorque.shared import bus, topology


def _node_queues(count: int) -> list[kombu.Queue]:
    tag = uuid.uuid4().hex[:6]
    return [bus.kombu_queue(topology.queue(topology.NODE_Q, node=f"eq{tag}{i:04d}")) for i in range(count)]


def _exists(conn: kombu.Connection, name: str) -> int | None:
    """The queue's message count, None when it does not exist."""
    ch = conn.channel()
    try:
        return ch.queue_declare(name, passive=True).message_count
    except Exception:  # noqa: BLE001 - amqp's NotFound: no such queue
        return None
    finally:
        if ch.is_open:
            ch.close()


def test_missing_queues_anywhere_in_the_batches_are_declared_and_existing_ones_kept(broker_url):
    count = bus.PROBE_BATCH * 2 + 10
    queues = _node_queues(count)
    missing = {0, 1, 5, bus.PROBE_BATCH - 1, bus.PROBE_BATCH, bus.PROBE_BATCH + 1, count - 1}
    with kombu.Connection(broker_url) as conn:
        ch = conn.channel()
        bus.declare_topology(ch)
        try:
            for i, queue in enumerate(queues):
                if i not in missing:
                    queue(ch).declare()
            with kombu.Producer(ch) as producer:  # a command waiting in an existing queue
                producer.publish(b"waiting", exchange="", routing_key=queues[2].name)
            assert [i for i, q in enumerate(queues) if _exists(conn, q.name) is None] == sorted(missing)

            bus.ensure_queues(ch, queues)

            assert [i for i, q in enumerate(queues) if _exists(conn, q.name) is None] == []
            assert _exists(conn, queues[2].name) == 1  # used as it was: its message is there
            assert ch.is_open  # the caller's channel is not the probe's: a NotFound never closed it
        finally:
            for queue in queues:
                ch.queue_delete(queue.name)
            ch.close()


def test_no_queue_missing_and_none_at_all(broker_url):
    queues = _node_queues(3)
    with kombu.Connection(broker_url) as conn:
        ch = conn.channel()
        bus.declare_topology(ch)
        try:
            bus.ensure_queues(ch, [])
            for queue in queues:
                queue(ch).declare()
            bus.ensure_queues(ch, queues)
            assert all(_exists(conn, q.name) == 0 for q in queues)
        finally:
            for queue in queues:
                ch.queue_delete(queue.name)
            ch.close()
