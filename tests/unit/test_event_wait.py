"""One way to wait for events (shared/hook_channel.py): the hooks, the node worker and `vtorque images pull` use
the same pika channel, each under its own queue prefix from the topology table, and a hook never loads kombu."""

import re
import subprocess
import sys

import pytest

from vtorque.shared import bus, hook_channel, topology
from vtorque.shared.hook_channel import BrokerUnreachable, EventChannel, queue_name


def test_the_node_workers_waiter_is_the_hooks_channel_under_its_own_prefix():
    assert bus.EventWaiter is hook_channel.EventWaiter and hook_channel.HookChannel is EventChannel
    digest = "ab" * 32
    name = queue_name([f"image.{digest}.#"], prefix=topology.prefix(topology.WAIT_Q))
    # The node's broker user may declare it: its configure right comes from the same table.
    assert re.fullmatch(topology.broker_permissions("node", "n1").configure, name), name
    assert not re.fullmatch(topology.broker_permissions("hook").configure, name)
    assert name.startswith(f"vtorque.wait.{digest}.")


def test_a_broker_the_waiter_cannot_reach_is_an_infrastructure_failure():
    """The node worker takes OSError as "retry later" (a retryable GuestFailed): so is BrokerUnreachable."""
    assert issubclass(BrokerUnreachable, OSError)
    with pytest.raises(OSError):
        bus.EventWaiter("amqp://127.0.0.1:1/", ["image.x.#"], timeout=0.2)


def test_the_hooks_load_neither_kombu_nor_the_services_bus():
    """Start-up time is the fast path's cost (bench/torque_prologue_fast_path.py): py-amqp and kombu took
    ~50 ms of every prologue through shared/bus.py."""
    code = (
        "import sys, vtorque.hooks.torque, vtorque.hooks.slurm, vtorque.hooks.job_hook, vtorque.shared.hook_channel;"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('kombu', 'amqp') or k == 'vtorque.shared.bus'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
