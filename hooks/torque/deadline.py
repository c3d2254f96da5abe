"""How long the Torque prologue may wait for guests: pbs_mom kills it at $prologalarm (less its slack: when, and
what mom_priv/config says, is shared/torque.py's), and the time spent before Python started (a chained site
prologue) counts against that."""

from __future__ import annotations

import os

from vtorque.hooks.process_age import process_age
from vtorque.shared.torque import torque_kill_after

# -- pure ---------------------------------------------------------------------------------------------------

def prologue_room(prologalarm: int, margin: float, elapsed: float = 0.0) -> float:
    """Seconds left before Torque's kill, less `margin`, less what the hook already spent (a chained site
    prologue, start-up)."""
    return torque_kill_after(prologalarm) - margin - elapsed


def prologue_deadline(prologalarm: int, margin: float, cap: float, elapsed: float = 0.0) -> float:
    """Seconds the prologue may wait for guests: the room Torque leaves, never above `cap`
    (hooks.prologue_timeout)."""
    return min(cap, prologue_room(prologalarm, margin, elapsed))


# -- I/O ----------------------------------------------------------------------------------------------------

def hook_age(env) -> float:
    """Seconds since pbs_mom started our shell entry point (our parent), so time spent in a chained site
    prologue counts against Torque's alarm; 0 when we were not started by it."""
    if not env.get("VTORQUE_HOOK_PATH"):
        return 0.0
    return process_age(os.getppid())
