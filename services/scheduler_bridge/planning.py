"""Turning a started job into guests per node. Pure logic: no broker, no libvirt.

Cores on a node, in the order the scheduler listed them, are split as: the host reserve first (QEMU's emulator
threads go there), then each VM's vCPUs, then the IOcm I/O cores. When the scheduler did not say which cores
(only how many), nothing is pinned.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal, cast

from vtorque.shared import messages as m
from vtorque.shared.config import Config
from vtorque.shared.job_boot import hoist
from vtorque.shared.job_network import job_network
from vtorque.shared.spec import SpecError, VMSpec


class PlanError(ValueError):
    pass


def _fs_type(spec: VMSpec) -> Literal["ramdisk", "sharedfs"]:
    return cast(Literal["ramdisk", "sharedfs"], spec.fs_type)  # spec.validate allowed only FS_TYPES


def split_cores(node: m.NodeAllocation, spec: VMSpec, config: Config) -> tuple[
        list[int] | None, list[list[int] | None], list[int] | None]:
    """(emulator cores, vCPU cores per VM, I/O cores) on one node; raises PlanError when the VMs don't fit."""
    site = config.spec
    need = spec.cores_per_node(site)
    if node.ncpus < need:
        raise PlanError(f"node {node.host} gave the job {node.ncpus} cores; its VMs need {need} "
                        f"({spec.vms_per_node} × {spec.vcpus} vCPUs + host reserve {site.host_reserve_cores}"
                        f"{f' + {spec.iocm_max_cores} I/O cores' if spec.iocm else ''}): ask for ppn={need}")
    if not node.cores or not spec.vcpu_pinning:
        return None, [None] * spec.vms_per_node, None
    cores = list(node.cores)
    reserve, rest = cores[:site.host_reserve_cores], cores[site.host_reserve_cores:]
    vm_cores: list[list[int] | None] = []
    if spec.pin_map:
        if max(spec.pin_map) >= len(rest):
            raise SpecError("vcpu_pinning", ":".join(map(str, spec.pin_map)),
                            f"core index {max(spec.pin_map)} is beyond the {len(rest)} cores the job has on "
                            f"{node.host}")
        vm_cores.append([rest[i] for i in spec.pin_map])
    else:
        for k in range(spec.vms_per_node):
            vm_cores.append(rest[k * spec.vcpus:(k + 1) * spec.vcpus])
    used = spec.vms_per_node * spec.vcpus
    io = rest[used:used + spec.iocm_max_cores] if spec.iocm else None
    return reserve or None, vm_cores, io


def plan_guests(job: m.JobStarted, spec: VMSpec, config: Config, user_metadata: dict | None = None
                ) -> list[m.GuestPlan]:
    """`vms_per_node` guests on every node of the job; rank 0 (the one that runs the script) first."""
    entry = config.images.catalog[spec.img]
    if spec.pin_map and spec.vms_per_node > 1:
        raise SpecError("vcpu_pinning", ":".join(map(str, spec.pin_map)), "a core map needs vms_per_node=1")
    guests: list[m.GuestPlan] = []
    for node in job.nodes:
        emulator, per_vm, io = split_cores(node, spec, config)
        for k in range(spec.vms_per_node):
            rank = len(guests)
            disk = None
            if rank == 0 and spec.disk:
                disk = m.DataDisk(size_mib=spec.disk.size_mib, image=spec.disk.image)
            guests.append(m.GuestPlan(
                name=m.domain_name(job.job_id, node.host, k), node=node.host, index=rank, image=spec.img,
                image_digest=entry.sha256, vcpus=spec.vcpus, ram_mib=spec.ram_mib, cores=per_vm[k],
                owner=job.owner, ssh_authorized_keys=list(job.ssh_authorized_keys), distro=spec.distro,
                arch=spec.arch, emulator_cores=emulator, io_cores=io, iocm_min_cores=spec.iocm_min_cores,
                iocm_max_cores=spec.iocm_max_cores, vrdma=spec.vrdma, fs_type=_fs_type(spec), disk=disk,
                user_metadata=dict(user_metadata or {}),
                end_by=job.created_at + timedelta(seconds=job.walltime) if job.walltime else None,
                checkpoint=spec.checkpoint,
            ))
    return guests


def boot_command(job: m.JobStarted, guests: list[m.GuestPlan], endpoints: dict[str, str] | None = None
                 ) -> m.BootGuests:
    """The job's one BootGuests, for every node of the job (shared/job_boot.py hoist: what the guests share
    once, per node only what differs). `endpoints`: each node's job network endpoint (its heartbeats' tunnel
    address), needed by a job of several guests."""
    nodes = list(dict.fromkeys(g.node for g in guests))
    # A job of one guest needs no network of its own: one NIC less to probe while it boots.
    network = job_network(job.job_id, {n: (endpoints or {}).get(n, "") for n in nodes}) if len(guests) > 1 else None
    return hoist(job.job_id, job.deadline, guests, network)
