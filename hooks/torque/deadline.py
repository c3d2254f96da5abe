"""How long the Torque prologue may wait for guests: pbs_mom kills it at $prologalarm (less its slack), and the
time spent before Python started (a chained site prologue) counts against that."""

from __future__ import annotations

import os
from pathlib import Path

from vtorque.hooks.process_age import process_age

TORQUE_ALARM_SLACK = 10  # pbs_mom kills the prologue at $prologalarm - 10 s (when $prologalarm > 10)
DEFAULT_PROLOGALARM = 300  # PBS_PROLOG_TIME


# -- pure ---------------------------------------------------------------------------------------------------

def prologalarm_from_config(text: str) -> int | None:
    """`$prologalarm N` from mom_priv/config (the last one wins, as pbs_mom reads the file top to bottom)."""
    value = None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "$prologalarm" and words[1].isdigit():
            value = int(words[1])
    return value


def torque_kill_after(prologalarm: int) -> int:
    """When pbs_mom SIGKILLs a prologue (recorded: $prologalarm 30 killed after 20 s)."""
    return prologalarm - TORQUE_ALARM_SLACK if prologalarm > TORQUE_ALARM_SLACK else prologalarm


def prologue_room(prologalarm: int, margin: float, elapsed: float = 0.0) -> float:
    """Seconds left before Torque's kill, less `margin`, less what the hook already spent (a chained site
    prologue, start-up)."""
    return torque_kill_after(prologalarm) - margin - elapsed


def prologue_deadline(prologalarm: int, margin: float, cap: float, elapsed: float = 0.0) -> float:
    """Seconds the prologue may wait for guests: the room Torque leaves, never above `cap`
    (hooks.prologue_timeout)."""
    return min(cap, prologue_room(prologalarm, margin, elapsed))


# -- I/O ----------------------------------------------------------------------------------------------------

def read_prologalarm(home: Path) -> int:
    try:
        value = prologalarm_from_config((home / "mom_priv" / "config").read_text(errors="replace"))
    except OSError:
        value = None
    return DEFAULT_PROLOGALARM if value is None else value


def hook_age(env) -> float:
    """Seconds since pbs_mom started our shell entry point (our parent), so time spent in a chained site
    prologue counts against Torque's alarm; 0 when we were not started by it."""
    if not env.get("VTORQUE_HOOK_PATH"):
        return 0.0
    return process_age(os.getppid())
