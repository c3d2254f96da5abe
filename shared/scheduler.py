"""What vtorque asks the resource manager, in one place: a job's state, exit code, owner and nodes.

One interface (`Scheduler`) with a Torque and a Slurm implementation; the site names which one, and where its
client binaries are, once in `[scheduler]` (shared/config.py). vsub, the hooks, prefetch, reconciliation and
`vtorque status` all go through `scheduler_for(config)`. The parsers are pure (text in, `JobInfo` out) and
unit-tested on recorded output; only `Torque.job`/`Slurm.job` run a command.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Literal, Protocol

import msgspec

# The states a user knows from both schedulers, in vtorque's words.
State = Literal["queued", "running", "suspended", "exiting", "completed", "failed", "cancelled", "unknown"]
ALIVE: frozenset[str] = frozenset({"queued", "running", "suspended", "exiting"})


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

    @property
    def alive(self) -> bool:
        return self.state in ALIVE


class SchedulerError(Exception):
    """The scheduler could not be asked (binary missing, timeout, an error it printed)."""


class Scheduler(Protocol):
    kind: str

    def job(self, job_id: str) -> JobInfo | None:
        """The job as the scheduler knows it; None when it no longer knows the job. Raises SchedulerError."""

    def binary(self, name: str) -> str:
        """The absolute path of one of its client binaries (qsub, qstat, scontrol, ...)."""


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
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


# -- Torque ----------------------------------------------------------------------------------------------------

# qstat job_state letters (TORQUE 6.1): C is kept only while keep_completed lasts.
_TORQUE_STATES: dict[str, State] = {"Q": "queued", "H": "queued", "W": "queued", "T": "queued", "R": "running",
                                    "S": "suspended", "E": "exiting", "C": "completed"}


def parse_qstat_f(text: str) -> dict[str, str]:
    """`qstat -f JOBID` → {attribute: value}. Long values are folded onto lines that start with a tab
    (TORQUE 6.1 qstat.c prt_attr: "\n\t" after a comma, or inside a token longer than the line): only the tab
    is dropped, the rest is the value's own text."""
    attrs: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("\t") and key:
            attrs[key] += line[1:]
            continue
        name, sep, value = line.strip().partition(" = ")
        if sep:
            key = name
            attrs[key] = value.strip()
    return attrs


def torque_job_info(job_id: str, text: str) -> JobInfo:
    a = parse_qstat_f(text)
    raw = a.get("job_state", "")
    state: State = _TORQUE_STATES.get(raw, "unknown")
    exit_code = None
    if "exit_status" in a and re.fullmatch(r"-?\d+", a["exit_status"]):
        exit_code = int(a["exit_status"])
        if state == "completed" and exit_code != 0:
            # Torque's own codes below 0 (-2 aborted by the prologue, -11 walltime, 271 = 256+SIGTERM qdel)
            state = "cancelled" if exit_code == 271 else "failed"
    # Short names, as the hooks and node workers name nodes (PBS_NODEFILE cut at the first dot): a site's
    # server_priv/nodes often says n1.cluster.
    nodes = tuple(dict.fromkeys(part.split("/")[0].split(".")[0] for part in a.get("exec_host", "").split("+")
                                if part))
    owner = a.get("Job_Owner", "").split("@")[0] or None
    wall = hms_seconds(a["Resource_List.walltime"]) if "Resource_List.walltime" in a else None
    mem = mem_mib(a["Resource_List.mem"], bare="b") if "Resource_List.mem" in a else None
    return JobInfo(job_id=job_id, state=state, raw_state=raw, exit_code=exit_code, owner=owner, nodes=nodes,
                   walltime_s=wall, reason=a.get("comment") or None, mem_mib=mem)


class Torque:
    kind = "torque"

    def __init__(self, config):
        self.config = config

    def binary(self, name: str) -> str:
        return self.config.binary(name)

    def job(self, job_id: str) -> JobInfo | None:
        # Plain -f: TORQUE shows a completed job (C) while keep_completed lasts. Its -x is not PBS Pro's
        # "finished jobs too" but XML output (qstat.c: case 'x': DisplayXML), which this parser cannot read.
        proc = _run([self.binary("qstat"), "-f", job_id], self.config.timeout)
        if proc.returncode != 0:
            if "Unknown Job" in proc.stderr:
                return None
            raise SchedulerError(f"qstat exit {proc.returncode}: {proc.stderr.strip()[:200]}")
        if "job_state" not in parse_qstat_f(proc.stdout):
            # Never "gone" on output we cannot read: reconciliation would remove a running job's guests.
            raise SchedulerError(f"qstat -f {job_id} shows no job_state: {proc.stdout.strip()[:120]!r}")
        return torque_job_info(job_id, proc.stdout)


# -- Slurm -----------------------------------------------------------------------------------------------------

_SLURM_STATES: dict[str, State] = {
    "PENDING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued", "REQUEUE_FED": "queued",
    "CONFIGURING": "queued", "RESV_DEL_HOLD": "queued", "RUNNING": "running", "SUSPENDED": "suspended",
    "STOPPED": "suspended", "COMPLETING": "exiting", "SIGNALING": "exiting", "STAGE_OUT": "exiting",
    "COMPLETED": "completed", "CANCELLED": "cancelled", "PREEMPTED": "cancelled", "DEADLINE": "failed",
    "FAILED": "failed", "BOOT_FAIL": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "TIMEOUT": "failed", "SPECIAL_EXIT": "failed", "REVOKED": "cancelled",
}


def parse_scontrol_oneliner(text: str, job_id: str | None = None) -> dict[str, str]:
    """`scontrol -o show job JOBID` → {key: value}. Values may hold spaces (Command=, WorkDir=, Comment=,
    Reason=(ReqNodeNotAvail, ...)): a word that is not `Key=` continues the value before it.

    One line per job; an array or heterogeneous job gives several: the line whose JobId is `job_id` is read,
    else the first."""
    lines = [line for line in text.splitlines() if line.strip()]
    if job_id is not None:
        mine = [line for line in lines if line.lstrip().startswith(f"JobId={job_id} ")]
        lines = mine or lines
    fields: dict[str, str] = {}
    key = None
    for word in (lines[0] if lines else "").strip().split(" "):
        name, sep, value = word.partition("=")
        if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9:/_]*", name):
            key = name
            fields[key] = value
        elif key:
            fields[key] += " " + word
    return {k: v.rstrip() for k, v in fields.items()}  # a value may be followed by two spaces (Comment=)


def expand_hostlist(expr: str) -> tuple[str, ...]:
    """Slurm's `n[1-3,5],m1` → (n1, n2, n3, n5, m1); zero padding kept (`n[01-02]`)."""
    out: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", expr):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            out.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hi = hi or lo
            for n in range(int(lo), int(hi) + 1):
                out.append(f"{prefix}{n:0{len(lo)}d}")
    return tuple(o for o in out if o)


def slurm_job_info(job_id: str, text: str) -> JobInfo:
    f = parse_scontrol_oneliner(text, job_id)
    raw = f.get("JobState", "").rstrip("+")
    state: State = _SLURM_STATES.get(raw, "unknown")
    exit_code = None
    # ExitCode=<status>:<signal> of the batch script; a job killed by a signal exits 128+signal, as a shell says
    # A job that never started (cancelled while pending: no BatchHost) has no exit status, though Slurm says 0:0.
    ran = f.get("BatchHost") not in (None, "", "(null)")
    if state not in ALIVE and ran and re.fullmatch(r"\d+:\d+", f.get("ExitCode", "")):
        code, signal = map(int, f["ExitCode"].split(":"))
        exit_code = 128 + signal if signal else code
    owner = f.get("UserId", "").split("(")[0] or None
    nodes = expand_hostlist(f["NodeList"]) if f.get("NodeList") not in (None, "", "(null)") else ()
    wall = hms_seconds(f["TimeLimit"]) if "TimeLimit" in f else None
    reason = None
    if f.get("Comment") not in (None, "", "(null)"):
        reason = f["Comment"]
    elif f.get("Reason") not in (None, "", "None", "(null)"):
        reason = f["Reason"]
    paths = {k: f[k] for k in ("StdOut", "StdErr") if f.get(k) not in (None, "", "(null)")}
    tres = dict(part.partition("=")[::2] for part in f.get("TRES", "").split(",") if "=" in part)
    mem = mem_mib(tres["mem"]) if "mem" in tres else None
    return JobInfo(job_id=job_id, state=state, raw_state=raw, exit_code=exit_code, owner=owner, nodes=nodes,
                   walltime_s=wall, reason=reason, stdout=paths.get("StdOut"), stderr=paths.get("StdErr"),
                   mem_mib=mem)


class Slurm:
    kind = "slurm"

    def __init__(self, config):
        self.config = config

    def binary(self, name: str) -> str:
        return self.config.binary(name)

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        """One of its client binaries (argv[0], by the configured path) with the configured time limit."""
        return _run([self.binary(argv[0]), *argv[1:]], self.config.timeout)

    def job(self, job_id: str) -> JobInfo | None:
        proc = self.run("scontrol", "-o", "show", "job", job_id)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:  # never known, or forgotten MinJobAge seconds after it ended
                return None
            raise SchedulerError(f"scontrol exit {proc.returncode}: {_last_line(proc.stderr)}"
                                 + ("" if os.environ.get("SLURM_CONF") or "configuration" not in proc.stderr
                                    else " (SLURM_CONF is not set)"))
        if not proc.stdout.strip():
            return None
        return slurm_job_info(job_id, proc.stdout)


def _last_line(text: str) -> str:
    """scontrol's fatal error is its last line (the ones before say what it tried)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no message")[:200]


def scheduler_for(config) -> Scheduler:
    """The site's scheduler from a whole `Config` (or its `[scheduler]` section)."""
    section = getattr(config, "scheduler", config)
    return Torque(section) if section.kind == "torque" else Slurm(section)
