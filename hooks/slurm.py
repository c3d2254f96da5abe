"""Slurm's PrologSlurmctld and EpilogSlurmctld for VM jobs (../shared/reference/slurm-single-host.md §4).

They run as SlurmUser on the controller with no PATH and no argv; the job is described by SLURM_JOB_*
variables. A non-zero PrologSlurmctld makes Slurm requeue the job (eligible again after ~120 s), so an
infrastructure failure is retried while SLURM_JOB_RESTART_COUNT is below hooks.max_requeues; a rejection,
or the last failure, cancels the job instead of letting it loop.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from vtorque.shared import messages as m
from vtorque.shared.job_script import HEADER_LINES, JobHeader, ScriptError, parse_header

from .job_hook import JobContext, Outcome, Verdict

SBIN = "/usr/bin"


def job_script_head(job_id: str, state_dir: str | None) -> str:
    if state_dir:
        path = Path(state_dir) / f"hash.{int(job_id) % 10}" / f"job.{job_id}" / "script"
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readline() for _ in range(HEADER_LINES))
        except OSError:
            pass
    proc = subprocess.run([f"{SBIN}/scontrol", "write", "batch_script", job_id, "-"], capture_output=True,
                          text=True, timeout=30)
    return "\n".join(proc.stdout.splitlines()[:HEADER_LINES]) if proc.returncode == 0 else ""


def expand_hostlist(expr: str) -> list[str]:
    if "[" not in expr:
        return [h for h in expr.split(",") if h]
    proc = subprocess.run([f"{SBIN}/scontrol", "show", "hostnames", expr], capture_output=True, text=True,
                          timeout=30, check=True)
    return proc.stdout.split()


def expand_cpus_per_node(expr: str, count: int) -> list[int]:
    """SLURM_JOB_CPUS_PER_NODE: '2', '2(x3)', '4(x2),2'."""
    cpus: list[int] = []
    for part in filter(None, expr.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not match:
            raise ValueError(f"SLURM_JOB_CPUS_PER_NODE={expr!r}")
        cpus += [int(match.group(1))] * int(match.group(2) or 1)
    return (cpus + [cpus[-1] if cpus else 1] * count)[:count]


def parse_cpu_ids(text: str, expand=None) -> dict[str, list[int]]:
    """The job's cores per node from `scontrol show job -d`: its detail lines read
    `Nodes=n[1-2] CPU_IDs=0-1,4 Mem=100 GRES=`. A node list is expanded with `expand` (scontrol show
    hostnames); without it only plain comma lists are. With select/cons_tres these are the node's CPU ids
    as slurmd numbers them, which are the OS's where slurm.conf's topology matches the node."""
    cores: dict[str, list[int]] = {}
    for match in re.finditer(r"(?m)^\s*Nodes=(\S+)\s+CPU_IDs=([0-9,-]+)", text):
        nodes, ids = match.groups()
        cpu_ids: list[int] = []
        for part in filter(None, ids.split(",")):
            lo, _, hi = part.partition("-")
            cpu_ids += range(int(lo), int(hi or lo) + 1)
        hosts = expand(nodes) if expand and "[" in nodes else nodes.split(",")
        for host in hosts:
            cores.setdefault(host, []).extend(cpu_ids)
    return cores


def job_cpu_ids(job_id: str) -> dict[str, list[int]]:
    """The cores Slurm gave the job on each node; {} when scontrol does not say (then nothing is pinned)."""
    try:
        proc = subprocess.run([f"{SBIN}/scontrol", "show", "job", "-d", job_id], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_cpu_ids(proc.stdout, expand_hostlist) if proc.returncode == 0 else {}


def job_context(env, header: JobHeader) -> JobContext:
    hosts = expand_hostlist(env.get("SLURM_JOB_NODELIST", ""))
    cpus = expand_cpus_per_node(env.get("SLURM_JOB_CPUS_PER_NODE", "1"), len(hosts))
    cores = job_cpu_ids(env["SLURM_JOB_ID"]) if "SLURM_JOB_ID" in env else {}
    owner = m.Owner(user=env["SLURM_JOB_USER"], uid=int(env["SLURM_JOB_UID"]), gid=int(env["SLURM_JOB_GID"]),
                    group=env.get("SLURM_JOB_GROUP"))
    return JobContext(scheduler="slurm", job_id=env["SLURM_JOB_ID"], owner=owner,
                      nodes=[m.NodeAllocation(host=h, ncpus=c, cores=cores.get(h) or None) for h, c in zip(hosts, cpus)],
                      header=header)


def should_cancel(outcome: Outcome, restarts: int, max_requeues: int) -> bool:
    return outcome.verdict is Verdict.REJECTED or (outcome.verdict is Verdict.FAILED and restarts >= max_requeues)


def main(argv: list[str] | None = None, env=os.environ) -> int:
    argv = sys.argv[1:] if argv is None else argv
    which = argv[0] if argv else ""
    if which not in ("prolog", "epilog"):
        print("usage: python -m vtorque.hooks.slurm prolog|epilog", file=sys.stderr)
        return 1
    from vtorque.shared import tracing
    from vtorque.shared.config import ConfigError, load_config
    from vtorque.hooks.job_hook import Progress, run_epilogue, run_prologue

    job_id = env.get("SLURM_JOB_ID", "")
    progress = Progress(sys.stderr)  # PrologSlurmctld output goes to the controller's log
    try:
        config = load_config()
        header = parse_header(job_script_head(job_id, env.get("VTORQUE_SLURM_STATE")))
        if header is None:
            return 0
        job = job_context(env, header)
    except (ConfigError, ScriptError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        print(f"vtorque: job {job_id}: {exc}", file=sys.stderr)
        return 0 if which == "epilog" else 1
    tracing.setup_tracing("vtorque-hook", config.tracing)
    try:
        if which == "epilog":
            code = env.get("SLURM_JOB_EXIT_CODE2", "")
            status = int(code.split(":")[0]) if code.split(":")[0].isdigit() else None
            run_epilogue(job, config, status, progress)
            return 0
        outcome = run_prologue(job, config, config.hooks.prologue_timeout, progress)
        if outcome.verdict is Verdict.READY:
            return 0
        restarts = int(env.get("SLURM_JOB_RESTART_COUNT", "0") or 0)
        if should_cancel(outcome, restarts, config.hooks.max_requeues):
            print(f"vtorque: job {job_id} cancelled: {outcome.reason}", file=sys.stderr)
            subprocess.run([f"{SBIN}/scancel", job_id], capture_output=True, timeout=30)
        else:
            print(f"vtorque: job {job_id} requeued ({restarts + 1} of {config.hooks.max_requeues}): "
                  f"{outcome.reason}", file=sys.stderr)
        return 1
    finally:
        tracing.shutdown_tracing()


if __name__ == "__main__":
    sys.exit(main())
