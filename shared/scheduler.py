"""What vtorque asks the resource manager, as one small interface: a job's state, exit code, owner, nodes and
cores, queue; which cluster it is; a job submitted or cancelled.

`Scheduler` has a Torque implementation (shared/torque.py) and a Slurm one (shared/slurm.py), each the one home
of what vtorque knows of that scheduler; the site names which one, and where its client binaries are, once in
`[scheduler]` (shared/config.py). vsub, the hooks, prefetch, reconciliation and `vtorque status` all go through
`scheduler_for(config)` (or the implementation itself, for what only one scheduler has: Torque's `attrs`,
Slurm's Comment). Here: the interface, the words both use, and the one way a client binary is run.
"""

from __future__ import annotations

import re
import subprocess
from typing import Literal, Protocol

import msgspec

# The states a user knows from both schedulers, in vtorque's words.
State = Literal["queued", "running", "suspended", "exiting", "completed", "failed", "cancelled", "unknown"]
ALIVE: frozenset[str] = frozenset({"queued", "running", "suspended", "exiting"})
# How long each scheduler still knows a job after it ended: past that, `job()` answers None, which a caller
# takes for "ended" (`vtorque status` says so, and why, before it falls back to the job's trace).
FORGETS: dict[str, str] = {"slurm": "Slurm forgets a job MinJobAge seconds, 300 by default, after it ends",
                           "torque": "Torque forgets a job keep_completed seconds after it ends"}


class JobInfo(msgspec.Struct, kw_only=True, frozen=True):
    job_id: str
    state: State
    raw_state: str  # the scheduler's own word (R, C, RUNNING, NODE_FAIL, ...)
    exit_code: int | None = None  # the job's exit status once it ended; None while it runs or if unknown
    owner: str | None = None
    nodes: tuple[str, ...] = ()
    walltime_s: int | None = None
    reason: str | None = None  # the scheduler's reason/comment field, if it gives one
    stdout: str | None = None  # where the job's output and error files go (paths on the job's first node)
    stderr: str | None = None
    mem_mib: int | None = None  # memory the job was given in all (Slurm TRES mem, Torque Resource_List.mem)
    cores: tuple[int, ...] = ()  # cores the job has on each of `nodes`, in that order; () when not told
    queue: str | None = None  # Torque's queue, Slurm's partition
    # How often the scheduler has requeued the job so far (Slurm Restarts=, Torque start_count - 1); None: not told.
    # Slurm counts a requeue the moment it happens, while the job is still COMPLETING (its epilogue runs then):
    # a count above the one the job started with says this end is a requeue (services/node_worker/checkpoint.py).
    restarts: int | None = None
    batch_host: str | None = None  # where the job's batch script runs (Slurm BatchHost, Torque's first exec_host)

    @property
    def alive(self) -> bool:
        return self.state in ALIVE


class BadNode(msgspec.Struct, frozen=True):
    """A node the scheduler has taken out (drained, down, offline), in its own words: the operator's or a site
    health check's reason ('' when it gives none). cli/evacuate.py moves VM guests off it."""

    name: str
    reason: str = ""


class SchedulerError(Exception):
    """The scheduler could not be asked (binary missing, timeout, an error it printed)."""


class Scheduler(Protocol):
    kind: str

    def job(self, job_id: str) -> JobInfo | None:
        """The job as the scheduler knows it; None when it no longer knows the job. Raises SchedulerError."""

    def suspend(self, job_id: str) -> None:
        """Ask the scheduler to suspend the running job (`scontrol suspend`, `qsig -s suspend`): its processes stop,
        its walltime clock stops, and the node workers pause its guests (services/node_worker/suspend.py). Only
        the scheduler's operators may; a refusal is SchedulerError with the scheduler's own one line."""

    def resume(self, job_id: str) -> None:
        """Ask the scheduler to resume the suspended job (`scontrol resume`, `qsig -s resume`); as `suspend`."""

    def binary(self, name: str) -> str:
        """The absolute path of one of its client binaries (qsub, qstat, scontrol, ...)."""

    def run(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """One of its client binaries (argv[0], by the configured path), bounded by `[scheduler] timeout`
        (`env`: the whole environment it runs with, else the caller's). Raises SchedulerError when it cannot be
        run or does not answer in time."""

    def cluster(self, job_id: str) -> str | None:
        """Which scheduler has `job_id` (one home is often mounted on several clusters): `torque:<server>`,
        `slurm:<ClusterName>`; None when it cannot be told."""

    def submit(self, args: list[str]) -> subprocess.CompletedProcess:
        """The site's qsub with `args` (the job id on its stdout, captured; its stderr and stdin the caller's,
        unbounded as qsub itself is). Raises SchedulerError when it cannot be run."""

    def cancel(self, job_id: str) -> None:
        """Ask the scheduler to cancel the job (qdel, scancel); a failure to ask is ignored."""

    def requeue(self, job_id: str) -> None:
        """Ask the scheduler to requeue the running job (`scontrol requeue`, `qrerun`): it ends here (the node
        workers checkpoint the guests of a job that asked) and waits to start again. Raises SchedulerError with
        the scheduler's one line (not requeueable, not running, not allowed)."""

    def bad_nodes(self) -> list[BadNode]:
        """Every node the scheduler has taken out (drained, draining, down, failing; Torque's offline, down) with
        its reason. Raises SchedulerError."""

    def release(self, job: JobInfo, node: str) -> str | None:
        """Take `node` out of the running job's allocation, so that nothing holds a node the scheduler drained
        once the job's guests have left it (Slurm shrinks a running job: `scontrol update JobId= NodeList=`).
        None when done, else why not (the batch host; a scheduler that cannot)."""

    def note(self, job_id: str, text: str) -> str | None:
        """Tell the job's owner `text` where they read about their job (Slurm's Comment); None when told, else
        why not."""


def run_client(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A scheduler client binary, bounded; every failure to run it is SchedulerError."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env=env)
    except FileNotFoundError:
        raise SchedulerError(f"{argv[0]}: no such file (set [scheduler] in vtorque.toml)") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{argv[0]} gave no answer within {timeout:g}s") from None
    except OSError as exc:
        raise SchedulerError(f"{argv[0]}: {exc.strerror}") from None


_UNITS = {"b": 1 / 1024 / 1024, "k": 1 / 1024, "kb": 1 / 1024, "m": 1, "mb": 1, "g": 1024,
          "gb": 1024, "t": 1024 ** 2, "tb": 1024 ** 2, "w": 8 / 1024 / 1024, "kw": 8 / 1024, "mw": 8,
          "gw": 8 * 1024}


def mem_mib(text: str, bare: str = "m") -> int | None:
    """Slurm's `300M`/`2G` and Torque's `256mb`/`2gb` → MiB; a bare number is in `bare` units (Slurm: M; Torque:
    bytes, `b`). None for anything else."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    if not found:
        return None
    unit = found.group(2).lower() or bare
    if unit not in _UNITS:
        return None
    return int(float(found.group(1)) * _UNITS[unit])


def hms_seconds(text: str) -> int | None:
    """Torque's `[[DD:]HH:]MM:SS` and Slurm's `[D-]HH:MM:SS` / `MM:SS` / `UNLIMITED` → seconds (None: none)."""
    text = text.strip()
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        if not d.isdigit():
            return None
        days = int(d)
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 4:
        return None
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    if len(parts) == 4:  # Torque's DD:HH:MM:SS: the first field counted as minutes*60 above; redo it
        dd, hh, mm, ss = map(int, parts)
        seconds = ((dd * 24 + hh) * 60 + mm) * 60 + ss
    return days * 86400 + seconds


def submit_client(argv: list[str]) -> subprocess.CompletedProcess:
    """qsub (Torque's, or slurm-wlm-torque's on Slurm) as vsub runs it: the job id on stdout, captured; stderr
    and stdin the caller's; no time limit (qsub waits for the server as long as it must)."""
    try:
        return subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    except OSError as exc:
        raise SchedulerError(f"{argv[0]}: {exc.strerror}") from None


def scheduler_for(config) -> Scheduler:
    """The site's scheduler from a whole `Config` (or its `[scheduler]` section)."""
    from vtorque.shared.slurm import Slurm
    from vtorque.shared.torque import Torque

    section = getattr(config, "scheduler", config)
    return Torque(section) if section.kind == "torque" else Slurm(section)
