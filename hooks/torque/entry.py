"""The Python side of Torque's root prologue and epilogue (the shell entry points `prologue` and `epilogue` in
this folder exec `python -m vtorque.hooks.torque`): argv checked, the job read, then the prologue's policy
(deadline, requeue count, what the owner is told) around hooks/job_hook.py's scheduler-neutral run_prologue,
and the epilogue's around run_epilogue. The contract with pbs_mom is the package's docstring."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from vtorque.hooks.job_hook import JobContext, Outcome, Verdict
from vtorque.shared.job_script import ScriptError
from vtorque.shared.torque import (
    exec_host_of,
    nodes_from_nodefile,
    output_paths,
    read_prologalarm,
    torque_kill_after,
    walltime_seconds,
)

from .cancel import make_cancel_dir, remove_cancel_dir, spawn_cancel_watcher, watch_main
from .channel import torque_channel_factory
from .deadline import hook_age, prologue_deadline, prologue_room
from .exit_codes import ABORT, PY_REQUEUE, REQUEUE, RUN, prologue_exit_code
from .job import HookUsage, job_context, qstat_attrs, torque_home
from .log import hook_log, setup_hook_log
from .owner_notes import final_note, reason_text, started_text, write_as_user, write_reason
from .state_files import guests_marker, nothing_asked, quiet_marker, read_requeues, requeue_counter


def main(argv: list[str] | None = None, env=os.environ) -> int:
    t0 = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "watch-cancel" and len(argv) == 7:
        return watch_main(argv[1:])
    if not argv or argv[0] not in ("prologue", "epilogue"):
        print("usage: python -m vtorque.hooks.torque prologue|epilogue ARGS...", file=sys.stderr)
        return ABORT
    which, args = argv[0], argv[1:]
    want = 8 if which == "prologue" else 11
    if len(args) != want:
        print(f"vtorque: the Torque {which} expects {want} arguments, got {len(args)}", file=sys.stderr)
        return ABORT if which == "prologue" else 0

    from vtorque.hooks.job_hook import Progress
    from vtorque.shared import tracing
    from vtorque.shared.config import ConfigError, load_config

    progress = Progress(sys.stdout)
    try:
        config = load_config(role="hook")
        setup_hook_log(config)
        home = torque_home(env.get("VTORQUE_HOOK_PATH"), config.torque.home)
        job = job_context(args, env, want - 1)
    except (ConfigError, HookUsage, ScriptError) as exc:
        print(f"vtorque: {exc}", file=sys.stderr)
        return ABORT if which == "prologue" else 0
    if job is None:
        return 0
    tracing.setup_tracing("vtorque-hook", config.tracing, metrics=False)
    try:
        if which == "epilogue":
            return _epilogue(job, args, config, home, progress)
        return _prologue(job, args, config, home, env, progress, t0)
    finally:
        tracing.shutdown_tracing()


def _epilogue(job: JobContext, args: list[str], config, home: Path, progress) -> int:
    from vtorque.hooks.job_hook import run_epilogue

    exit_status = int(args[9]) if args[9].lstrip("-").isdigit() else None
    remove_cancel_dir(home, job.job_id)  # ends the cancel watcher: from here the epilogue tears down
    if exit_status != -14:  # -14: the prologue asked for a requeue; any other end is the job's last
        requeue_counter(config.state_dir, job.job_id).unlink(missing_ok=True)
    marker = guests_marker(config.state_dir, job.job_id)
    confirmed = run_epilogue(job, config, exit_status, progress,
                             nothing_asked=nothing_asked(config.state_dir, job.job_id))
    if confirmed:
        marker.unlink(missing_ok=True)  # every node confirmed: nothing of the job is left anywhere
    if exit_status != -14:  # the job's last end: what is left is reconciliation's
        marker.unlink(missing_ok=True)
        quiet_marker(config.state_dir, job.job_id).unlink(missing_ok=True)
    hook_log(logging.INFO if confirmed else logging.WARNING, "epilogue done", job_id=job.job_id,
             exit_status=exit_status, teardown_confirmed=confirmed)
    return 0  # Torque ignores the epilogue's exit code; reconciliation covers what it missed


def _prologue(job: JobContext, args: list[str], config, home: Path, env, progress, t0: float) -> int:
    from vtorque.hooks.job_hook import run_prologue

    alarm = read_prologalarm(home)
    elapsed = hook_age(env) + (time.monotonic() - t0)
    deadline_s = prologue_deadline(alarm, config.torque.prologue_margin, config.hooks.prologue_timeout, elapsed)
    counter = requeue_counter(config.state_dir, job.job_id)
    requeues = read_requeues(counter, config.hooks.max_requeues)
    attrs = None
    if prologue_room(alarm, config.torque.prologue_margin, elapsed) < 1:
        outcome = Outcome(Verdict.REJECTED,
                          f"$prologalarm {alarm} in {home}/mom_priv/config leaves no time to boot guests "
                          f"(Torque kills the prologue after {torque_kill_after(alarm)} s; vtorque keeps "
                          f"{config.torque.prologue_margin:.0f} s): raise it")
    else:
        attrs, why = qstat_attrs(job.job_id, config)
        exec_host, why = exec_host_of(attrs, why)
        if exec_host is None:
            hook_log(logging.INFO, "cores unknown: nothing will be pinned", job_id=job.job_id, why=why)
        else:
            # Only the nodes change: everything else (walltime: the guests' end time) stays as Torque gave it.
            job = dataclasses.replace(job, nodes=nodes_from_nodefile(env.get("PBS_NODEFILE"), exec_host))
        def start_cancel_watcher(_spec) -> None:  # only for a valid spec: run_prologue validated it
            try:
                cancel_dir = make_cancel_dir(home, job)
                if cancel_dir is not None:
                    walltime = walltime_seconds(args[4]) or 7 * 86400
                    spawn_cancel_watcher(job, cancel_dir, time.time() + deadline_s + walltime + 3600,
                                         job.header.traceparent, env)
            except OSError as exc:  # qdel then waits for the epilogue: slower, not wrong
                hook_log(logging.WARNING, "no cancel watcher", job_id=job.job_id, error=str(exc))

        remaining = deadline_s - (time.monotonic() - t0)
        outcome = run_prologue(job, config, remaining, progress,
                               channel_factory=torque_channel_factory(config, [n.host for n in job.nodes]),
                               guests_marker=guests_marker(config.state_dir, job.job_id),
                               on_valid=start_cancel_watcher)
    if not os.path.lexists(guests_marker(config.state_dir, job.job_id)):
        quiet = quiet_marker(config.state_dir, job.job_id)
        quiet.parent.mkdir(parents=True, exist_ok=True)
        quiet.touch()
    code = prologue_exit_code(outcome, requeues, config.hooks.max_requeues)
    node, now = socket.gethostname().split(".")[0], datetime.now(UTC)
    if code == REQUEUE:
        counter.parent.mkdir(parents=True, exist_ok=True)
        counter.write_text(str(requeues + 1))
    else:
        counter.unlink(missing_ok=True)
    if code != RUN:
        text = reason_text(job.job_id, args[3], code, outcome.reason, requeues + 1, config.hooks.max_requeues,
                           node, now)
        where = write_reason(job, args[3], env, text)
        if code == REQUEUE:  # Torque delivers this attempt's .e: say it is not the end, and where the end goes
            then = f"; what finally happens goes to {where}" if where else ""
            print(f"vtorque: requeued ({requeues + 1} of {config.hooks.max_requeues}): {outcome.reason} "
                  f"(Torque starts the job again{then})", file=sys.stderr)
        else:
            print(f"vtorque: job aborted: {outcome.reason}", file=sys.stderr)
            if requeues:  # the previous attempt's delivered .o/.e still say "requeued": they get the end
                note = final_note(job.job_id, code, outcome.reason, requeues + 1, where)
                for path in output_paths(attrs):
                    problem = write_as_user(job.owner.uid, job.owner.gid, job.owner.user, path, note, append=True)
                    if problem:
                        hook_log(logging.INFO, "final note not added", path=str(path), error=problem)
        hook_log(logging.WARNING, "prologue failed", job_id=job.job_id, exit_code=code, reason=outcome.reason,
                 verdict=outcome.verdict.value, requeues=requeues, reason_file=where)
    else:
        if requeues:  # the reason file of an earlier attempt said "did not start": no longer true
            write_reason(job, args[3], env, started_text(job.job_id, args[3], requeues + 1, node, now))
        hook_log(logging.INFO, "prologue done: guests ready", job_id=job.job_id,
                 guests=[g.guest for g in outcome.ready])
    return PY_REQUEUE if code == REQUEUE else code
