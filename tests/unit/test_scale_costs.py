"""What made vtorque slow at scale (issue 12, bench/scale_nodes.py), fixed without changing behaviour: publisher
confirms counted so a batch waits once, each domain's metadata read once, a heartbeat's running guests from one
listing. No broker here: confirms through a scripted channel; libvirt's test driver for the rest."""

from __future__ import annotations

import collections
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import amqp.exceptions
import msgspec
import pytest

from vtorque.shared.bus import Confirms


class ScriptedChannel:
    """A py-amqp channel's confirm surface: its events, confirm_select, and acks the broker sends on drain."""

    def __init__(self):
        self.events = collections.defaultdict(set)
        self.selected = False
        self.script: list[tuple[str, int, bool]] = []
        self.drains = 0
        self.timeouts: list[float | None] = []

    def confirm_select(self):
        self.selected = True

    def drain_events(self, timeout=None):  # stands for the connection: the next frame the broker sends
        self.drains += 1
        self.timeouts.append(timeout)
        if not self.script:  # a broker that sends nothing more: py-amqp's drain times out
            raise TimeoutError("timed out")
        kind, tag, multiple = self.script.pop(0)
        for callback in list(self.events[f"basic_{kind}"]):
            callback(tag, multiple)


def test_a_batch_waits_until_every_message_is_confirmed_in_any_mix_of_single_and_multiple_acks():
    channel = ScriptedChannel()
    confirms = Confirms(channel)
    assert channel.selected
    confirms.sent = 5
    channel.script = [("ack", 2, True), ("ack", 4, False), ("ack", 3, False), ("ack", 5, False)]
    confirms.wait(channel)
    assert channel.script == [] and channel.drains == 4 and confirms.pending == 0


def test_waiting_stops_at_the_last_confirm_needed():
    channel = ScriptedChannel()
    confirms = Confirms(channel)
    confirms.sent = 3
    channel.script = [("ack", 3, True), ("ack", 99, False)]  # the second would be a later batch's
    confirms.wait(channel)
    assert channel.script == [("ack", 99, False)]
    confirms.sent += 1  # the next batch on the same channel counts on from there
    channel.script = [("ack", 4, False)]
    confirms.wait(channel)
    assert confirms.pending == 0


def test_a_nack_in_a_batch_raises_once_all_are_settled():
    channel = ScriptedChannel()
    confirms = Confirms(channel)
    confirms.sent = 3
    channel.script = [("ack", 1, False), ("nack", 2, False), ("ack", 3, False)]
    with pytest.raises(amqp.exceptions.MessageNacked):
        confirms.wait(channel)
    assert channel.script == []
    confirms.sent += 1
    channel.script = [("ack", 4, False)]
    confirms.wait(channel)  # the nack was reported once, not again


def test_a_wait_that_hears_nothing_raises_a_timeout_a_publisher_takes_for_a_lost_connection():
    channel = ScriptedChannel()
    confirms = Confirms(channel)
    confirms.sent = 2
    channel.script = [("ack", 1, False)]  # the second confirm never comes
    with pytest.raises(TimeoutError, match="no publisher confirm from the broker in 2.5 s"):
        confirms.wait(channel, stalled_after=2.5)
    assert channel.timeouts == [2.5, 2.5] and confirms.pending == 1
    assert issubclass(TimeoutError, OSError)  # what publish_many reconnects and resends on


# -- the hypervisor and the heartbeat on libvirt's test driver ---------------------------------------------

libvirt = pytest.importorskip("libvirt")


def _xml(name: str, job: str, node: str, port: int) -> str:
    from vtorque.services.node_worker.domain import BootSource, GuestDisks, GuestMetadata, domain_xml
    from vtorque.shared import messages as m

    guest = m.GuestPlan(name=name, node=node, index=0, image="tiny", image_digest="a" * 64, vcpus=1, ram_mib=64,
                        cores=None, owner=m.Owner(user="bob", uid=1001, gid=1001), ssh_authorized_keys=["k"])
    port_field = {"ssh_port": port} if "ssh_port" in GuestMetadata.__dataclass_fields__ else {}
    meta = GuestMetadata(job_id=job, owner="bob", deadline=datetime(2030, 1, 1, tzinfo=UTC), index=0,
                         node=node, **port_field)
    return domain_xml(guest, GuestDisks(overlay="/g/r.qcow2", seed="/g/s.iso", console_log="/g/c.log"),
                      BootSource(), meta)


@pytest.fixture
def hv():
    from vtorque.services.node_worker.hypervisor import Hypervisor

    hv = Hypervisor("test:///default")  # one in-memory driver per process, shared by the pool's threads
    names: list[str] = []
    hv.names = names
    yield hv
    for name in names:
        hv.remove(name)


def _define(hv, job: str, node: str, port: int, start: bool = True) -> str:
    name = f"vt-{uuid.uuid4().hex[:8]}-{node}-0"
    hv.names.append(name)
    dom = hv.define(_xml(name, job, node, port))
    if start:
        hv.start(dom)
    return name


def test_listing_reads_each_domain_once_and_follows_undefine_and_a_new_domain_of_the_same_name(hv):
    name = _define(hv, "j1", "n1", 22001)
    assert hv.vtorque_domains()[name]["job"] == "j1"
    calls = []
    real = libvirt.virDomain.XMLDesc
    libvirt.virDomain.XMLDesc = lambda self, flags=0: calls.append(self.name()) or real(self, flags)
    try:
        assert hv.vtorque_domains()[name]["job"] == "j1"
        assert name not in calls  # known by its UUID: not read again
        hv.remove(name)
        assert name not in hv.vtorque_domains()
        hv.define(_xml(name, "j2", "n1", 22002))  # the same name, another job: a new UUID, read afresh
        assert hv.vtorque_domains()[name]["job"] == "j2" and name in calls
    finally:
        libvirt.virDomain.XMLDesc = real


def test_active_names_are_the_running_domains(hv):
    running = _define(hv, "j1", "n1", 22001)
    defined = _define(hv, "j1", "n1", 22002, start=False)
    names = hv.active_names()
    assert running in names and defined not in names


def test_a_heartbeat_counts_this_nodes_running_guests_only(hv, fake_host):
    from vtorque.services.node_worker.heartbeat import node_facts
    from vtorque.shared.config import Config, NodeConfig

    _define(hv, "j1", "n1", 22001)
    _define(hv, "j1", "n1", 22002)
    _define(hv, "j2", "n1", 22003, start=False)  # defined, not running
    _define(hv, "j3", "n2", 22004)  # another node worker's, on this shared test driver
    worker = SimpleNamespace(config=Config(node=NodeConfig(name="n1")), hv=hv, node="n1", domain_type="qemu")
    beat = node_facts(worker)
    assert beat.guests_running == 2
    # the jobs with a guest here, running or not (an evacuation moves them all), never another node's
    assert beat.jobs == ["j1", "j2"]


def test_a_node_takes_its_guest_of_a_job_of_1024_nodes_and_still_bounds_its_own_guests():
    """The job's one BootGuests: O(n) bytes once (it was one per node, each with all n peers: 122 kB × 1,024),
    from which each node expands its own guest and all 1,024 peers; a node still refuses more guests of its own
    than it may run, and more nodes than a job may have, before it expands anything."""
    from vtorque.services.node_worker import trust
    from vtorque.services.scheduler_bridge.planning import boot_command, plan_guests
    from vtorque.shared import messages as m
    from vtorque.shared.config import Config, ImageEntry, ImagesConfig, NodeConfig, SpecConfig
    from vtorque.shared.spec import validate

    config = Config(node=NodeConfig(name="n0000", allow_system_owners=True),
                    spec=SpecConfig(host_reserve_cores=0, host_reserve_ram="0M"),
                    images=ImagesConfig(catalog={"tiny": ImageEntry(source="/x", sha256="a" * 64)}))

    def job(n: int) -> m.BootGuests:
        started = m.JobStarted.new(
            job_id="7", deadline=60.0, scheduler="slurm", owner=m.Owner(user="root", uid=0, gid=0),
            nodes=[m.NodeAllocation(host=f"n{i:04d}", ncpus=1) for i in range(n)],
            spec={"img": "tiny", "vcpus": "1", "ram": "128M"}, ssh_authorized_keys=[
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2dXW1vjFpNu2d0dw7Fqt5fLwRY7FTl1Qb4mK3xqQ9n t"])
        return boot_command(started, plan_guests(started, validate(started.spec, config), config),
                            {a.host: f"10.9.{i // 250}.{i % 250 + 1}" for i, a in enumerate(started.nodes)})

    command = job(1024)
    # Linear in the nodes, about 30 bytes each (its name in `nodes`, its endpoint), the guests' shared part once.
    small, big = len(m.encode(job(64))), len(m.encode(command))
    assert (big - small) / (1024 - 64) < 32 and big < 40_000, (small, big)
    boot, accounts = trust.check_boot(command, "n0000", config)
    assert len(boot.peers) == 1024 and list(accounts) == ["vt-7-n0000-0"] and boot.guests[0].index == 0
    crowded = msgspec.structs.replace(command, cores=m.NodeCores(guests=[None] * (trust.MAX_GUESTS + 1)))
    with pytest.raises(trust.Refused, match="at most"):
        trust.check_boot(crowded, "n0000", config)
    too_many = msgspec.structs.replace(command, nodes=[f"x{i}" for i in range(trust.MAX_PEERS + 1)])
    with pytest.raises(trust.Refused, match="nodes: at most"):
        trust.check_boot(too_many, "x0", config)


def test_a_teardown_looks_into_its_own_jobs_guest_directories_only(tmp_path, monkeypatch):
    """No per-operation cost that grows with the guests on a node: finding a job's leftover directories reads
    the `job` file of that job's guests, not of all 300 on the node; a name that only looks like the job's is
    still decided by its `job` file."""
    from vtorque.services.node_worker import disks
    from vtorque.shared.messages import domain_name

    root = tmp_path / "guests"
    root.mkdir(mode=0o711)
    for job in [str(n) for n in range(100, 400)] + ["1-2"]:
        gdir = root / domain_name(job, "n1", 0)
        gdir.mkdir(mode=0o711)
        (gdir / "job").write_text(job)
    reads = []
    real = disks.read_small
    monkeypatch.setattr(disks, "read_small", lambda gdir, name: reads.append(gdir.name) or real(gdir, name))
    assert disks.guests_of_job(root, "1") == []  # vt-1-2-n1-0 is job 1-2's
    assert reads == [domain_name("1-2", "n1", 0)]
    reads.clear()
    assert disks.guests_of_job(root, "250") == [domain_name("250", "n1", 0)] and len(reads) == 1
