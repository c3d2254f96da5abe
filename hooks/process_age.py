"""How long a process has run, from /proc: both schedulers' hook timeouts count from the shell entry point's
start (Torque's pbs_mom started our parent; Slurm's slurmscriptd started the entry point, which exec'd us),
not from Python's."""

from __future__ import annotations

import os
from pathlib import Path


def process_age(pid: int | str = "self") -> float:
    """Seconds since process `pid` started; 0 when /proc cannot tell (no such process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0
