"""What to do with the VM jobs on a node whose health turned bad (issue 14 item 4). Pure: facts in, actions out.

A node is bad when the scheduler says so: the operator drained it with a reason (`scontrol update
NodeName=… State=DRAIN Reason=…`, `pbsnodes -o -N …`), or a site health check did (Slurm's HealthCheckProgram
drains a node it finds sick; Torque's node health check marks it down): the scheduler stays the one source of
truth, and it then starts no new job there. A VM job with guests on a bad node:
- moves them, live, to a healthy node the scheduler gave the job (`vtorque migrate`'s path: the program in the
  guest keeps running); of several, the one whose last heartbeat has the most free memory;
- else (no healthy node of its own, or the move failed) is requeued: its guests are checkpointed at the
  teardown when the job or the site asked for checkpoints (`-vm checkpoint=`), and it restarts from there on
  healthy nodes; a job without a checkpoint restarts from the start, as after a node failure;
and its owner (the job's Comment) and the operator (this command's output, the log) are told what and why.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    job_id: str
    source: str
    target: str


@dataclass(frozen=True)
class Requeue:
    job_id: str
    source: str
    why: str


@dataclass(frozen=True)
class Leave:
    job_id: str
    source: str
    why: str


Action = Move | Requeue | Leave


def plan(node: str, job_id: str, allocation: tuple[str, ...], bad: set[str], free_mib: dict[str, int],
         requeue: bool) -> Action:
    """What to do with job `job_id`'s guests on the bad `node`, given the job's nodes (`allocation`), every bad
    node, and the free memory each node's last heartbeat told (a node without a heartbeat has no node worker
    to take a guest)."""
    healthy = [n for n in allocation if n != node and n not in bad and n in free_mib]
    if healthy:
        # the most free memory first; equal: the job's node order (the scheduler's), so repeated runs agree
        return Move(job_id, node, max(healthy, key=lambda n: (free_mib[n], -allocation.index(n))))
    others = [n for n in allocation if n != node]
    why = ("it holds no other node" if not others
           else f"its other nodes ({', '.join(others)}) are bad or have no node worker")
    if not requeue:
        return Leave(job_id, node, f"no healthy node of the job to move to: {why}; left running (--no-requeue)")
    return Requeue(job_id, node, f"no healthy node of the job to move to: {why}")


def owner_note(action: Action, reason: str, outcome: str = "") -> str:
    """The one line the job's owner reads in the job's Comment (`scontrol show job`, `squeue -o %k`)."""
    because = f"node {action.source} was taken out ({reason})" if reason else f"node {action.source} was taken out"
    if isinstance(action, Move):
        return f"vtorque: {because}: guests moved live to {action.target}{outcome}"
    if isinstance(action, Requeue):
        return f"vtorque: {because}: requeued, {action.why}{outcome}"
    return f"vtorque: {because}: {action.why}{outcome}"
