"""A job's boot, said once: the one BootGuests the bridge sends every node of a job, and what one node makes of it.

Pure (no broker, no libvirt). `hoist` (the bridge's side) says once what the job's guests share and per node only
what differs (its name, its guests' cores); `expand` (each node worker's side) gives one node its own GuestPlans,
the job's peers and its network back. They are inverses: for every node n of a plan,
expand(hoist(plan), n).guests is exactly plan's guests on n, and .peers is every guest of the plan
(tests/unit/test_job_boot.py). Before, every node got a BootGuests of its own carrying all n peers: n² bytes per
job (100 MB at 1,024 nodes; docs/benchmarks.md, scale).

`expand` takes a command as it came off the wire: what does not fit together (a node named twice, cores for a
different number of nodes, a node the command does not name) raises Malformed with what; the node worker refuses
the command with it (services/node_worker/trust.py check_boot, which also checks every value).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from vtorque.shared import messages as m
from vtorque.shared.job_network import guest_address

# The GuestPlan fields every guest of a job shares: the BootGuests' `guest`.
JOB_WIDE = tuple(f for f in m.GuestTemplate.__struct_fields__)


class Malformed(ValueError):
    """A BootGuests whose parts do not fit together; the message says how (one line)."""


class NotHoistable(ValueError):
    """A plan whose guests differ in what a BootGuests says once (planning made them so: a bug, not a job)."""


@dataclass
class NodeBoot:
    """One node's part of a job's BootGuests, expanded: what that node worker acts on (made anew for each
    delivery; nothing changes it)."""

    job_id: str
    deadline: datetime
    node: str
    guests: list[m.GuestPlan]  # this node's, by rank
    peers: list[m.GuestPeer]  # every guest of the job, by rank
    network: m.JobNetwork | None


def template_of(guest: m.GuestPlan) -> m.GuestTemplate:
    return m.GuestTemplate(**{f: getattr(guest, f) for f in JOB_WIDE})


def hoist(job_id: str, deadline: datetime | float, guests: list[m.GuestPlan], network: m.JobNetwork | None = None
          ) -> m.BootGuests:
    """The job's one BootGuests for `guests` (by rank, node by node, as planning.plan_guests makes them).
    Raises NotHoistable when they are not what `expand` gives back."""
    if not guests:
        raise NotHoistable("a job of no guests")
    template = template_of(guests[0])
    per_node: dict[str, list[m.GuestPlan]] = {}
    for guest in guests:
        per_node.setdefault(guest.node, []).append(guest)
    cores = [m.NodeCores(guests=[g.cores for g in on], emulator=on[0].emulator_cores, io=on[0].io_cores)
             for on in per_node.values()]
    same = all(c == cores[0] for c in cores)
    cmd = m.BootGuests.new(job_id=job_id, deadline=deadline, guest=template, nodes=list(per_node),
                           cores=cores[0] if same else None, node_cores=[] if same else cores,
                           disk=guests[0].disk, network=network)
    if expand_all(cmd) != guests:
        raise NotHoistable(f"job {job_id}: its guests are not ranked node by node, or differ in more than "
                           "their node, name, rank, cores and rank 0's data disk")
    return cmd


def _cores_of(cmd: m.BootGuests) -> list[m.NodeCores]:
    if (cmd.cores is None) == (not cmd.node_cores):
        raise Malformed("exactly one of cores (every node alike) and node_cores (one per node) is given")
    if cmd.node_cores and len(cmd.node_cores) != len(cmd.nodes):
        raise Malformed(f"node_cores for {len(cmd.node_cores)} nodes, the command names {len(cmd.nodes)}")
    if len(set(cmd.nodes)) != len(cmd.nodes):
        raise Malformed("a node is named twice")
    if cmd.node_cores:
        return list(cmd.node_cores)
    assert cmd.cores is not None  # checked above
    return [cmd.cores] * len(cmd.nodes)


def guest_counts(cmd: m.BootGuests) -> list[int]:
    """How many guests each node of `cmd.nodes` gets (Malformed as expand)."""
    return [len(c.guests) for c in _cores_of(cmd)]


def _plans(cmd: m.BootGuests, template: dict, node: str, rank: int, cores: m.NodeCores) -> list[m.GuestPlan]:
    return [m.GuestPlan(name=m.domain_name(cmd.job_id, node, k), node=node, index=rank + k, cores=vcpu_cores,
                        emulator_cores=cores.emulator, io_cores=cores.io,
                        disk=cmd.disk if rank + k == 0 else None, **template)
            for k, vcpu_cores in enumerate(cores.guests)]


def _template(cmd: m.BootGuests) -> dict:
    return {f: getattr(cmd.guest, f) for f in JOB_WIDE}


def expand_all(cmd: m.BootGuests) -> list[m.GuestPlan]:
    """Every guest of the job, by rank (what JobPlanned lists)."""
    template, out = _template(cmd), list[m.GuestPlan]()
    for node, cores in zip(cmd.nodes, _cores_of(cmd), strict=True):
        out += _plans(cmd, template, node, len(out), cores)
    return out


def expand(cmd: m.BootGuests, node: str) -> NodeBoot:
    """Node `node`'s part of the job: its GuestPlans, every guest of the job as its peer, the job's network.
    Raises Malformed when the command's parts do not fit or it names no guest of `node`."""
    all_cores = _cores_of(cmd)
    if node not in cmd.nodes:
        raise Malformed(f"the command names no guest of node {node}")
    peers, mine = [], []
    rank = 0
    for name, cores in zip(cmd.nodes, all_cores, strict=True):
        if name == node:
            mine = _plans(cmd, _template(cmd), node, rank, cores)
        for k in range(len(cores.guests)):
            peers.append(m.GuestPeer(name=m.domain_name(cmd.job_id, name, k), index=rank + k, node=name,
                                     vcpus=cmd.guest.vcpus, address=guest_address(rank + k)))
        rank += len(cores.guests)
    if not mine:
        raise Malformed(f"the command gives node {node} no guest")
    return NodeBoot(job_id=cmd.job_id, deadline=cmd.deadline, node=node, guests=mine, peers=peers,
                    network=cmd.network)


def names_on(cmd: m.BootGuests, node: str, most: int) -> list[str]:
    """The names of `node`'s guests in `cmd` as far as they can be told (at most `most`), [] when they cannot:
    what a node that refuses a command names in its GuestFailed."""
    try:
        counts = guest_counts(cmd)
        count = counts[cmd.nodes.index(node)]
    except (Malformed, ValueError):
        return []
    return [m.domain_name(cmd.job_id, node, k) for k in range(min(count, most))]
