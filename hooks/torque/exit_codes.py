"""What the prologue's exit code tells Torque (see the package's docstring): 0 runs the job, 1 aborts it, and
anything else requeues it with no limit, so only a deliberate requeue, counted on disk, ever becomes 2."""

from __future__ import annotations

from vtorque.hooks.job_hook import Outcome, Verdict

RUN, ABORT, REQUEUE = 0, 1, 2  # what Torque sees
PY_REQUEUE = 75  # EX_TEMPFAIL: the Python side asks the shell entry point for a requeue (2)


def prologue_exit_code(outcome: Outcome, requeues_so_far: int, max_requeues: int) -> int:
    if outcome.verdict is Verdict.READY:
        return RUN
    if outcome.verdict is Verdict.FAILED and requeues_so_far < max_requeues:
        return REQUEUE
    return ABORT
