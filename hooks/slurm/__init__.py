"""Slurm's PrologSlurmctld and EpilogSlurmctld for VM jobs (../shared/reference/slurm-single-host.md §4).

They run as SlurmUser on the controller with no PATH and no argv; the job is described by SLURM_JOB_*
variables. Slurm kills them at PrologEpilogTimeout (`scontrol show config`), so the hook's deadline is that
timeout less a margin less the time the hook already ran, never more than hooks.prologue_timeout.

What the owner is told, and how (docs/design.md, "Failure classes"):
- a failure a retry may cure (broker unreachable, a node without a node worker, boot timeout) requeues: the
  hook sets the job's Comment to `vtorque: requeued (N of M): <reason>` and exits 1 (Slurm requeues), while
  SLURM_JOB_RESTART_COUNT is below hooks.max_requeues;
- a rejection (bad spec, image failed to stage, guest failed for good), or the last failure, sets the Comment to
  `vtorque: not started: <reason>` and exits 0. Slurm then starts the batch step as the owner, which creates
  the job's StdOut/StdErr files the way the user asked for them; the wrapper's vtorque-launch reads the Comment
  first (`refusal()` below), prints the one line to stderr and exits 1 without touching a guest. The job ends
  FAILED, ExitCode 1, and EpilogSlurmctld tears down whatever was booted. (A `scancel` from inside the hook,
  what this did before, also SIGKILLs the hook itself and the job's EpilogSlurmctld — recorded on Slurm
  22.05 — and leaves no file: slurmd never hears of the job.)
- a job that starts after a requeue gets the user's own Comment back.

This folder holds the hook: the shell entry points `prolog_slurmctld` and `epilog_slurmctld` (what slurm.conf
names; they exec `python -m vtorque.hooks.slurm`, which runs `main` here), this module's policy (when to
requeue, how long to wait) and `comment.py` (what the Comment says). The prologue's channel is
shared/hook_channel.py's NodeWorkerChannel (slurm_channel_factory), loaded only by a prologue.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from vtorque.hooks.process_age import process_age  # slurmscriptd started the shell entry point, which exec'd us
from vtorque.shared.job_script import JobHeader, ScriptError, parse_header
from vtorque.shared.scheduler import SchedulerError

# What Slurm says and how it is asked live in shared/slurm.py (the bridge's prefetch asks it too), what the
# Comment says in comment.py; here the hook's policy: when to requeue, how long to wait.
from vtorque.shared.slurm import Slurm, expand_cpus_per_node, job_comment, parse_cpu_ids, prolog_epilog_timeout  # noqa: F401

from .comment import (
    PREFIX,
    comment_with,
    not_started_comment,
    one_line,
    refusal_line,
    requeue_comment,
    users_comment,
)

if TYPE_CHECKING:  # imported where used: vtorque-launch calls refusal() for every Slurm VM job, without pika
    from vtorque.hooks.job_hook import JobContext, Outcome

PROLOG_MARGIN = 10.0  # s kept below Slurm's kill for the answer: the Comment, the exit, tracing's flush


# -- pure ---------------------------------------------------------------------------------------------------

def prolog_room(timeout: int | None, margin: float, elapsed: float) -> float | None:
    """Seconds before Slurm kills the hook, less the margin and what the hook already spent; None: no limit."""
    return None if timeout is None else timeout - margin - elapsed


def prolog_deadline(timeout: int | None, margin: float, cap: float, elapsed: float = 0.0) -> float:
    """How long the prologue may wait for guests: never past Slurm's kill, never above hooks.prologue_timeout."""
    room = prolog_room(timeout, margin, elapsed)
    return cap if room is None else min(cap, room)


def decide(outcome: Outcome, restarts: int, max_requeues: int) -> str:
    """run | requeue | refuse."""
    from vtorque.hooks.job_hook import Verdict

    if outcome.verdict is Verdict.READY:
        return "run"
    if outcome.verdict is Verdict.FAILED and restarts < max_requeues:
        return "requeue"
    return "refuse"


def should_cancel(outcome: Outcome, restarts: int, max_requeues: int) -> bool:
    """True when the job is not to start in guests (refused; it is no longer scancel'ed, see the module)."""
    return decide(outcome, restarts, max_requeues) == "refuse"


# -- I/O ----------------------------------------------------------------------------------------------------

def refusal(job_id: str, config=None) -> str | None:
    """For vtorque-launch, before it looks for a guest: the one line to print when the prologue did not start
    this job (its Comment says so), else None. Runs as the job's owner (users may read their own jobs)."""
    return refusal_line(job_id, job_comment(slurm_for(config).show_job(job_id)))


def slurm_for(config=None) -> Slurm:
    """The site's Slurm from a whole Config (None: no config could be read)."""
    return Slurm(getattr(config, "scheduler", None))


def job_context(env, header: JobHeader, tools: Slurm | None = None, show_job_text: str = "") -> JobContext:
    from vtorque.hooks.job_hook import JobContext
    from vtorque.shared import messages as m

    tools = tools or Slurm()
    hosts = tools.hostnames(env.get("SLURM_JOB_NODELIST", ""))
    cpus = expand_cpus_per_node(env.get("SLURM_JOB_CPUS_PER_NODE", "1"), len(hosts))
    cores = parse_cpu_ids(show_job_text, tools.hostnames) if show_job_text else {}
    owner = m.Owner(user=env["SLURM_JOB_USER"], uid=int(env["SLURM_JOB_UID"]), gid=int(env["SLURM_JOB_GID"]),
                    group=env.get("SLURM_JOB_GROUP"))
    return JobContext(scheduler="slurm", job_id=env["SLURM_JOB_ID"], owner=owner,
                      nodes=[m.NodeAllocation(host=h, ncpus=c, cores=cores.get(h) or None)
                             for h, c in zip(hosts, cpus, strict=True)],
                      header=header)


def slurm_channel_factory(hosts: list[str], grace: float):
    """What run_prologue opens its channel with: shared/hook_channel.py's NodeWorkerChannel, which fails at once
    (an infrastructure failure: bounded requeue) when a node of the job has no node worker consuming its queue,
    instead of waiting out the whole deadline; the Torque prologue's channel is the same with Torque's cancel.
    `grace`: s a node's queue may go without a consumer (a node worker restarting), `[hooks] node_worker_grace`.
    Imported here, not at the top: vtorque-launch imports this package for refusal() and must not load pika."""
    import functools

    from vtorque.shared.hook_channel import NodeWorkerChannel

    return functools.partial(NodeWorkerChannel, hosts=hosts, grace=grace)


# -- entry point --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None, env=os.environ, channel_factory=None, age=None) -> int:
    """`age()`: seconds the hook has already run (Slurm's timeout counts from the shell entry point, which exec'd
    this process: its /proc age); called in-process (tests), the hook starts now."""
    if age is None:
        started = time.monotonic()
        age = (lambda: time.monotonic() - started) if argv is not None else process_age
    argv = sys.argv[1:] if argv is None else argv
    which = argv[0] if argv else ""
    if which not in ("prolog", "epilog"):
        print("usage: python -m vtorque.hooks.slurm prolog|epilog", file=sys.stderr)
        return 1
    import msgspec

    from vtorque.hooks.job_hook import Outcome, Progress, Verdict, run_epilogue, run_prologue
    from vtorque.shared import tracing
    from vtorque.shared.config import ConfigError, load_config

    job_id = env.get("SLURM_JOB_ID", "")
    progress = Progress(sys.stderr)  # PrologSlurmctld output goes to the controller's log
    config, config_error = None, None
    try:
        config = load_config(role="hook")
    except ConfigError as exc:
        config_error = exc
    tools = slurm_for(config)
    try:
        header = parse_header(tools.script_head(job_id, env.get("VTORQUE_SLURM_STATE")))
        if header is None:
            return 0  # not a VM job (the shell entry point lets those go without Python unless it cannot read)
        if config_error is not None:
            raise config_error
        shown = tools.show_job(job_id) if job_id else ""
        job = job_context(env, header, tools, shown)
    except (ConfigError, ScriptError, SchedulerError, ValueError, KeyError, OSError,
            subprocess.SubprocessError) as exc:
        print(f"vtorque: job {job_id}: {exc}", file=sys.stderr)
        if which == "epilog":
            return 0
        # Without a config or a readable job we cannot wait for guests; say so where the owner looks.
        return _refuse(job_id, f"the prologue could not read the job: {one_line(str(exc))}", "", 0, tools)
    assert config is not None  # else its ConfigError was raised above
    timeout, why = tools.prolog_epilog_timeout()
    if why:
        print(f"vtorque: job {job_id}: {why}; assuming no PrologEpilogTimeout", file=sys.stderr)
    tracing.setup_tracing("vtorque-hook", config.tracing, metrics=False)
    try:
        if which == "epilog":
            code = env.get("SLURM_JOB_EXIT_CODE2", "")
            status = int(code.split(":")[0]) if code.split(":")[0].isdigit() else None
            wait = prolog_deadline(timeout, PROLOG_MARGIN, config.hooks.epilogue_timeout, age())
            hooks = msgspec.structs.replace(config.hooks, epilogue_timeout=max(wait, 1.0))
            run_epilogue(job, msgspec.structs.replace(config, hooks=hooks), status, progress)
            return 0
        restarts = int(env.get("SLURM_JOB_RESTART_COUNT", "0") or 0)
        old_comment = job_comment(shown)
        room = prolog_room(timeout, PROLOG_MARGIN, age())
        if room is not None and room < 1:
            outcome = Outcome(Verdict.REJECTED,
                              f"PrologEpilogTimeout={timeout} in slurm.conf leaves no time to boot guests "
                              f"(vtorque keeps {PROLOG_MARGIN:.0f} s for its answer): the administrator must raise it")
        else:
            deadline_s = prolog_deadline(timeout, PROLOG_MARGIN, config.hooks.prologue_timeout, age())
            factory = channel_factory or slurm_channel_factory([n.host for n in job.nodes],
                                                               config.hooks.node_worker_grace)
            outcome = run_prologue(job, config, deadline_s, progress, channel_factory=factory)
        what = decide(outcome, restarts, config.hooks.max_requeues)
        if what == "run":
            if old_comment.startswith(PREFIX):  # an earlier attempt's requeue note: give the owner theirs back
                tools.set_comment(job_id, users_comment(old_comment))
            return 0
        if what == "requeue":
            text = requeue_comment(outcome.reason, restarts + 1, config.hooks.max_requeues)
            problem = tools.set_comment(job_id, comment_with(old_comment, text))
            print(f"vtorque: job {job_id} {text[len(PREFIX):]}"
                  + (f" (Comment not set: {problem})" if problem else ""), file=sys.stderr)
            return 1
        return _refuse(job_id, outcome.reason, old_comment, restarts, tools)
    finally:
        tracing.shutdown_tracing()


def _refuse(job_id: str, reason: str, old_comment: str, restarts: int, tools: Slurm) -> int:
    """The job does not start in guests: the Comment says why and the batch step (vtorque-launch, as the owner)
    prints it into the job's own error file. If Slurm will not take the Comment, cancel instead: no file then,
    but the job does not linger."""
    text = not_started_comment(reason, restarts)
    print(f"vtorque: job {job_id} {text[len(PREFIX):]}", file=sys.stderr)
    if not job_id:
        return 1
    problem = tools.set_comment(job_id, comment_with(old_comment, text))
    if problem is None:
        return 0
    print(f"vtorque: job {job_id}: Comment not set ({problem}); cancelling it", file=sys.stderr)
    tools.cancel(job_id)  # Slurm SIGKILLs this hook now: nothing may follow
    return 1
