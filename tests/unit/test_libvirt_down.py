"""libvirtd down or restarting under a running node worker (issue 12 item 8): the node's heartbeats go on and
say so (a node that stops beating is refused jobs as having no worker, and Slurm requeues them), and a boot
waits for libvirt within its deadline instead of failing its job."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from vtorque.services.node_worker.heartbeat import node_facts
from vtorque.services.node_worker.hypervisor import HypervisorError
from vtorque.services.node_worker.readiness import BootFailed
from vtorque.services.node_worker.service import NodeWorker
from vtorque.shared import messages as m
from vtorque.shared.config import Config, NodeConfig
from vtorque.shared.job_boot import NodeBoot


class Libvirt:
    """libvirt that is down until `up_after` calls of `unavailable` have been made."""

    def __init__(self, up_after: int = 0):
        self.calls, self.up_after = 0, up_after

    def unavailable(self) -> str:
        self.calls += 1
        return "" if self.calls > self.up_after else "cannot connect to qemu:///system: Failed to connect socket"

    def vtorque_domains(self):
        raise HypervisorError("cannot connect to qemu:///system: Failed to connect socket")

    def active_names(self):
        raise AssertionError("not reached")


def worker(hv, **node) -> NodeWorker:
    config = Config(node=NodeConfig(name="n1", domain_type="qemu", **node))
    return NodeWorker(config, publisher=None, hypervisor=hv, store=object())


def test_a_heartbeat_while_libvirt_is_down_is_sent_and_says_why():
    beat = node_facts(worker(Libvirt()))
    assert isinstance(beat, m.NodeHeartbeat) and beat.node == "n1" and beat.guests_running == 0
    assert "Failed to connect socket" in beat.hypervisor_down
    assert m.decode(m.encode(beat)).hypervisor_down == beat.hypervisor_down  # on the wire as in the contract


def boot(job_id: str = "5", seconds: float = 60.0) -> NodeBoot:
    """Node n1's part of a job's BootGuests, as the node worker boots it (shared/job_boot.py)."""
    return NodeBoot(job_id=job_id, deadline=m.utcnow() + timedelta(seconds=seconds), node="n1", guests=[], peers=[],
                    network=None)


def test_a_boot_waits_for_libvirt_to_come_back_and_gives_up_at_its_deadline():
    hv = Libvirt(up_after=3)
    started = time.monotonic()
    worker(hv)._wait_for_hypervisor(boot(), poll=0.05)
    assert hv.calls == 4 and time.monotonic() - started < 2
    gone = worker(Libvirt(up_after=10 ** 6), boot_timeout=0.3)
    with pytest.raises(BootFailed) as failed:
        gone._wait_for_hypervisor(boot(), poll=0.05)
    assert failed.value.retryable and "did not answer before the boot's deadline" in failed.value.reason
