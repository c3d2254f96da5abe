"""`vtorque evacuate [NODE...] [--watch]`: VM guests off the nodes the scheduler has taken out (issue 14 item 4).

Root's (the operator's) alone. The scheduler says which nodes are bad (drained with a reason by the operator or
a site health check, down, failing: `Scheduler.bad_nodes`); each node's last heartbeat says which jobs have
guests there (NodeHeartbeat.jobs); cli/evacuation.py decides, per job, a live move to a healthy node of the job
(`vtorque migrate`'s MigrateGuests, checked again by both node workers) or a requeue (the node workers
checkpoint the guests of a job that asked, services/node_worker/checkpoint.py). The owner reads what happened
and why in the job's Comment; the operator in this command's output and the log. `--watch` does one round
every `--interval` seconds, for ever (deploy/systemd/vtorque-evacuate.service): a node drained at 3 a.m. has
its guests moved before anyone reads the page.
"""

from __future__ import annotations

import logging
import os
import time

import click

from vtorque.cli.evacuation import Action, Leave, Move, Requeue, owner_note, plan

LOG = logging.getLogger("vtorque.evacuate")


class Evacuation:
    """One round at a time, remembering which (node, job) it has dealt with, so a job is moved or requeued once
    even while the node's heartbeat still names it (beats are seconds apart)."""

    def __init__(self, config, scheduler, echo, requeue: bool = True, timeout: float = 600.0,
                 read_beats=None, move=None):
        from vtorque.cli.migrate import move as migrate_move
        from vtorque.shared.node_registry import read_heartbeats

        self.config, self.scheduler, self.echo = config, scheduler, echo
        self.requeue, self.timeout = requeue, timeout
        self.read_beats = read_beats or (lambda: read_heartbeats(config.broker.connection_url(),
                                                                 config.broker.connect_timeout))
        self.move = move or migrate_move
        self.done: set[tuple[str, str]] = set()

    def round(self, only: tuple[str, ...] = ()) -> list[tuple[Action, str]]:
        """Deal with every VM job on every bad node (or on `only`, each of which must be bad): [(action, outcome)].
        Raises click.ClickException when the scheduler cannot be asked or a named node is not bad."""
        from vtorque.shared.scheduler import SchedulerError

        try:
            bad = {b.name: b.reason for b in self.scheduler.bad_nodes()}
        except SchedulerError as exc:
            raise click.ClickException(str(exc)) from None
        for node in only:
            if node not in bad:
                raise click.ClickException(
                    f"node {node} is not taken out in the scheduler: drain it first "
                    f"(scontrol update NodeName={node} State=DRAIN Reason=..., or pbsnodes -o -N ... {node})")
        beats: dict = {}
        for beat in self.read_beats():
            if beat.node not in beats or beat.created_at >= beats[beat.node].created_at:
                beats[beat.node] = beat
        free = {n: b.mem_free_mib for n, b in beats.items()}
        results = []
        for node in (only or sorted(bad)):
            beat = beats.get(node)
            if beat is None:
                self.echo(f"{node}: no heartbeat from its node worker: its guests cannot be asked to move", err=True)
                continue
            # forget what the node no longer has (moved, ended): a job that comes back is dealt with again
            self.done = {(n, j) for n, j in self.done if n != node or j in beat.jobs}
            for job_id in beat.jobs:
                if (node, job_id) not in self.done:
                    results.append(self._one(node, bad, job_id, free))
        return results

    def _one(self, node: str, bad: dict[str, str], job_id: str, free: dict[str, int]) -> tuple[Action, str]:
        from vtorque.shared.scheduler import SchedulerError

        try:
            info = self.scheduler.job(job_id)
        except SchedulerError as exc:
            return self._tell(Leave(job_id, node, f"the scheduler cannot be asked about it: {exc}"), bad, "",
                              remember=False)
        if info is None or info.state != "running":
            state = info.raw_state if info else "unknown"
            return self._tell(Leave(job_id, node, f"not running ({state}): left to the scheduler"), bad, "",
                              quiet=True)
        if node not in info.nodes:
            # The heartbeat is the node's word, the allocation the scheduler's: a node that names a job it does
            # not hold (a lie, or a guest reconciliation has yet to remove) gets no other job moved or requeued.
            return self._tell(Leave(job_id, node, f"the scheduler does not place it on {node} "
                                                  f"({', '.join(info.nodes) or 'no nodes'})"), bad, "", quiet=True)
        action = plan(node, job_id, tuple(info.nodes), set(bad), free, self.requeue)
        outcome = ""
        if isinstance(action, Move):
            outcome = self._move(action)
            if not outcome:
                told = self._tell(action, bad, outcome)
                # Nothing of the job runs on the node now: give it back, so that the drain completes (the node
                # DRAINED, free to be taken out) instead of waiting for the job's end.
                kept = self.scheduler.release(info, node)
                self.echo(f"job {job_id}: node {node} " + (f"stays the job's until it ends: {kept}" if kept
                                                           else "taken out of its allocation"), err=bool(kept))
                return told
            if self.requeue:  # not moved: the guest runs on where it was; take the job off the node
                action, outcome = Requeue(job_id, node, f"the move to {action.target} failed ({outcome})"), ""
            else:
                outcome = f", not moved: {outcome}"
        if isinstance(action, Requeue):
            try:
                self.scheduler.requeue(job_id)
            except SchedulerError as exc:
                outcome = f"; the scheduler refused the requeue: {exc}"
        return self._tell(action, bad, outcome)

    def _move(self, action: Move) -> str:
        """'' when every guest of the job on the source moved, else why not (each guest's line already said)."""
        from vtorque.cli.migrate import checked_command

        lines: list[str] = []

        def echo(text: str, err: bool = False) -> None:
            self.echo(f"job {action.job_id}: {text}", err=err)
            if err:
                lines.append(text)

        try:
            cmd = checked_command(action.job_id, action.source, action.target, (), self.timeout)
            failed = self.move(self.config, cmd, echo)
        except click.ClickException as exc:
            return exc.message
        return "" if not failed else f"{failed} guest(s) not moved: {lines[-1] if lines else 'no reason given'}"

    def _tell(self, action: Action, bad: dict[str, str], outcome: str, remember: bool = True,
              quiet: bool = False) -> tuple[Action, str]:
        """Say what was done: to the owner (unless `quiet`: nothing was done to their job), the operator, the log."""
        from vtorque.shared.logs import log

        note = owner_note(action, bad.get(action.source, ""), outcome)
        if not quiet:
            why_not = self.scheduler.note(action.job_id, note)
            if why_not:
                log(LOG, logging.INFO, "owner not told through the scheduler", job_id=action.job_id, reason=why_not)
        self.echo(f"job {action.job_id}: {note}", err=isinstance(action, Leave) or bool(outcome))
        log(LOG, logging.WARNING, "evacuated", job_id=action.job_id, node=action.source, action=type(action).__name__,
            note=note)
        if remember:
            self.done.add((action.source, action.job_id))
        return action, outcome


@click.command()
@click.argument("nodes", nargs=-1)
@click.option("--watch", is_flag=True, help="Keep watching the scheduler for nodes taken out, one round every "
                                            "--interval seconds (as a service).")
@click.option("--interval", default=30.0, show_default=True, help="Seconds between rounds with --watch.")
@click.option("--no-requeue", is_flag=True, help="A job that cannot be moved is left running (default: requeued; "
                                                 "it restarts from its checkpoint when it asked for one).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for one job's moves.")
def evacuate(nodes: tuple[str, ...], watch: bool, interval: float, no_requeue: bool, timeout: float) -> None:
    """Move the VM guests off NODES (each drained, down or failing in the scheduler; none: every such node) to
    healthy nodes of their jobs, live; requeue the jobs that cannot be moved. The owner is told in the job's
    Comment, the operator here."""
    if os.geteuid() != 0:
        raise click.ClickException("vtorque evacuate: only root (the operator) may move a job's guests")
    from vtorque.cli.main import _config
    from vtorque.shared.scheduler import scheduler_for

    config = _config()
    evacuation = Evacuation(config, scheduler_for(config), click.echo, requeue=not no_requeue, timeout=timeout)
    if not watch:
        results = evacuation.round(nodes)
        if not results:
            click.echo(f"no VM job on {', '.join(nodes) or 'any node taken out'}")
        # the operator's script can tell: a job left where it was, or a move or requeue that failed
        if any(isinstance(a, Leave) or outcome for a, outcome in results):
            raise click.exceptions.Exit(1)
        return
    while True:
        try:
            evacuation.round(nodes)
        except click.ClickException as exc:  # a scheduler that does not answer now may answer next round
            click.echo(f"vtorque evacuate: {exc.message}", err=True)
        except Exception as exc:  # noqa: BLE001 - the broker away: the next round tries again
            click.echo(f"vtorque evacuate: {type(exc).__name__}: {exc}", err=True)
        time.sleep(interval)
