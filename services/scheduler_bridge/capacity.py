"""Can the job's nodes run its VMs? Pure: the nodes' latest heartbeats in, the first reason one cannot out.

A node with no fresh heartbeat is a retryable problem (its node worker may be restarting); a node that lacks a
capability the spec needs is not (waiting will not give it vRDMA).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from vtorque.shared import messages as m
from vtorque.shared.config import Config
from vtorque.shared.node_registry import is_stale
from vtorque.shared.spec import VMSpec


@dataclass(frozen=True)
class Unfit:
    reason: str
    retryable: bool


def check_nodes(spec: VMSpec, nodes: list[m.NodeAllocation], beats: dict[str, m.NodeHeartbeat],
                config: Config, now: datetime) -> Unfit | None:
    entry = config.images.catalog[spec.img]
    for node in nodes:
        beat = beats.get(node.host)
        if beat is None or is_stale(beat, now):
            seen = "never" if beat is None else f"last {int((now - beat.created_at).total_seconds())} s ago"
            return Unfit(f"node {node.host}: no node worker heard from ({seen})", True)
        caps = set(beat.capabilities)
        if spec.vrdma:
            wanted = config.spec.vrdma_require
            have = sorted(c.removeprefix("vrdma-") for c in caps if c.startswith("vrdma-"))
            if not have or (wanted and not set(wanted) & set(have)):
                need = f"one of {', '.join(wanted)}" if wanted else "any vRDMA backend"
                return Unfit(f"node {node.host} has no usable vRDMA ({need} needed; it has "
                             f"{', '.join(have) or 'none'})", False)
        if spec.iocm and not caps & {"iocm", "iocm-skvm"}:
            return Unfit(f"node {node.host} cannot give I/O cores (no IOcm)", False)
        if entry.kernel and "direct-kernel-boot" not in caps:
            return Unfit(f"node {node.host} cannot boot image {spec.img} (direct kernel boot)", False)
        need_mib = spec.ram_mib * spec.vms_per_node
        if beat.mem_free_mib < need_mib:
            return Unfit(f"node {node.host} has {beat.mem_free_mib} MiB free; the VMs need {need_mib} MiB", True)
    return None
