"""The job as Torque hands it to a root hook (argv, PBS_NODEFILE, the script's header, the mom_priv it runs from)
and as `qstat -f` adds to it (exec_host: which cores), made into the scheduler-neutral JobContext of
hooks/job_hook.py. What those say is read by shared/torque.py (nodes_from_nodefile, walltime_seconds,
exec_host_of); here is only the hook's use of it."""

from __future__ import annotations

import grp
import pwd
from collections import OrderedDict
from pathlib import Path

from vtorque.hooks.job_hook import JobContext
from vtorque.shared import messages as m
from vtorque.shared.job_script import JobHeader, parse_header, read_head
from vtorque.shared.torque import exec_host_of, nodes_from_nodefile, walltime_seconds


class HookUsage(Exception):
    pass


def torque_home(hook_path: str | None, configured: str) -> Path:
    """TORQUE_HOME: the parent of the mom_priv the hook was run from, else `[torque] home`."""
    if hook_path:
        here = Path(hook_path).parent
        if here.name == "mom_priv":
            return here.parent
    return Path(configured)


# -- I/O ----------------------------------------------------------------------------------------------------

def read_header(script: str) -> JobHeader | None:
    try:
        head = read_head(script)
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
