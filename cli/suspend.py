"""`vtorque suspend JOBID` and `vtorque resume JOBID`: ask the scheduler, nothing else.

The scheduler is the one source of truth: these never touch a guest. Slurm (`scontrol suspend|resume`) and Torque
(`qsig -s suspend|resume`) stop or continue the job's processes and its walltime clock, and take the request from
their operators alone (the caller's own rights, this command runs as the caller); the node workers see the job's
state at their next reconcile and pause or save its guests, or bring them back (services/node_worker/suspend.py).
"""

from __future__ import annotations

import click


def _ask(verb: str, job_id: str) -> None:
    from vtorque.cli.main import _config
    from vtorque.shared.scheduler import SchedulerError, scheduler_for

    config = _config()
    scheduler = scheduler_for(config)
    try:
        getattr(scheduler, verb)(job_id)
    except SchedulerError as exc:
        raise click.ClickException(str(exc)) from None
    period = config.node.reconcile_interval
    click.echo(f"job {job_id}: {verb} asked of {scheduler.kind}; its guests follow within {period:g}s "
               f"(the node workers' reconcile period)")


@click.command()
@click.argument("job_id")
def suspend(job_id: str) -> None:
    """Ask the scheduler to suspend a running job: its guests pause (or are saved to disk: [node] suspend)."""
    _ask("suspend", job_id)


@click.command()
@click.argument("job_id")
def resume(job_id: str) -> None:
    """Ask the scheduler to resume a suspended job: its guests carry on, their clocks set right."""
    _ask("resume", job_id)
