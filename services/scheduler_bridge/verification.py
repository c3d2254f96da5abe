"""The bridge believes a job event only once the scheduler has confirmed it: the job exists, is starting or
running, belongs to the owner the event names, and runs on the nodes it names. A hook's host is not trusted
more than that (DESIGN.md: "the bridge checks a job event against the scheduler before it plans").

`mismatch` is pure; the bridge asks the scheduler (shared/scheduler.py) and passes the answer in.
"""

from __future__ import annotations

from vtorque.shared import messages as m
from vtorque.shared.config import SpecConfig
from vtorque.shared.scheduler import JobInfo
from vtorque.shared.spec import ramdisk_mib


def mismatch(job: m.JobStarted, info: JobInfo | None) -> str | None:
    """None when the scheduler's view agrees with the event; else the reason the job is rejected."""
    if info is None:
        return f"the scheduler knows no job {job.job_id}"
    if not info.alive:
        return f"job {job.job_id} is not starting or running (the scheduler says {info.raw_state})"
    if info.owner is not None and info.owner != job.owner.user:
        return f"job {job.job_id} belongs to {info.owner}, not to {job.owner.user}"
    claimed = [n.host for n in job.nodes]
    if info.nodes:
        foreign = [h for h in claimed if h not in info.nodes]
        if foreign:
            return f"job {job.job_id} was not given node(s) {', '.join(foreign)} (it has {', '.join(info.nodes)})"
    return None


def planned_memory_mib(guests: list[m.GuestPlan], site: SpecConfig) -> int:
    """What the guests take of their nodes' memory: their RAM, and what each may keep in node memory on a
    ramdisk (root disk growth and data disk, shared/spec.py ramdisk_mib: each guest's tmpfs is that size)."""
    total = 0
    for g in guests:
        total += g.ram_mib + ramdisk_mib(g.fs_type, g.disk.size_mib if g.disk else None,
                                         bool(g.disk and g.disk.image), site)
    return total


def over_allocation(info: JobInfo | None, guests: list[m.GuestPlan], site: SpecConfig) -> str | None:
    """The guests run outside the job's cgroup (unless [node] job_cgroup), so the bridge holds them to what the
    scheduler gave the job."""
    if info is None or info.mem_mib is None:
        return None
    need = planned_memory_mib(guests, site)
    if need > info.mem_mib:
        return (f"the job's guests need {need} MiB of memory but the scheduler gave the job {info.mem_mib} MiB "
                f"(ask for more: Slurm --mem, Torque -l mem)")
    return None
