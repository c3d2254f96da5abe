"""Torque's root prologue and epilogue for VM jobs, to the contract recorded from TORQUE 6.1
(../shared/reference/torque-hooks.md): prologue argv = jobid user group jobname resource_list queue account
script (8), epilogue argv = jobid user group jobname sid resource_list resources_used queue account
exit_status script (11); PBS_NODEFILE in the environment; cwd mom_priv; stdout/stderr are the job's.

Exit codes: 0 runs the job; 1 aborts it (Torque then keeps its .o/.e); anything else requeues it with no
limit, so an infrastructure failure requeues at most hooks.max_requeues times, counted on disk, then aborts.
"""

from __future__ import annotations

import grp
import os
import pwd
import sys
from collections import OrderedDict
from pathlib import Path

from vtorque.shared import messages as m
from vtorque.shared.job_script import HEADER_LINES, JobHeader, ScriptError, parse_header

from .job_hook import JobContext, Outcome, Verdict

RUN, ABORT, REQUEUE = 0, 1, 2


class HookUsage(Exception):
    pass


def read_header(script: str) -> JobHeader | None:
    try:
        with open(script, encoding="utf-8", errors="replace") as fh:
            head = "".join(fh.readline() for _ in range(HEADER_LINES))
    except OSError:
        return None
    return parse_header(head)


def nodes_from_nodefile(path: str | None) -> list[m.NodeAllocation]:
    """PBS_NODEFILE lists a host once per core, in allocation order; the first host is the mother superior."""
    counts: OrderedDict[str, int] = OrderedDict()
    if path:
        for line in Path(path).read_text().split():
            counts[line] = counts.get(line, 0) + 1
    return [m.NodeAllocation(host=host.split(".")[0], ncpus=n) for host, n in counts.items()]


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


def job_context(argv: list[str], env, script_index: int) -> JobContext | None:
    header = read_header(argv[script_index])
    if header is None:
        return None
    return JobContext(scheduler="torque", job_id=argv[0], owner=owner(argv[1], argv[2]),
                      nodes=nodes_from_nodefile(env.get("PBS_NODEFILE")), header=header)


def prologue_exit_code(outcome: Outcome, requeues_so_far: int, max_requeues: int) -> int:
    if outcome.verdict is Verdict.READY:
        return RUN
    if outcome.verdict is Verdict.FAILED and requeues_so_far < max_requeues:
        return REQUEUE
    return ABORT


def _requeue_counter(state_dir: str, job_id: str) -> Path:
    return Path(state_dir) / "hooks" / "torque" / f"{m.routing_word(job_id)}.requeues"


def main(argv: list[str] | None = None, env=os.environ) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("prologue", "epilogue"):
        print("usage: python -m vtorque.hooks.torque prologue|epilogue ARGS...", file=sys.stderr)
        return ABORT
    which, args = argv[0], argv[1:]
    want = 8 if which == "prologue" else 11
    if len(args) != want:
        print(f"vtorque: the Torque {which} expects {want} arguments, got {len(args)}", file=sys.stderr)
        return ABORT if which == "prologue" else 0

    from vtorque.shared import tracing
    from vtorque.shared.config import ConfigError, load_config
    from vtorque.hooks.job_hook import Progress, run_epilogue, run_prologue

    progress = Progress(sys.stdout)
    try:
        config = load_config()
        job = job_context(args, env, want - 1)
    except (ConfigError, HookUsage, ScriptError) as exc:
        print(f"vtorque: {exc}", file=sys.stderr)
        return ABORT if which == "prologue" else 0
    if job is None:
        return 0
    tracing.setup_tracing("vtorque-hook", config.tracing)
    try:
        if which == "epilogue":
            exit_status = int(args[9]) if args[9].lstrip("-").isdigit() else None
            if exit_status != -14:  # -14: the prologue asked for a requeue; any other end is the job's last
                _requeue_counter(config.state_dir, job.job_id).unlink(missing_ok=True)
            run_epilogue(job, config, exit_status, progress)
            return 0  # Torque ignores the epilogue's exit code; reconciliation covers what it missed
        counter = _requeue_counter(config.state_dir, job.job_id)
        requeues = int(counter.read_text()) if counter.exists() else 0
        outcome = run_prologue(job, config, config.hooks.prologue_timeout, progress)
        code = prologue_exit_code(outcome, requeues, config.hooks.max_requeues)
        if code == REQUEUE:
            counter.parent.mkdir(parents=True, exist_ok=True)
            counter.write_text(str(requeues + 1))
            print(f"vtorque: requeued ({requeues + 1} of {config.hooks.max_requeues}): {outcome.reason}",
                  file=sys.stderr)
        elif code == ABORT:
            counter.unlink(missing_ok=True)
            print(f"vtorque: job aborted: {outcome.reason}", file=sys.stderr)
        else:
            counter.unlink(missing_ok=True)
        return code
    finally:
        tracing.shutdown_tracing()


if __name__ == "__main__":
    sys.exit(main())
