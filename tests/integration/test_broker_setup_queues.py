"""`vtorque broker setup` on a broker that already has vtorque's shared queues with other arguments (the tests'
own vhost, the real broker): vtorque.nodes, which holds only the last minute of heartbeats, is made again as the
topology says; any other queue is the operator's to move, and the set-up says so in one line instead of a
traceback."""

from __future__ import annotations

import click
import pytest

from vtorque.cli.broker import _declare_shared_topology
from vtorque.shared import topology
from vtorque.shared.bus import connect, kombu_queue


def _old_classic_queue(url: str, name: str) -> None:
    with connect(url) as conn:
        channel = conn.channel()
        channel.queue_delete(name)
        channel.queue_declare(name, durable=True, auto_delete=False)  # classic, no arguments: an older vtorque's


def test_an_old_heartbeat_queue_is_made_again_and_another_queue_is_refused_in_one_line(broker_url):
    _old_classic_queue(broker_url, topology.NODES_Q)
    _declare_shared_topology(broker_url)  # vtorque.nodes remade; every other queue declared as the table says
    with connect(broker_url) as conn:  # declared again as the table says, it is accepted: the table's queue now
        kombu_queue(topology.QUEUES[topology.NODES_Q])(conn.channel()).declare()
    _old_classic_queue(broker_url, topology.STAGER_Q)
    try:
        with pytest.raises(click.ClickException, match=r"^queue vtorque.stager exists with other arguments"):
            _declare_shared_topology(broker_url)
    finally:
        with connect(broker_url) as conn:
            conn.channel().queue_delete(topology.STAGER_Q)
