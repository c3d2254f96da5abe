"""The job as Torque hands it to a root hook (argv, PBS_NODEFILE, the script's header, the mom_priv it runs from)
and as `qstat -f` adds to it (exec_host: which cores), made into the scheduler-neutral JobContext of
hooks/job_hook.py."""

from __future__ import annotations

import grp
import pwd
import re
from collections import OrderedDict
from pathlib import Path

from vtorque.hooks.job_hook import JobContext
from vtorque.shared import messages as m
from vtorque.shared.job_script import HEADER_LINES, JobHeader, parse_header


class HookUsage(Exception):
    pass


# -- pure ---------------------------------------------------------------------------------------------------

def nodes_from_nodefile(path: str | None, exec_host: OrderedDict[str, list[int]] | None = None
                        ) -> list[m.NodeAllocation]:
    """PBS_NODEFILE lists a host once per core, in allocation order; the first host is the mother superior.
    exec_host (when known) says which cores: kept only where it agrees with the node file's count."""
    counts: OrderedDict[str, int] = OrderedDict()
    if path:
        for line in Path(path).read_text().split():
            host = line.split(".")[0]
            counts[host] = counts.get(host, 0) + 1
    return nodes_with_cores(counts, exec_host)


def nodes_with_cores(counts: OrderedDict[str, int], exec_host: OrderedDict[str, list[int]] | None
                     ) -> list[m.NodeAllocation]:
    nodes = []
    for host, n in counts.items():
        cores = exec_host.get(host) if exec_host else None
        nodes.append(m.NodeAllocation(host=host, ncpus=n, cores=list(cores) if cores and len(cores) == n else None))
    return nodes


def walltime_seconds(resource_list: str) -> int | None:
    """walltime from Resource_List ($5 of the prologue): `walltime=01:00:00`, `walltime=90`, `1:02:00:00`."""
    match = re.search(r"(?:^|,)walltime=([0-9:]+)(?:,|$)", resource_list)
    if not match:
        return None
    parts = match.group(1).split(":")
    if "" in parts or len(parts) > 4:
        return None
    values = [int(p) for p in parts]
    days = values.pop(0) if len(values) == 4 else 0
    total = 0
    for v in values:
        total = total * 60 + v
    return days * 86400 + total


def torque_home(hook_path: str | None, configured: str) -> Path:
    """TORQUE_HOME: the parent of the mom_priv the hook was run from, else `[torque] home`."""
    if hook_path:
        here = Path(hook_path).parent
        if here.name == "mom_priv":
            return here.parent
    return Path(configured)


def exec_host_of(attrs: dict[str, str] | None, why: str = "") -> tuple[OrderedDict[str, list[int]] | None, str]:
    from vtorque.shared.torque import ExecHostError, parse_exec_host

    if attrs is None:
        return None, why
    value = attrs.get("exec_host")
    if not value:
        return None, "qstat -f shows no exec_host"
    try:
        return parse_exec_host(value), ""
    except ExecHostError as exc:
        return None, str(exc)


# -- I/O ----------------------------------------------------------------------------------------------------

def read_header(script: str) -> JobHeader | None:
    try:
        with open(script, encoding="utf-8", errors="replace") as fh:
            head = "".join(fh.readline() for _ in range(HEADER_LINES))
    except OSError:
        return None
    return parse_header(head)


def owner(user: str, group: str) -> m.Owner:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise HookUsage(f"job owner {user} is unknown on this host") from None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = pw.pw_gid
    return m.Owner(user=user, uid=pw.pw_uid, gid=gid, group=group)


def job_context(argv: list[str], env, script_index: int, exec_host=None) -> JobContext | None:
    header = read_header(argv[script_index])
    if header is None:
        return None
    return JobContext(scheduler="torque", job_id=argv[0], owner=owner(argv[1], argv[2]),
                      nodes=nodes_from_nodefile(env.get("PBS_NODEFILE"), exec_host), header=header,
                      walltime=walltime_seconds(argv[4]))


def qstat_attrs(job_id: str, config) -> tuple[dict[str, str] | None, str]:
    """`qstat -f JOBID` as {attribute: value} (exec_host, Error_Path, ...: the prologue's environment carries
    none of them); (None, why) if qstat cannot answer. Asked through shared/torque.py, by the [scheduler] path:
    the site's Torque, never the first qstat on PATH."""
    from vtorque.shared.scheduler import SchedulerError
    from vtorque.shared.torque import Torque

    try:
        attrs = Torque(config.scheduler).attrs(job_id)
    except SchedulerError as exc:
        return None, str(exc)
    return (None, f"qstat -f {job_id}: Torque does not know the job") if attrs is None else (attrs, "")


def qstat_exec_host(job_id: str, config) -> tuple[OrderedDict[str, list[int]] | None, str]:
    """exec_host from `qstat -f JOBID`; (None, why) if not."""
    return exec_host_of(*qstat_attrs(job_id, config))
