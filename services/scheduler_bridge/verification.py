"""The bridge believes a job event only once the scheduler has confirmed it: the job exists, is starting or
running, belongs to the owner the event names, and runs on the nodes it names. A hook's host is not trusted
more than that (DESIGN.md: "the bridge checks a job event against the scheduler before it plans").

`mismatch` is pure; the bridge asks the scheduler (shared/scheduler.py) and passes the answer in.
"""

from __future__ import annotations

from vtorque.shared import messages as m
from vtorque.shared.scheduler import JobInfo


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
