"""Live migration's attack tests (services/node_worker/migrate.py, issue 14 item 3). The new commands reach a node
worker from the operator (MigrateGuests) and from another node's worker (PrepareMigration, JobGuestMoved): what
each consumer takes, and what root on a node does with a forged one.

- the topology's sender check: MigrateGuests only from the operator; the node-to-node commands only from a node
  worker, and each node speaks only for itself; a node's broker user may publish `migrate.*` keys, never
  `node.*` ones (it still cannot put a BootGuests into another node's queue);
- the source refuses a target the scheduler did not give the job, and a job that is not running;
- the target refuses a guest name that is a path or another job's (the decoder first, the handler on its own
  too), a sender node outside the job, a seed that is no ISO, a planted guest directory (never followed);
  nothing is created on its disk and no job network is touched;
- the job's other nodes move no forwarding entry for a sender or a target outside the job.

The node worker runs on libvirt's test driver with a stand-in scheduler: nothing here touches a real libvirtd."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import msgspec
import pytest

from vtorque.services.node_worker.hypervisor import Hypervisor
from vtorque.services.node_worker.job_segment import JobSegments
from vtorque.services.node_worker.service import NodeWorker
from vtorque.shared import messages as m
from vtorque.shared import topology
from vtorque.shared.config import Config, ImagesConfig, NodeConfig
from vtorque.shared.job_network import guest_mac
from vtorque.shared.scheduler import JobInfo

from .conftest import Recorder, snapshot

ISO = b"\0" * 0x8001 + b"CD001" + b"\0" * 100


class Scheduler:
    """The scheduler's word on the job: running on `nodes`."""

    kind = "slurm"

    def __init__(self, nodes: tuple[str, ...], state: str = "running"):
        self.nodes, self.state = nodes, state

    def job(self, job_id: str) -> JobInfo:
        return JobInfo(job_id=job_id, state=self.state, raw_state=self.state.upper(), nodes=self.nodes)  # type: ignore[arg-type]


class Kernel:
    """A stand-in for `ip`/`bridge`: records every command the node worker would run on the job network."""

    def __init__(self):
        self.ran: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess:
        self.ran.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "")


@pytest.fixture
def node():
    root = Path(tempfile.mkdtemp(prefix="vtorque-secmig-", dir="/tmp"))
    root.chmod(0o711)
    name = "n1"
    config = Config(state_dir=str(root / "state"), images=ImagesConfig(store=str(root / "images")),
                    node=NodeConfig(name=name, guest_dir=str(root / "guests"), ramdisk_dir=str(root / "shm"),
                                    job_network_localaddr="10.0.0.1"))
    kernel = Kernel()
    sent = Recorder()
    worker = NodeWorker(config, sent, hypervisor=Hypervisor("test:///default"), scheduler=Scheduler(("n1", "n2")),
                        segments=JobSegments(789, run=kernel, lock_path=str(root / "net.lock")))
    worker.migrator.background = False  # the handlers inline: their answers are there when they return
    yield worker, sent, kernel, root
    shutil.rmtree(root, ignore_errors=True)


def job() -> str:
    return str(uuid.uuid4().int % 10**6)


def prepare(j: str, **kw) -> m.PrepareMigration:
    fields = {"node": "n2", "target": "n1", "guest": f"vt-{j}-n2-0", "index": 1, "owner": "root",
              "image_digest": "a" * 64, "overlay_bytes": 1 << 30, "seed": ISO, "vni": 7,
              "endpoints": ["10.0.0.2"]}
    return m.PrepareMigration.new(job_id=j, deadline=60, **{**fields, **kw})


def refused(sent: Recorder, *words: str) -> m.Message:
    assert len(sent.sent) == 1, sent.sent
    answer = sent.sent[0]
    reason = getattr(answer, "reason", "")
    assert reason.startswith("refused by node"), answer
    for word in words:
        assert word in reason, reason
    return answer


# -- who may send what -------------------------------------------------------------------------------------------

def test_only_the_operator_may_ask_for_a_migration():
    cmd = m.MigrateGuests.new(job_id="7", deadline=60, node="n2", target="n1")
    assert topology.may_publish("vtorque-operator", cmd) is None
    for user in ("vtorque-node-n2", "vtorque-node-n1", "vtorque-bridge", "vtorque-hook", "vtorque-stager",
                 "alice", None):
        assert topology.may_publish(user, cmd), user


def test_a_node_speaks_only_for_itself_and_only_node_workers_send_the_node_to_node_commands():
    j = job()
    prep = prepare(j)
    assert topology.may_publish("vtorque-node-n2", prep) is None
    assert "sent by vtorque-node-n3" in topology.may_publish("vtorque-node-n3", prep)
    for user in ("vtorque-operator", "vtorque-bridge", "vtorque-hook"):
        assert topology.may_publish(user, prep), user
    moved = m.JobGuestMoved.new(job_id=j, deadline=60, node="n2", peer="n3", target="n1",
                                mac=guest_mac(j, 1), endpoint="10.0.0.1", vni=7)
    assert topology.may_publish("vtorque-node-n2", moved) is None
    assert topology.may_publish("vtorque-node-n1", moved)
    # and the node worker's events about a migration are a node's own
    ready = m.MigrationPrepared.new(job_id=j, deadline=60, node="n1", source="n2", guest=f"vt-{j}-n2-0")
    assert topology.may_publish("vtorque-node-n1", ready) is None
    assert topology.may_publish("vtorque-node-n2", ready)


def test_a_nodes_broker_user_may_publish_migrate_keys_never_node_keys():
    p = topology.broker_permissions("node", "n1")
    keys = p.topics[topology.COMMANDS][0]
    assert re.match(keys, "migrate.n2") and re.match(keys, "stager")
    assert not re.match(keys, "node.n2") and not re.match(keys, "node.n1")


# -- the source -------------------------------------------------------------------------------------------------

def test_the_source_refuses_a_target_the_job_does_not_hold(node):
    worker, sent, kernel, root = node
    worker.node = "n2"  # the source
    worker.config.node.name = "n2"
    before = snapshot(root)
    worker.migrator.on_migrate_guests(m.MigrateGuests.new(job_id="7", deadline=60, node="n2", target="n3"))
    answer = refused(sent, "n3 is not one of job 7's nodes")
    assert isinstance(answer, m.MigrationFailed)
    assert snapshot(root) == before and kernel.ran == []


def test_the_source_refuses_a_job_that_does_not_run(node):
    worker, sent, kernel, root = node
    worker.node = "n2"
    worker.scheduler = Scheduler(("n1", "n2"), state="completed")
    worker.migrator.on_migrate_guests(m.MigrateGuests.new(job_id="7", deadline=60, node="n2", target="n1"))
    refused(sent, "not running")


def test_a_guest_name_that_is_a_path_is_refused_by_the_decoder_and_by_the_source(node):
    worker, sent, _, root = node
    worker.node = "n2"
    evil = m.MigrateGuests.new(job_id="7", deadline=60, node="n2", target="n1", guests=["../../etc"])
    with pytest.raises(msgspec.ValidationError):
        m.decode(m.encode(evil))
    worker.migrator.on_migrate_guests(evil)
    refused(sent)
    other_job = m.MigrateGuests.new(job_id="7", deadline=60, node="n2", target="n1", guests=["vt-8-n2-0"])
    sent.sent.clear()
    worker.migrator.on_migrate_guests(other_job)
    refused(sent, "not a guest of job 7")


# -- the target -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"guest": "../../../etc/cron.d"}, ("guest name",)),
    ({"guest": "vt-1-n2-0"}, ("is not a guest of job",)),
    ({"node": "n3"}, ("node n3 is not one of job",)),
    ({"seed": b"#!/bin/sh\nrm -rf /\n"}, ("not an ISO 9660",)),
    ({"target": "n2"}, ("reached node n1",)),
    ({"endpoints": ["127.0.0.1"]}, ("loopback",)),
])
def test_the_target_refuses_a_forged_prepare_and_makes_nothing(node, change, words):
    worker, sent, kernel, root = node
    j = job()
    cmd = prepare(j, **change)
    before = snapshot(root)
    worker.migrator.on_prepare_migration(cmd)
    answer = refused(sent, *words)
    assert isinstance(answer, m.MigrationPrepared) and answer.reason
    assert snapshot(root) == before  # no directory, overlay, seed or link
    assert kernel.ran == []  # no job network touched
    assert worker.booting_now() == set()


def test_the_target_never_uses_a_planted_guest_directory(node):
    worker, sent, kernel, root = node
    j = job()
    guests = root / "guests"
    guests.mkdir(mode=0o711)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, guests / f"vt-{j}-n2-0")
    worker.store.path = lambda digest: root / "base.qcow2"  # type: ignore[method-assign]
    worker.store.has = lambda digest: True  # type: ignore[method-assign]
    before = snapshot(root)
    worker.migrator.on_prepare_migration(prepare(j))
    answer = sent.sent[-1]
    assert isinstance(answer, m.MigrationPrepared) and answer.reason, answer
    assert snapshot(root) == before and list(elsewhere.iterdir()) == []


# -- the job's other nodes --------------------------------------------------------------------------------------

def test_no_forwarding_entry_moves_for_a_sender_or_target_outside_the_job(node):
    worker, _, kernel, _ = node
    j = job()
    for sender, target, mac, endpoint in (("n9", "n2", guest_mac(j, 1), "10.0.0.2"),
                                          ("n2", "n9", guest_mac(j, 1), "10.0.0.9"),
                                          ("n2", "n1", "52:54:00:ff:ff:ff", "10.0.0.2"),
                                          ("n2", "n1", guest_mac(j, 1), "224.0.0.1")):
        worker.migrator.on_job_guest_moved(m.JobGuestMoved.new(
            job_id=j, deadline=60, node=sender, peer="n1", target=target, mac=mac, endpoint=endpoint, vni=7))
    assert kernel.ran == []


def test_a_redelivered_command_is_not_acted_on_twice(node):
    worker, sent, _, _ = node
    worker.node = "n2"
    cmd = m.MigrateGuests.new(job_id="7", deadline=60, node="n2", target="n3")
    worker.migrator.on_migrate_guests(cmd)
    worker.migrator.on_migrate_guests(m.decode(m.encode(cmd)))  # the same message, delivered again
    assert len(sent.sent) == 1
