"""Turning a started job into guests per node. Pure logic: no broker, no libvirt."""

from __future__ import annotations

import re

from vtorque.shared import messages as m
from vtorque.shared.config import Config
from vtorque.shared.spec import VMSpec


def domain_name(job_id: str, node: str, index: int) -> str:
    """A libvirt domain name that is unique per job and guest and safe in paths: vt-<job>-<node>-<index>."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9_-]", "_", s)  # noqa: E731
    return f"vt-{safe(job_id)}-{safe(node)}-{index}"


def plan_guests(job: m.JobStarted, spec: VMSpec, config: Config) -> list[m.GuestPlan]:
    """One guest per node of the job (several per node comes later), rank 0 on the first node."""
    entry = config.images.catalog[spec.img]
    return [
        m.GuestPlan(
            name=domain_name(job.job_id, node.host, 0),
            node=node.host,
            index=rank,
            image=spec.img,
            image_digest=entry.sha256,
            vcpus=spec.vcpus,
            ram_mib=spec.ram_mib,
            cores=node.cores,
            owner=job.owner,
            ssh_authorized_keys=list(job.ssh_authorized_keys),
        )
        for rank, node in enumerate(job.nodes)
    ]


def boot_commands(job: m.JobStarted, guests: list[m.GuestPlan]) -> list[m.BootGuests]:
    by_node: dict[str, list[m.GuestPlan]] = {}
    for guest in guests:
        by_node.setdefault(guest.node, []).append(guest)
    return [m.BootGuests.new(job_id=job.job_id, deadline=job.deadline, node=node, guests=plan)
            for node, plan in by_node.items()]
