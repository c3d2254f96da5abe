"""What one hook run leaves for the next, in `<state_dir>/hooks/torque/` (root's): the requeue count Torque
itself does not keep, and whether a prologue may have asked a node for guests (the epilogue's shortcut)."""

from __future__ import annotations

import os
from pathlib import Path

from vtorque.shared import messages as m


def requeue_counter(state_dir: str, job_id: str) -> Path:
    return Path(state_dir) / "hooks" / "torque" / f"{m.routing_word(job_id)}.requeues"


def guests_marker(state_dir: str, job_id: str) -> Path:
    """Made by the prologue before it publishes JobStarted (hooks/job_hook.py): guests of the job may exist."""
    return Path(state_dir) / "hooks" / "torque" / f"{m.routing_word(job_id)}.guests"


def quiet_marker(state_dir: str, job_id: str) -> Path:
    """Made by a prologue that ran to its end without a guests marker: it asked no node for anything. With this
    and no guests marker the epilogue ends at once. Neither (a prologue of an older vtorque, one killed early):
    the epilogue asks and waits, as it always did."""
    return Path(state_dir) / "hooks" / "torque" / f"{m.routing_word(job_id)}.quiet"


def nothing_asked(state_dir: str, job_id: str) -> bool:
    return quiet_marker(state_dir, job_id).exists() and not os.path.lexists(guests_marker(state_dir, job_id))


def read_requeues(counter: Path, max_requeues: int) -> int:
    """A counter that is unreadable or not a number counts as exhausted: abort rather than loop."""
    try:
        return int(counter.read_text().strip()) if counter.exists() else 0
    except (OSError, ValueError):
        return max_requeues
