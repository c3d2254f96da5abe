"""`vtorque nodes`, doctor and a starting bridge read the nodes' retained heartbeats from vtorque.nodes (real
broker, the tests' own vhost). A heartbeat sent twice (a publisher that heard no confirm sends again) must not be
taken for the end of the queue: the rig's fault tests c and d found every node "not heard from" for a minute
after a broker node's link came back, the time the repeated copy took to expire."""

from __future__ import annotations

from datetime import timedelta

from vtorque.shared import messages as m
from vtorque.shared.bus import Publisher
from vtorque.shared.node_registry import latest_per_node, nodes_queue, read_heartbeats


def _beat(node: str, seconds_ago: float) -> m.NodeHeartbeat:
    beat = m.NodeHeartbeat.new(job_id="", deadline=30.0, node=node, cores=2, mem_free_mib=1024, guests_running=0,
                               domain_type="qemu", interval=5.0)
    return m.NodeHeartbeat(**{**{f: getattr(beat, f) for f in beat.__struct_fields__},
                              "created_at": beat.created_at - timedelta(seconds=seconds_ago)})


def test_a_heartbeat_sent_twice_does_not_hide_the_newer_ones_behind_it(broker_url):
    node = f"reg{m.new_message_id()[:8]}".replace("-", "")
    old, newer, newest = _beat(node, 20), _beat(node, 10), _beat(node, 0)
    publisher = Publisher(broker_url)
    try:
        publisher.ensure_queues([nodes_queue()])
        publisher.publish_many([old, newer, newer, newest])  # `newer` twice: the same message id
        for _ in range(2):  # and read again: what a reader took went back, nothing was lost
            mine = [b for b in read_heartbeats(broker_url) if b.node == node]
            assert sorted(b.created_at for b in mine) == [old.created_at, newer.created_at, newest.created_at]
            assert latest_per_node(mine) == [newest]
    finally:
        publisher.close()
