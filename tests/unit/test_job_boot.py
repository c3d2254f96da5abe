"""A job's one BootGuests (shared/job_boot.py): what the bridge hoists each node expands back exactly, its size
grows with the nodes once (not with their square), and the bus sends it in one publish to every node's queue."""

from __future__ import annotations

import msgspec
import pytest

from vtorque.services.scheduler_bridge.planning import boot_command, plan_guests
from vtorque.shared import messages as m
from vtorque.shared.bus import node_queue, sender_selected
from vtorque.shared.config import Config, ImageEntry, ImagesConfig, SpecConfig
from vtorque.shared.job_boot import Malformed, NotHoistable, expand, expand_all, hoist, names_on
from vtorque.shared.job_network import guest_address
from vtorque.shared.spec import validate
from vtorque.shared.testing import InMemoryBus

from .conftest import DIGEST

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2dXW1vjFpNu2d0dw7Fqt5fLwRY7FTl1Qb4mK3xqQ9n t"


def config() -> Config:
    return Config(spec=SpecConfig(host_reserve_cores=1, max_vms_per_node=4),
                  images=ImagesConfig(catalog={"tiny": ImageEntry(source="/x", sha256=DIGEST)}))


def started(nodes: list[tuple[str, int, list[int] | None]], spec: dict) -> m.JobStarted:
    return m.JobStarted.new(job_id="9.srv", deadline=60.0, scheduler="torque", owner=m.Owner(user="bob", uid=1001,
                            gid=1001), nodes=[m.NodeAllocation(host=h, ncpus=n, cores=c) for h, n, c in nodes],
                            spec=spec, ssh_authorized_keys=[KEY], walltime=600.0)


@pytest.mark.parametrize("spec,nodes", [
    ({"img": "tiny"}, [("n1", 2, None)]),
    ({"img": "tiny", "vcpus": "2", "vms_per_node": "2", "disk": "64M"}, [("n1", 5, None), ("n2", 5, None)]),
    # pinned, the same cores on every node: said once
    ({"img": "tiny", "vcpus": "1", "vms_per_node": "2", "iocm": "true", "iocm_min_cores": "1",
      "iocm_max_cores": "1"}, [(f"c{i}", 4, [0, 1, 2, 3]) for i in range(5)]),
    # pinned, other cores on each node: one layout per node
    ({"img": "tiny", "vcpus": "2"}, [("a", 3, [0, 1, 2]), ("b", 3, [5, 6, 7]), ("c", 3, [0, 1, 2])]),
])
def test_each_node_expands_exactly_its_guests_of_the_plan_and_every_peer(spec, nodes):
    job = started(nodes, spec)
    guests = plan_guests(job, validate(spec, config()), config(), {"timezone": "UTC"})
    command = m.decode(m.encode(boot_command(job, guests, {h: f"10.0.0.{i + 1}" for i, (h, _, _) in
                                                            enumerate(nodes)})))
    assert isinstance(command, m.BootGuests) and expand_all(command) == guests
    assert (command.cores is None) == (len({tuple(c or ()) for _, _, c in nodes}) > 1)
    for host, _, _ in nodes:
        boot = expand(command, host)
        assert boot.guests == [g for g in guests if g.node == host]
        assert boot.peers == [m.GuestPeer(name=g.name, index=g.index, node=g.node, vcpus=g.vcpus,
                                          address=guest_address(g.index)) for g in guests]
        assert (boot.job_id, boot.deadline, boot.node) == (job.job_id, job.deadline, host)
        assert boot.network == (command.network if len(guests) > 1 else None)
        assert names_on(command, host, 256) == [g.name for g in boot.guests]


def test_a_plan_the_command_cannot_say_is_not_sent():
    job = started([("n1", 2, None), ("n2", 2, None)], {"img": "tiny"})
    guests = plan_guests(job, validate(job.spec, config()), config())
    for changed in (msgspec.structs.replace(guests[1], vcpus=2), msgspec.structs.replace(guests[1], name="vt-x"),
                    msgspec.structs.replace(guests[1], index=7)):
        with pytest.raises(NotHoistable):
            hoist(job.job_id, job.deadline, [guests[0], changed])
    with pytest.raises(NotHoistable):
        hoist(job.job_id, job.deadline, guests[::-1])  # not ranked node by node


def test_the_command_grows_with_the_nodes_once_not_with_their_square():
    """The old per-node commands carried all n peers each: 122 kB × 1,024 nodes per job. One command now: a name
    and an endpoint per node, the guests' shared part once."""
    sizes = {}
    for n in (16, 256, 1024):
        nodes = [(f"node{i:04d}", 2, None) for i in range(n)]
        job = started(nodes, {"img": "tiny"})
        guests = plan_guests(job, validate(job.spec, config()), config())
        sizes[n] = len(m.encode(boot_command(job, guests, {h: f"10.9.{i // 250}.{i % 250 + 1}"
                                                            for i, (h, _, _) in enumerate(nodes)})))
    per_node = (sizes[1024] - sizes[256]) / 768
    assert per_node < 36 and abs((sizes[256] - sizes[16]) / 240 - per_node) < 2, sizes


def test_parts_that_do_not_fit_are_named():
    job = started([("n1", 2, None), ("n2", 2, None)], {"img": "tiny"})
    command = boot_command(job, plan_guests(job, validate(job.spec, config()), config()), {"n1": "a", "n2": "b"})
    for fields, word in (({"nodes": ["n1", "n1"]}, "named twice"), ({"cores": None}, "exactly one"),
                         ({"node_cores": [m.NodeCores(guests=[None])]}, "exactly one"),
                         ({"cores": None, "node_cores": [m.NodeCores(guests=[None])]}, "for 1 nodes"),
                         ({"nodes": ["n2", "n3"]}, "no guest of node n1"),
                         ({"cores": m.NodeCores(guests=[])}, "gives node n1 no guest")):
        with pytest.raises(Malformed, match=word):
            expand(msgspec.structs.replace(command, **fields), "n1")
        # what the refusing node names in its GuestFailed: its guest where the command says which, else none
        assert names_on(msgspec.structs.replace(command, **fields), "n1", 256) in ([], ["vt-9_srv-n1-0"])


def test_one_publish_reaches_every_node_queue_and_a_long_list_is_split_into_frames():
    keys = [f"node.n{i:05d}" for i in range(5000)]
    groups = sender_selected(keys, budget=32_768)
    assert [k for key, bcc in groups for k in (key, *bcc)] == keys  # each once, in order
    assert len(groups) == 3 and all(sum(len(k) + 5 for k in bcc) < 32_768 for _, bcc in groups)
    assert sender_selected(["stager"]) == [("stager", [])]


def test_the_in_memory_bus_delivers_the_one_command_to_each_named_node_queue_only():
    bus = InMemoryBus()
    for node in ("n1", "n2", "n3"):
        bus.declare_queue(node_queue(node))
    job = started([("n1", 2, None), ("n2", 2, None)], {"img": "tiny"})
    command = boot_command(job, plan_guests(job, validate(job.spec, config()), config()), {"n1": "a", "n2": "b"})
    bus.publish(command)
    depth = {q: len(bus._queues[q].items) for q in bus._queues}
    assert depth == {"vtorque.node.n1": 1, "vtorque.node.n2": 1, "vtorque.node.n3": 0}
    assert bus.published == [command]
