"""What vtorque knows of Slurm, in one place: its job states, `scontrol -o -d show job`, host lists, the cores
of `scontrol show job -d`, `scontrol show config` (PrologEpilogTimeout, ClusterName, SlurmUser), the Comment,
`squeue`, where slurmctld keeps a job's script, and the one class that asks it (`Slurm`: the shared/scheduler.py
interface plus the few calls the hooks, prefetch and doctor make: `show_job`, `hostnames`, `show_config`,
`prolog_epilog_timeout`, `script_head`, `set_comment`, `queue_states`). vsub, the Slurm hooks, the launcher,
the bridge's prefetch, reconciliation, doctor and `vtorque status` all ask Slurm through here. Parsers are pure
and unit-tested on recorded output; only `Slurm.run` (and `submit`) run a command. Light to import:
PrologSlurmctld starts it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from vtorque.shared.cpu_list import parse_cpu_list
from vtorque.shared.job_script import HEADER_LINES, read_head
from vtorque.shared.scheduler import (
    ALIVE,
    BadNode,
    JobInfo,
    SchedulerError,
    State,
    hms_seconds,
    mem_mib,
    run_client,
    submit_client,
)

NO_TIMEOUT = 65534  # what `scontrol show config` prints for an unset PrologEpilogTimeout: wait indefinitely

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
                   mem_mib=mem, cores=_cores_of(text, job_id, nodes),
                   queue=f["Partition"] if f.get("Partition") not in (None, "", "(null)") else None,
                   restarts=int(f["Restarts"]) if f.get("Restarts", "").isdigit() else None,
                   batch_host=f["BatchHost"] if ran else None)


def _cores_of(text: str, job_id: str, nodes: tuple[str, ...]) -> tuple[int, ...]:
    """How many cores the job has on each node, from the `Nodes=n[1-2] CPU_IDs=0-1 Mem=...` words that -d puts
    on the job's line; () when they are not there (or name a node list this cannot expand)."""
    lines = [line for line in text.splitlines() if line.lstrip().startswith(f"JobId={job_id} ")] or text.splitlines()
    counts: dict[str, int] = {}
    for match in re.finditer(r"(?:^|\s)Nodes=(\S+)\s+CPU_IDs=([0-9,-]+)", lines[0] if lines else ""):
        for host in expand_hostlist(match.group(1)):
            counts[host] = counts.get(host, 0) + len(cpu_ids(match.group(2)))
    if not counts or set(counts) != set(nodes):
        return ()
    return tuple(counts[n] for n in nodes)


# slurmctld's StateSaveLocation keeps each job's files in one of ten directories, by the job id's last digit.
STATE_HASHES = tuple(f"hash.{n}" for n in range(10))


def script_path(state_dir: str | Path, job_id: str) -> Path:
    """Where slurmctld keeps a job's batch script in its StateSaveLocation: `hash.<id % 10>/job.<id>/script`."""
    return Path(state_dir) / STATE_HASHES[int(job_id) % 10] / f"job.{job_id}" / "script"


class Slurm:
    """Slurm's client binaries by absolute path ([scheduler]). Without a Slurm `[scheduler]` section (the
    launcher of a site whose config it cannot read, a hook with no config) the binaries are looked up on the
    caller's PATH, /usr/bin first, with a 10 s limit: the hook still refuses the job where the owner looks."""

    kind = "slurm"

    def __init__(self, config=None):
        self.config = config if config is not None and getattr(config, "kind", None) == "slurm" else None

    def binary(self, name: str) -> str:
        if self.config is not None:
            return self.config.binary(name)
        import shutil

        return shutil.which(name) or f"/usr/bin/{name}"

    @property
    def timeout(self) -> float:
        return self.config.timeout if self.config is not None else 10.0

    def run(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """One of its client binaries (argv[0], by the configured path) with the time limit. Raises
        SchedulerError when it cannot be run or gives no answer in time."""
        return run_client([self.binary(argv[0]), *argv[1:]], self.timeout, env)

    def job(self, job_id: str) -> JobInfo | None:
        # -d: the cores of each node (`Nodes=... CPU_IDs=...`) on the same line.
        proc = self.run("scontrol", "-o", "-d", "show", "job", job_id)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:  # never known, or forgotten MinJobAge seconds after it ended
                return None
            raise SchedulerError(f"scontrol exit {proc.returncode}: {_last_line(proc.stderr)}"
                                 + ("" if os.environ.get("SLURM_CONF") or "configuration" not in proc.stderr
                                    else " (SLURM_CONF is not set)"))
        if not proc.stdout.strip():
            return None
        return slurm_job_info(job_id, proc.stdout)

    def suspend(self, job_id: str) -> None:
        self._control("suspend", job_id)

    def resume(self, job_id: str) -> None:
        self._control("resume", job_id)

    def _control(self, verb: str, job_id: str) -> None:
        """`scontrol suspend|resume JOBID`: Slurm lets its operators and administrators alone (SlurmUser, root,
        AdminLevel); anyone else's request, or a job in the wrong state, is its one-line refusal."""
        proc = self.run("scontrol", verb, job_id)
        if proc.returncode != 0:
            raise SchedulerError(f"scontrol {verb} {job_id}: {_refusal(proc)}")

    def show_job(self, job_id: str) -> str:
        """`scontrol show job -d JOBID` (the cores of each node, the Comment), '' when scontrol does not answer."""
        try:
            proc = self.run("scontrol", "show", "job", "-d", job_id)
        except SchedulerError:
            return ""
        return proc.stdout if proc.returncode == 0 else ""

    def hostnames(self, expr: str) -> list[str]:
        """A host list as Slurm expands it (`scontrol show hostnames`; a plain comma list without asking).
        Raises ValueError when Slurm will not expand it."""
        if "[" not in expr:
            return [h for h in expr.split(",") if h]
        try:
            proc = self.run("scontrol", "show", "hostnames", expr)
        except SchedulerError as exc:
            raise ValueError(f"scontrol show hostnames {expr}: {exc}") from None
        if proc.returncode != 0:
            raise ValueError(f"scontrol show hostnames {expr}: {proc.stderr.strip()[:200]}")
        return proc.stdout.split()

    def show_config(self, env: dict[str, str] | None = None) -> str:
        """`scontrol show config` (with `env` as its whole environment: doctor asks with the hooks' SLURM_CONF).
        Raises SchedulerError, saying so, when scontrol cannot be run or refuses."""
        try:
            proc = self.run("scontrol", "show", "config", env=env)
        except SchedulerError as exc:
            raise SchedulerError(f"scontrol show config: {exc}") from None
        if proc.returncode != 0:
            raise SchedulerError(f"scontrol show config: exit {proc.returncode}: {proc.stderr.strip()[:200]}")
        return proc.stdout

    def prolog_epilog_timeout(self) -> tuple[int | None, str]:
        """(PrologEpilogTimeout, '') or (None, why not); None and '' when Slurm waits indefinitely."""
        try:
            return prolog_epilog_timeout(self.show_config()), ""
        except SchedulerError as exc:
            return None, str(exc)

    def cluster(self, job_id: str = "") -> str | None:
        """`slurm:<ClusterName>` (the same for every job id of this controller); None when Slurm cannot say."""
        try:
            name = config_value(self.show_config(), "ClusterName")
        except SchedulerError:
            return None
        return f"slurm:{name}" if name else None

    def submit(self, args: list[str]) -> subprocess.CompletedProcess:
        """slurm-wlm-torque's qsub ([scheduler] qsub) with `args`: vsub takes qsub's options on Slurm too."""
        return submit_client([self.binary("qsub"), *args])

    def script_head(self, job_id: str, state_dir: str | None) -> str:
        """The first HEADER_LINES lines of the job's batch script: from slurmctld's state directory when it is
        readable here (no process started), else `scontrol write batch_script`. '' when neither has it."""
        if state_dir:
            try:
                return read_head(script_path(state_dir, job_id))
            except OSError:
                pass
        proc = self.run("scontrol", "write", "batch_script", job_id, "-")
        return "\n".join(proc.stdout.splitlines()[:HEADER_LINES]) if proc.returncode == 0 else ""

    def set_comment(self, job_id: str, text: str) -> str | None:
        """None when Slurm took the job's new Comment, else why not."""
        try:
            proc = self.run("scontrol", "update", f"JobId={job_id}", f"Comment={text}")
        except SchedulerError as exc:
            return str(exc)
        return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")[:200]

    def note(self, job_id: str, text: str) -> str | None:
        return self.set_comment(job_id, text)

    def release(self, job: JobInfo, node: str) -> str | None:
        rest = [n for n in job.nodes if n != node]
        if node not in job.nodes:
            return None
        if node == job.batch_host or not rest:
            return f"its batch script runs on {node}"
        try:
            proc = self.run("scontrol", "update", f"JobId={job.job_id}", f"NodeList={','.join(rest)}")
        except SchedulerError as exc:
            return str(exc)
        return None if proc.returncode == 0 else f"scontrol update NodeList: {_refusal(proc)}"

    def requeue(self, job_id: str) -> None:
        proc = self.run("scontrol", "requeue", job_id)
        if proc.returncode != 0:
            raise SchedulerError(f"scontrol requeue {job_id}: {_refusal(proc)}")

    def bad_nodes(self) -> list[BadNode]:
        proc = self.run("scontrol", "-o", "show", "node")
        if proc.returncode != 0:
            raise SchedulerError(f"scontrol show node: {_refusal(proc)}")
        return bad_nodes(proc.stdout)

    def cancel(self, job_id: str) -> None:
        try:
            self.run("scancel", job_id)
        except SchedulerError:
            pass

    def queue_states(self) -> dict[str, str]:
        """Every job slurmctld knows: {job id: state} (`squeue -h -t all`); raises SchedulerError."""
        # Every job, so slower than one job's query on a big cluster: never under 30 s (what prefetch had).
        proc = run_client([self.binary("squeue"), "-h", "-t", "all", "-o", "%i|%T"], max(self.timeout, 30.0))
        if proc.returncode != 0:
            raise SchedulerError(f"squeue failed: {proc.stderr.strip()[:200]}")
        return parse_squeue(proc.stdout)


# -- what the hooks and prefetch read ------------------------------------------------------------------------

# Node state flags (State=BASE+FLAG+...) that take a node out. A node that is only DOWN lost its slurmd; its
# host may live on, so its guests are still tried.
BAD_STATES = frozenset({"DRAIN", "DRAINING", "DRAINED", "DOWN", "FAIL", "FAILING", "MAINT"})


def bad_nodes(show_nodes: str) -> list[BadNode]:
    """`scontrol -o show node` (one line per node) → the nodes with a BAD_STATES flag, with their Reason
    (Slurm's `[user@time]` after it kept: who took the node out is part of what an owner is told)."""
    found = []
    for line in show_nodes.splitlines():
        fields = parse_scontrol_oneliner(line)
        flags = set(re.split(r"[^A-Z]+", fields.get("State", "").upper())) - {""}
        if fields.get("NodeName") and flags & BAD_STATES:
            found.append(BadNode(fields["NodeName"], fields.get("Reason", "").strip()))
    return found


def expand_cpus_per_node(expr: str, count: int) -> list[int]:
    """SLURM_JOB_CPUS_PER_NODE: '2', '2(x3)', '4(x2),2'."""
    cpus: list[int] = []
    for part in filter(None, expr.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not match:
            raise ValueError(f"SLURM_JOB_CPUS_PER_NODE={expr!r}")
        cpus += [int(match.group(1))] * int(match.group(2) or 1)
    return (cpus + [cpus[-1] if cpus else 1] * count)[:count]


def parse_cpu_ids(text: str, expand=None) -> dict[str, list[int]]:
    """The job's cores per node from `scontrol show job -d`: its detail lines read
    `Nodes=n[1-2] CPU_IDs=0-1,4 Mem=100 GRES=`. A node list is expanded with `expand` (scontrol show
    hostnames); without it only plain comma lists are. With select/cons_tres these are the node's CPU ids
    as slurmd numbers them, which are the OS's where slurm.conf's topology matches the node."""
    cores: dict[str, list[int]] = {}
    for match in re.finditer(r"(?m)^\s*Nodes=(\S+)\s+CPU_IDs=([0-9,-]+)", text):
        nodes, ids = match.groups()
        hosts = expand(nodes) if expand and "[" in nodes else nodes.split(",")
        for host in hosts:
            cores.setdefault(host, []).extend(cpu_ids(ids))
    return cores


def cpu_ids(ids: str) -> list[int]:
    """CPU_IDs=0-1,4 → [0, 1, 4] (shared/cpu_list.py)."""
    return parse_cpu_list(ids)


def config_value(show_config: str, key: str) -> str | None:
    """One `Key = value` of `scontrol show config` (its first word: `SlurmUser = slurm(64030)` → `slurm(64030)`)."""
    match = re.search(rf"(?m)^{re.escape(key)}\s*=\s*(\S+)", show_config)
    return match.group(1) if match else None


def slurm_user(show_config: str) -> str | None:
    """SlurmUser (who runs PrologSlurmctld) from `scontrol show config`: `SlurmUser = slurm(64030)` → slurm."""
    value = config_value(show_config, "SlurmUser")
    return value.split("(")[0] or None if value else None


def prolog_epilog_timeout(show_config: str) -> int | None:
    """PrologEpilogTimeout from `scontrol show config`; None when Slurm waits indefinitely (unset)."""
    match = re.search(r"(?m)^PrologEpilogTimeout\s*=\s*(\d+)", show_config)
    if not match:
        return None
    value = int(match.group(1))
    return None if value >= NO_TIMEOUT or value == 0 else value


def job_comment(show_job: str) -> str:
    """The Comment of `scontrol show job` (its own line in the multi-line form; may contain spaces)."""
    match = re.search(r"(?m)^\s*Comment=(.*?)\s*$", show_job)
    return "" if match is None or match.group(1) == "(null)" else match.group(1)


def parse_squeue(text: str) -> dict[str, str]:
    """`squeue -h -t all -o %i|%T` → {job id: state}; array and het-job members ("12_3", "7+1") are skipped."""
    states = {}
    for line in text.splitlines():
        job_id, sep, state = line.strip().partition("|")
        if sep and job_id.isdigit():
            states[job_id] = state.strip().upper()
    return states


def _refusal(proc: subprocess.CompletedProcess) -> str:
    """scontrol's refusal without its `scontrol: error: ` prefix (Slurm's own words are kept)."""
    text = _last_line(proc.stderr or proc.stdout)
    return re.sub(r"^(scontrol: )?(error: )?", "", text) if text != "no message" else f"exit {proc.returncode}"


def _last_line(text: str) -> str:
    """scontrol's fatal error is its last line (the ones before say what it tried)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no message")[:200]


